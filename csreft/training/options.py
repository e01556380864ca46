"""TrainingOptions: what a training run does besides the adapter's shape (CSReftConfig).

Each field carries its help text (`csreft train --help` prints it) and is checked in
`__post_init__`: a ValueError names the flag, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..config import CSReftConfig

TRAIN_PARTS = ("all", "router")
TRAIN_GATES = ("router", "skills")


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainingOptions:
    _argument_group_name = "training"  # the group of these flags in --help

    model: str | None = _opt(None, "base model: Hub id, local path, or the embedded SmolLM2-135M-Instruct (default)")
    data: str | None = _opt(None, "training data: JSON / JSONL file (alpaca, prompt/response or chat records)")
    eval_data: str | None = _opt(None, "evaluation data, same formats (eval loss at each checkpoint, or per epoch)")
    output_dir: str = _opt("runs/csreft", "where checkpoints, log.jsonl, summary.json and OUTPUT_DIR/adapter go")
    max_steps: int = _opt(-1, "optimizer steps; -1: train for --epochs")
    epochs: float = _opt(1.0, "passes over the data when --max-steps is -1")
    batch_size: int = _opt(8, "examples per device and step")
    grad_accum: int = _opt(1, "gradient accumulation steps")
    lr: float = _opt(2e-3, "peak learning rate (AdamW)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    warmup: float = _opt(0.0, "warmup steps, or a fraction (< 1) of all steps")
    scheduler: str = _opt("linear", "learning-rate schedule (transformers' SchedulerType: linear, cosine, constant, ...)")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm")
    seed: int = _opt(42, "seed of the edits' initial values and the data order")
    bf16: bool = _opt(False, "bfloat16 mixed precision (edits and router stay float32)")
    gradient_checkpointing: bool = _opt(False, "recompute the base's activations in the backward pass")
    logging_steps: int = _opt(10, "log loss and router statistics every N steps")
    save_steps: int = _opt(0, "checkpoint every N steps (0: only the final adapter)")
    save_total_limit: int = _opt(2, "how many checkpoints are kept (the newest)")
    resume: str | None = _opt(None, "continue from the latest checkpoint in OUTPUT_DIR, or from DIR (it must be "
                              "this run's)", nargs="?", const="latest", metavar="latest|DIR")
    overwrite: bool = _opt(False, "replace the checkpoints and adapter of an earlier run in OUTPUT_DIR")
    max_length: int = _opt(512, "tokens per example; longer responses are truncated")
    skill_routing: bool = _opt(False, "add the supervised routing loss from the records' 'skill' fields")
    train_gates: str = _opt("router", "what gates the edits in training: the router, or each record's skills "
                            "('skill' / 'skills': gate 1 on their subspaces, 0 elsewhere; no router is trained, "
                            "for skills composed by explicit gates or a router trained afterwards)",
                            choices=TRAIN_GATES)
    gate_dropin: float = _opt(0.0, "with --train-gates skills: the chance that each other subspace is also on for "
                              "an example, at a factor from --dropin-factors, its target unchanged (composable "
                              "training: other skills' edits, added or subtracted, are in-distribution)")
    dropin_factors: str = _opt("-1,1", "the gates a dropped-in subspace gets, drawn uniformly", metavar="G,G,...")
    max_examples: int | None = _opt(None, "use only the first N records of --data")
    init_adapter: str | None = _opt(None, "start from this adapter (e.g. a composed skill library) instead of fresh edits")
    train: str = _opt("all", "what to train: all (edits and router) or router (edits frozen, bit-identical)",
                      choices=TRAIN_PARTS)
    deepspeed: str | None = _opt(None, "DeepSpeed config (JSON file): ZeRO-2 / ZeRO-3 (docs/integrations.md)")
    fsdp: str | None = _opt(None, "FSDP options as TrainingArguments takes them, e.g. 'full_shard auto_wrap'")
    fsdp_config: str | None = _opt(None, "FSDP config (JSON file)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse options that cannot mean anything (CSReftConfig checks its own fields)."""
        from transformers import SchedulerType

        for name in ("batch_size", "grad_accum", "logging_steps", "save_total_limit"):
            self._check(name, lambda v: v >= 1, "an integer >= 1", int)
        self._check("max_steps", lambda v: v == -1 or v >= 1, "an integer >= 1, or -1 (train for --epochs)", int)
        self._check("epochs", lambda v: v > 0, "a number > 0")
        self._check("lr", lambda v: v > 0, "a finite number > 0")
        for name in ("weight_decay", "warmup", "max_grad_norm"):
            self._check(name, lambda v: v >= 0, "a finite number >= 0")
        self._check("save_steps", lambda v: v >= 0, "an integer >= 0 (0: no intermediate checkpoints)", int)
        self._check("max_length", lambda v: v >= 2, "an integer >= 2", int)
        self._check("seed", lambda v: v >= 0, "an integer >= 0", int)
        if self.max_examples is not None:
            self._check("max_examples", lambda v: v >= 1, "an integer >= 1", int)
        schedulers = [s.value for s in SchedulerType]
        if self.scheduler not in schedulers:
            raise ValueError(f"--scheduler {self.scheduler!r} is not valid: one of {', '.join(schedulers)}")
        if self.train_gates not in TRAIN_GATES:
            raise ValueError(f"--train-gates {self.train_gates!r}: expected 'router' or 'skills'")
        self._check("gate_dropin", lambda v: 0 <= v <= 1, "a number in [0, 1]")
        if self.gate_dropin and self.train_gates != "skills":
            raise ValueError("--gate-dropin needs --train-gates skills (it drops other skills' gates in)")
        dropin_factors(self.dropin_factors)
        if self.train_gates == "skills" and (self.skill_routing or self.train == "router"):
            raise ValueError("--train-gates skills trains the edits under explicit gates and no router; train a "
                             "router afterwards: --init-adapter DIR --train router --skill-routing")
        if self.train not in TRAIN_PARTS:
            raise ValueError(f"--train {self.train!r}: expected 'all' (edits and router) or 'router'")
        if self.resume and self.deepspeed:
            raise ValueError("--resume with --deepspeed is not supported: DeepSpeed checkpoints hold the "
                             "optimizer in its own format; restart the run, or resume it without --deepspeed")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: continue the run, or replace it")

    def _check(self, name: str, ok, allowed: str, kind=(int, float)) -> None:
        value = getattr(self, name)
        fine = isinstance(value, kind) and not isinstance(value, bool)
        if fine and isinstance(value, float):
            fine = math.isfinite(value)
        if not (fine and ok(value)):
            raise ValueError(f"--{name.replace('_', '-')} {value!r} is not valid: {allowed}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def dropin_factors(text: str) -> list[float]:
    """--dropin-factors as numbers: "-1,1" -> [-1.0, 1.0]."""
    try:
        factors = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        factors = []
    if not factors or not all(math.isfinite(f) for f in factors):
        raise ValueError(f"--dropin-factors {text!r} is not valid: comma-separated finite numbers such as -1,1")
    return factors


TRAINING_FIELDS = tuple(f.name for f in dataclasses.fields(TrainingOptions))
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(CSReftConfig) if f.name != "format_version")
DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainingOptions)}  # the recipe's defaults by name


def split_options(options: dict) -> tuple[TrainingOptions, dict]:
    """(TrainingOptions, CSReftConfig fields given) from one mapping of both kinds; None means
    "the default". An unknown name is an error that lists the known ones."""
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - set(TRAINING_FIELDS) - set(CONFIG_FIELDS))
    if unknown:
        raise ValueError(f"unknown training option(s) {unknown}; known: training options "
                         f"{', '.join(TRAINING_FIELDS)} and CSReftConfig fields {', '.join(CONFIG_FIELDS)}")
    training = TrainingOptions(**{k: v for k, v in given.items() if k in TRAINING_FIELDS})
    return training, {k: v for k, v in given.items() if k in CONFIG_FIELDS}
