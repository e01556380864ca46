"""CSReftConfig: what to edit (layers, positions), how (rank, k subspaces) and how to route."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

# 2: bases saved as Q (`edits.L.g.basis`); 1: as torch's parametrisation with its d x d base,
# read by this version too (converted on load)
FORMAT_VERSION = 2
READ_FORMATS = (1, 2)

INTERVENTIONS = ("loreft", "direft")
ROUTER_INPUTS = ("mean", "first", "last", "head", "attention")
GATINGS = ("soft", "hard", "topk", "anneal")
ROUTINGS = ("learned", "signatures", "prototypes")  # csreft.signatures
ROUTER_INITS = ("random", "kmeans", "kmeans-fixed")
_POSITIONS_RE = re.compile(r"^(?:all|f\d+|l\d+|f\d+\+l\d+)$")


def parse_positions(spec: str) -> tuple[int, int] | str:
    """"f7+l7" -> (7, 7); "f5" -> (5, 0); "l3" -> (0, 3); "all" -> "all"."""
    spec = spec.strip().lower() if isinstance(spec, str) else spec
    if not isinstance(spec, str) or not _POSITIONS_RE.match(spec):
        raise ValueError(
            f"positions={spec!r} is not valid: use 'fN', 'lN', 'fN+lN' (first/last N prompt "
            "tokens, N >= 1) or 'all'"
        )
    if spec == "all":
        return "all"
    first = last = 0
    for part in spec.split("+"):
        if part[0] == "f":
            first = int(part[1:])
        else:
            last = int(part[1:])
    if (spec[0] == "f" and first < 1) or ("l" in spec and last < 1):
        raise ValueError(f"positions={spec!r} is not valid: N must be at least 1")
    return first, last


# what configurations saved before the routing options (shared subspaces, head/attention
# router inputs, router_layer, balance term) meant: CSReftConfig.from_dict fills them in
_BEFORE_ROUTING_OPTIONS = {"shared_subspaces": 0, "router_head": 8, "router_layer": None, "balance_weight": 0.0}
# saved configs that name no router width were trained with d // 2, the default until format 2
_BEFORE_FORMAT_2 = {"router_hidden": None}


@dataclass
class CSReftConfig:
    """Configuration of k routed low-rank subspace edits on a frozen causal LM.

    Each edit i (rank r) acts on a hidden state h as R_i^T (W_i h + b_i - R_i h) ("loreft") or
    R_i^T (W_i h + b_i) ("direft"); the model applies h + sum_i gate_i * edit_i(h) at the
    outputs of `layers`, at the first/last prompt positions given by `positions`.
    """

    _argument_group_name = "CS-ReFT configuration (CSReftConfig)"  # the group of its flags in --help

    layers: list[int] = field(default_factory=lambda: [3, 9, 18, 24], metadata={
        "help": "decoder layers whose outputs are edited, e.g. 3,9,18,24", "metavar": "L,L,..."})
    rank: int = field(default=4, metadata={"help": "r, the rank of each subspace"})
    num_subspaces: int = field(default=4, metadata={"help": "k, the number of routed edits (skills)"})
    positions: str = field(default="f7+l7", metadata={
        "help": "prompt positions edited: fN, lN, fN+lN (first/last N prompt tokens) or all"})
    share_positions: bool = field(default=True, metadata={
        "help": "one edit for first and last positions (true), or one each (overlaps then get both)"})
    edit_generated: bool = field(default=False, metadata={
        "help": "also edit the response: the tokens the model generates, and in training and scoring "
                "the response tokens, with the edit of the last position group (styles act on the "
                "output; costs a little decoding speed)"})
    intervention: str = field(default="loreft", metadata={
        "help": "the edit: loreft R^T(Wh + b - Rh), or direft R^T(Wh + b)", "choices": INTERVENTIONS})
    orthogonal_subspaces: bool = field(default=True, metadata={
        "help": "all k bases from one orthonormal d x (k r) matrix (isolated skills), or k independent ones"})
    shared_subspaces: int = field(default=0, metadata={
        "help": "always-on edits (gate 1) beside the k routed ones, for what every skill shares"})
    use_router: bool = field(default=True, metadata={
        "help": "route the edits; false: every gate is 1 (k = 1 without a router is LoReFT)"})
    router_input: str = field(default="head", metadata={
        "help": "what the router reads of the prompt: mean of its hidden states, first / last token, "
                "head (mean of the first router_head tokens), attention (learned pooling); see "
                "docs/results/routing-study.md", "choices": ROUTER_INPUTS})
    router_head: int = field(default=4, metadata={"help": "tokens read by router_input=head"})
    router_layer: int | None = field(default=None, metadata={
        "help": "the layer whose input the router reads (default: the first edited layer); a higher "
                "one costs a first pass of the base up to it"})
    router_hidden: int | None = field(default=128, metadata={
        "help": "router MLP width; None: d // 2, the paper's (2048 at 7B: 8.4M parameters, 16x the edits)"})
    gating: str = field(default="soft", metadata={
        "help": "soft sigmoid gates; hard 0/1 at threshold (straight-through gradient); topk keeps "
                "top_k; anneal moves from soft to hard over training", "choices": GATINGS})
    threshold: float = field(default=0.5, metadata={"help": "gate threshold of hard gating, in (0, 1)"})
    top_k: int = field(default=1, metadata={"help": "subspaces kept by topk gating"})
    sparsity_weight: float = field(default=0.0, metadata={
        "help": "weight of Omega, the mean gate value (pushes gates to 0)"})
    balance_weight: float = field(default=2.0, metadata={
        "help": "weight of the balance term: low entropy of each input's gates, high entropy of the "
                "batch's mean gate (without it unsupervised gates collapse to one vector)"})
    routing_loss_weight: float = field(default=1.0, metadata={
        "help": "weight of the supervised routing loss, BCE(gates, one-hot skill), when skills are given"})
    router_init: str = field(default="random", metadata={
        "help": "how training starts the router: random (nn.Linear's initialisation); kmeans: at the "
                "k-means clusters of the training prompts' summaries (whitened), then trained as usual; "
                "kmeans-fixed: at those clusters, and kept there (only the edits train)", "choices": ROUTER_INITS})
    routing: str = field(default="learned", metadata={
        "help": "what gates the edits: the learned router; or, for a skill library, no training: "
                "signatures (each skill's stored prompt statistics) or prototypes (each edit's own "
                "weights); see docs/composition.md", "choices": ROUTINGS})
    routing_temperature: float = field(default=1.0, metadata={
        "help": "signature / prototype routing: softmax temperature of the scores (top_k skills keep "
                "their share)"})
    placement: str | None = field(default=None, metadata={
        "help": "where each routed subspace edits, one ';'-separated entry per subspace: the layers "
                "it edits, optionally @f or @l (only the first / last prompt positions; needs "
                "share_positions false), 'xN' repeating an entry: '3,9x5;18,24x4' puts subspaces 0-4 "
                "at layers 3 and 9 and 5-8 at 18 and 24 (default: every subspace at every site)",
        "metavar": "SPEC"})
    dropout: float = field(default=0.0, metadata={
        "help": "dropout on the low-rank edit coordinates during training, in [0, 1)"})
    format_version: int = field(default=FORMAT_VERSION, init=False)  # checked by from_dict

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -------------------------------------------------------------------------
    def validate(self, hidden_size: int | None = None, num_layers: int | None = None) -> None:
        """Raise ValueError naming the field, its value and what is allowed."""

        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"{name}={getattr(self, name)!r} is not valid: {allowed}")

        if isinstance(self.layers, int):
            self.layers = [self.layers]
        if isinstance(self.layers, str):
            try:
                self.layers = [int(x) for x in re.split(r"[;,\s]+", self.layers.strip()) if x]
            except ValueError:
                raise bad("layers", "a list of decoder-layer indices such as [3, 9, 18, 24]")
        if (
            not isinstance(self.layers, (list, tuple))
            or not self.layers
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers)
        ):
            raise bad("layers", "a non-empty list of decoder-layer indices such as [3, 9, 18, 24]")
        self.layers = sorted(set(int(i) for i in self.layers))
        if self.layers[0] < 0:
            raise bad("layers", "indices must be >= 0")
        if num_layers is not None and self.layers[-1] >= num_layers:
            raise bad("layers", f"the base model has {num_layers} layers (indices 0..{num_layers - 1})")
        for name, low in (("rank", 1), ("num_subspaces", 1), ("top_k", 1), ("router_head", 1),
                          ("shared_subspaces", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise bad(name, f"an integer >= {low}")
        if self.router_layer is not None:
            if not isinstance(self.router_layer, int) or isinstance(self.router_layer, bool) or self.router_layer < 0:
                raise bad("router_layer", "None (the first edited layer) or a layer index >= 0")
            if num_layers is not None and self.router_layer >= num_layers:
                raise bad("router_layer", f"the base model has {num_layers} layers (indices 0..{num_layers - 1})")
        for name in ("share_positions", "orthogonal_subspaces", "use_router", "edit_generated"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false (a boolean, not a string or number)")
        parse_positions(self.positions)
        self.positions = self.positions.strip().lower()
        for name, allowed in (
            ("intervention", INTERVENTIONS),
            ("router_input", ROUTER_INPUTS),
            ("gating", GATINGS),
            ("routing", ROUTINGS),
            ("router_init", ROUTER_INITS),
        ):
            if getattr(self, name) not in allowed:
                raise bad(name, f"one of {', '.join(allowed)}")
        if self.router_hidden is not None and (
            not isinstance(self.router_hidden, int) or self.router_hidden < 1
        ):
            raise bad("router_hidden", "None (hidden_size // 2) or an integer >= 1")
        if self.routing != "learned" and not self.use_router:
            raise bad("routing", "learned when use_router is false (there are no gates to compute)")
        if (self.gating == "topk" or self.routing != "learned") and self.top_k > self.num_subspaces:
            raise bad("top_k", f"at most num_subspaces={self.num_subspaces}")
        for name in ("threshold", "dropout", "sparsity_weight", "routing_loss_weight", "balance_weight",
                     "routing_temperature"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise bad(name, "a finite number")
        if not 0.0 < self.threshold < 1.0:
            raise bad("threshold", "a number strictly between 0 and 1")
        if self.routing_temperature <= 0:
            raise bad("routing_temperature", "a number > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "a number in [0, 1)")
        for name in ("sparsity_weight", "routing_loss_weight", "balance_weight"):
            if getattr(self, name) < 0:
                raise bad(name, "a number >= 0")
        if self.format_version != FORMAT_VERSION:
            raise bad("format_version", f"this csreft reads format {FORMAT_VERSION}")
        if self.placement is not None:
            self.placement_sites()  # raises naming the entry
        n = self.num_subspaces + self.shared_subspaces
        if hidden_size is not None and self.rank * n > hidden_size:
            raise ValueError(
                f"rank * (num_subspaces + shared_subspaces) = {self.rank} * {n} = {self.rank * n} "
                f"is not valid: it must be at most the hidden size d = {hidden_size}"
            )

    # -- derived ----------------------------------------------------------------------------
    @property
    def position_groups(self) -> list[list[tuple[str, int]]]:
        """Groups of position segments; each group has its own edit parameters.

        "f7+l7" shared -> [[("f", 7), ("l", 7)]]; not shared -> [[("f", 7)], [("l", 7)]];
        "all" -> [[("all", 0)]].
        """
        p = parse_positions(self.positions)
        if p == "all":
            return [[("all", 0)]]
        segments = [(kind, n) for kind, n in zip("fl", p) if n > 0]
        return [segments] if self.share_positions else [[s] for s in segments]

    def placement_sites(self) -> list[tuple[list[int], list[int]]] | None:
        """Per routed subspace, (the layers, the position-group indices) it edits, from
        `placement`; None when every subspace edits every site."""
        if self.placement is None:
            return None

        def bad(entry: str, allowed: str) -> ValueError:
            return ValueError(f"placement={self.placement!r} is not valid: entry {entry!r}: {allowed}")

        if not isinstance(self.placement, str):
            raise ValueError(f"placement={self.placement!r} is not valid: a string such as '3,9x2;18,24x2'")
        names = ["f", "l"] if len(self.position_groups) == 2 else []
        sites = []
        for entry in (e.strip() for e in self.placement.split(";")):
            m = re.fullmatch(r"([\d,\s]+?)\s*(?:@\s*([a-z]+))?\s*(?:x\s*(\d+))?", entry)
            if not m:
                raise bad(entry, "LAYERS[@f|@l][xN], e.g. 3,9 or 18,24@l or 3,9x4")
            parts = [x.strip() for x in m.group(1).split(",")]
            if not all(x.isdigit() for x in parts):
                raise bad(entry, "its layers are comma-separated indices such as 3,9")
            layers = [int(x) for x in parts]
            if not layers or any(x not in self.layers for x in layers):
                raise bad(entry, f"its layers must be among the edited layers {self.layers}")
            if m.group(2) is None:
                groups = list(range(len(self.position_groups)))
            elif m.group(2) in names:
                groups = [names.index(m.group(2))]
            else:
                raise bad(entry, "@f / @l need positions fN+lN with share_positions false (one edit per group)")
            repeat = int(m.group(3) or 1)
            if repeat < 1:
                raise bad(entry, "xN needs N >= 1")
            sites += [(sorted(set(layers)), groups)] * repeat
        if len(sites) != self.num_subspaces:
            raise ValueError(f"placement={self.placement!r} is not valid: it places {len(sites)} subspaces, "
                             f"num_subspaces is {self.num_subspaces}")
        return sites

    @property
    def total_subspaces(self) -> int:
        """Routed plus shared (always-on) subspaces: the edits' k."""
        return self.num_subspaces + self.shared_subspaces

    def router_reads(self) -> int:
        """The layer whose input the router reads."""
        return self.layers[0] if self.router_layer is None else self.router_layer

    def router_width(self, hidden_size: int) -> int:
        return self.router_hidden if self.router_hidden is not None else hidden_size // 2

    # -- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CSReftConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown CSReftConfig field(s) {unknown}; known: {sorted(names)}")
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        if version not in READ_FORMATS:
            raise ValueError(f"format_version={version!r} is not valid: this csreft reads formats "
                             f"{', '.join(map(str, READ_FORMATS))}")
        # a saved config without the routing options was trained without them
        return cls(**{**(_BEFORE_ROUTING_OPTIONS if "balance_weight" not in data else {}),
                      **(_BEFORE_FORMAT_2 if version == 1 else {}), **data})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CSReftConfig":
        return cls.from_dict(json.loads(text))
