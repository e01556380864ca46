"""CompareOptions: what `csreft compare` and `csreft demo` run, each field with its help text
and checked in `__post_init__` (a ValueError names the flag, the value and what is allowed)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .methods import LR_GRID_LORA, LR_GRID_REFT, METHODS, parse_methods

EVAL_SPLITS = ("test", "validation")


def _opt(default, help: str, **extra):
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class CompareOptions:
    _argument_group_name = "comparison"  # the group of these flags in --help

    suite: str = _opt("builtin", "the multi-skill suite: builtin (generated), grid (generated tasks x styles, "
                      "held-out cells), classification, paraphrase (classification, 8 phrasings per task, 3 held out) "
                      "or commonsense (real data, see `csreft data`)")
    train: str | None = _opt(None, "your own training records (JSON / JSONL with 'skill'); with --test, replaces the suite")
    test: str | None = _opt(None, "your own test records, same format")
    methods: str = _opt(",".join(METHODS), "comma-separated methods: base, loreft, specialists, csreft, "
                        "csreft_supervised, lora, lora_edits or all; variants csreft[key=value,...] take "
                        "CSReftConfig fields and lr; loreft and specialists take rank (default k r) and lr", metavar="M,M[k=v],...")
    seeds: int = _opt(3, "seeds per method (paired tests pool them)")
    max_steps: int | None = _opt(100, "optimizer steps of each final run (with --max-minutes: at most this many)")
    max_minutes: float | None = _opt(None, "size the steps so that the whole comparison fits this many minutes")
    batch_size: int = _opt(8, "training batch size of the joint runs")
    specialist_batch_size: int | None = _opt(None, "batch size of each specialist (default: --batch-size: the "
                                             "same examples in 1/k of the steps)")
    lr: float | None = _opt(None, "one learning rate for every method (default: chosen per method on validation)")
    lr_grid_reft: list[float] = _opt(LR_GRID_REFT, "learning rates tried for the ReFT methods", metavar="LR,LR,...")
    lr_grid_lora: list[float] = _opt(LR_GRID_LORA, "learning rates tried for LoRA", metavar="LR,LR,...")
    select_steps: int | None = _opt(None, "steps of each learning-rate selection run (default: max_steps // 2)")
    val_per_skill: int = _opt(20, "validation records per skill, carved from the training pool")
    eval_split: str = _opt("test", "score the final runs on test, or on validation (for model selection)",
                           choices=EVAL_SPLITS)
    rank: int = _opt(4, "r of each CS-ReFT subspace (LoReFT gets k r, the same edit parameters)")
    num_subspaces: int | None = _opt(None, "k, the number of routed subspaces (default: one per skill)")
    layers: list[int] = _opt([3, 9, 18, 24], "edited decoder layers", metavar="L,L,...")
    positions: str = _opt("f7+l7", "edited prompt positions (fN, lN, fN+lN or all)")
    router_hidden: int | None = _opt(None, "router MLP width (default: CSReftConfig's, 128)")
    sparsity_weight: float | None = _opt(None, "weight of the gates' sparsity term (default: CSReftConfig's)")
    max_length: int = _opt(256, "tokens per training example")
    train_per_skill: int | None = _opt(100, "training records per skill (validation is carved from them)")
    test_per_skill: int | None = _opt(50, "test records per skill")
    composed: int = _opt(60, "held-out two-skill prompts of the builtin suite (grid: records of the test cells)")
    eval_every: int | None = _opt(None, "learning curves: score each final run on the validation split before "
                                  "training, every N steps and at the end (not the specialists); the report "
                                  "plots them and says where each method plateaus")
    eval_batch_size: int = _opt(16, "evaluation batch size")
    model: str | None = _opt(None, "the base model: Hub id or local path (default: the embedded SmolLM2-135M-Instruct)")
    output_dir: str = _opt("runs/compare", "where runs, report.json, report.md and gate heatmaps go")
    quiet: bool = _opt(False, "no stage lines")
    report_only: bool = _opt(False, "train nothing: the report of the runs already in --output-dir")

    def __post_init__(self) -> None:
        if isinstance(self.methods, (list, tuple)):
            self.methods = ",".join(self.methods)
        parse_methods(self.methods)  # names the method, key or value that is wrong
        if isinstance(self.layers, str):
            self.layers = [int(x) for x in self.layers.replace(";", ",").split(",") if x.strip()]
        self.layers = list(self.layers)
        for name in ("lr_grid_reft", "lr_grid_lora"):
            grid = tuple(float(x) for x in (getattr(self, name).split(",") if isinstance(getattr(self, name), str)
                                            else getattr(self, name)))
            if not grid or not all(math.isfinite(x) and x > 0 for x in grid):
                raise ValueError(f"--{name.replace('_', '-')}: give learning rates > 0, comma-separated")
            setattr(self, name, grid)
        for name in ("seeds", "batch_size", "eval_batch_size", "rank", "max_length"):
            self._at_least(name, 1)
        for name in ("max_steps", "specialist_batch_size", "select_steps", "num_subspaces", "train_per_skill",
                     "test_per_skill", "eval_every"):
            if getattr(self, name) is not None:
                self._at_least(name, 1)
        for name in ("val_per_skill", "composed"):
            self._at_least(name, 0)
        for name in ("lr", "max_minutes"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"--{name.replace('_', '-')} {value!r} is not valid: a number > 0")
        if self.eval_every is not None and self.val_per_skill < 1:
            raise ValueError("--eval-every needs validation records: --val-per-skill must be >= 1")
        if self.eval_split not in EVAL_SPLITS:
            raise ValueError(f"--eval-split {self.eval_split!r} is not valid: one of {', '.join(EVAL_SPLITS)}")

    def _at_least(self, name: str, low: int) -> None:
        value = getattr(self, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"--{name.replace('_', '-')} {value!r} is not valid: an integer >= {low}")
