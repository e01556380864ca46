"""The comparison's methods: kinds, variants (`csreft[gating=hard,lr=3e-3]`), learning-rate grids."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from ..config import CSReftConfig

KINDS = ("base", "loreft", "specialists", "csreft", "csreft_supervised", "lora", "lora_edits")
METHODS = KINDS  # "all"
ROUTED = ("csreft", "csreft_supervised")
SINGLE_EDIT = ("loreft", "specialists")  # one LoReFT edit (per skill): rank k r unless [rank=...] says
# learning-rate grids, by family: ReFT edits take larger steps than LoRA's weight deltas
LR_GRID_REFT = (1e-3, 3e-3, 9e-3)
LR_GRID_LORA = (3e-4, 1e-3, 3e-3, 9e-3)


@dataclass
class Method:
    """One row of the comparison: a kind of method and its option overrides."""

    label: str
    kind: str
    overrides: dict = field(default_factory=dict)  # CSReftConfig fields, and lr

    @property
    def lr(self):
        return self.overrides.get("lr")

    @property
    def config_overrides(self) -> dict:
        return {k: v for k, v in self.overrides.items() if k != "lr"}


_CONFIG_FIELDS = {f.name for f in dataclasses.fields(CSReftConfig)} - {"format_version", "layers", "positions"}


def parse_methods(spec) -> list[Method]:
    """"base,loreft,csreft[gating=hard,sparsity_weight=0.01]" or "all" -> Methods (in order).

    Raises ValueError naming the method, the key or the value that is not allowed."""
    if isinstance(spec, (list, tuple)):
        spec = ",".join(spec)
    spec = spec.replace(" ", "")
    items = re.findall(r"[^,\[\]]+(?:\[[^\]]*\])?", spec)
    if ",".join(items) != spec or not items:
        raise ValueError(f"--methods {spec!r}: expected names such as csreft or csreft[key=value,...], "
                         "separated by commas")
    methods = []
    for item in items:
        if item == "all":
            methods += [Method(m, m) for m in METHODS]
            continue
        kind, _, body = item.partition("[")
        if kind not in KINDS:
            raise ValueError(f"--methods: unknown method {kind!r}; allowed: {', '.join(KINDS)} or all")
        overrides = {}
        for pair in filter(None, body.rstrip("]").split(",")):
            key, eq, value = pair.partition("=")
            if not eq:
                raise ValueError(f"--methods {item}: {pair!r} is not key=value")
            allowed = {"lr"} | (_CONFIG_FIELDS if kind in ROUTED else {"rank"} if kind in SINGLE_EDIT else set())
            if key not in allowed:
                raise ValueError(f"--methods {item}: {key!r} cannot be set for {kind}; allowed: "
                                 f"{', '.join(sorted(allowed))}")
            overrides[key] = scalar(value)
        if "lr" in overrides and not (isinstance(overrides["lr"], (int, float)) and overrides["lr"] > 0):
            raise ValueError(f"--methods {item}: lr={overrides['lr']!r} must be a number > 0")
        if "rank" in overrides and kind in SINGLE_EDIT and not (isinstance(overrides["rank"], int) and overrides["rank"] >= 1):
            raise ValueError(f"--methods {item}: rank={overrides['rank']!r} must be an integer >= 1")
        if kind in ROUTED:
            try:
                CSReftConfig(**{k: v for k, v in overrides.items() if k != "lr"})
            except (TypeError, ValueError) as err:
                raise ValueError(f"--methods {item}: {err}") from None
        label = kind + (f"[{','.join(f'{k}={v}' for k, v in overrides.items())}]" if overrides else "")
        methods.append(Method(label, kind, overrides))
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--methods: {sorted({x for x in labels if labels.count(x) > 1})} given twice")
    return methods


def scalar(text: str):
    """A flag-style value: int, float (1e-3 too), true/false, none/null, else the string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    low = text.lower()
    return {"true": True, "false": False, "none": None, "null": None}.get(low, text)
