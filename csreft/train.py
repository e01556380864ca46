"""Joint training of edits and router on a frozen base, on top of transformers' Trainer.

Trainer brings gradient accumulation, schedulers, bf16, gradient checkpointing, progress bars,
resume with RNG state, and DDP / FSDP / DeepSpeed through accelerate. CSReftTrainer changes
only what an adapter needs: the loss (task + router terms, LM head only at response tokens),
what a checkpoint holds (adapter safetensors, not the base), atomic checkpoints, router
statistics in the logs, and a stop with a clear message on a non-finite loss.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from .config import CSReftConfig
from .data import Collator, SupervisedDataset, load_records, skill_names
from .model import CSReftModel, get_csreft_model
from .routing import routing_nmi

# Options of the training recipe and their defaults (CLI flags use dashes).
DEFAULTS = {
    "model": None,  # None: csreft.DEFAULT_MODEL
    "data": None,
    "eval_data": None,
    "output_dir": "runs/csreft",
    "max_steps": -1,
    "epochs": 1.0,
    "batch_size": 8,
    "grad_accum": 1,
    "lr": 2e-3,
    "weight_decay": 0.0,
    "warmup": 0.0,  # steps, or a fraction (< 1) of all steps
    "scheduler": "linear",
    "max_grad_norm": 1.0,
    "seed": 42,
    "bf16": False,
    "gradient_checkpointing": False,
    "logging_steps": 10,
    "save_steps": 0,  # 0: no intermediate checkpoints
    "save_total_limit": 2,
    "resume": None,  # "latest" or a checkpoint directory
    "max_length": 512,
    "skill_routing": False,  # supervised routing loss from the records' skills
    "max_examples": None,
    "init_adapter": None,  # start from a saved adapter (e.g. a composed skill library)
    "train": "all",  # "all": edits and router; "router": the router alone, edits frozen
}
# config fields that --init-adapter lets a run change: they shape no parameter
INIT_OVERRIDABLE = ("sparsity_weight", "balance_weight", "routing_loss_weight", "gating", "threshold", "top_k")


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss was NaN or infinite."""


class OrderedTrainer(Trainer):
    """Trainer that can keep the dataset's order (shuffle=False), so that runs compared with
    each other see exactly the same examples in the same order, and that logs the mean of the
    per-step statistics given to add_stats (loss parts, router statistics) next to the loss."""

    def __init__(self, *args, shuffle: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.shuffle = shuffle
        self._stats: dict[str, torch.Tensor] = {}
        self._stats_n = 0

    def _get_train_sampler(self, *args, **kwargs):
        if self.shuffle:
            return super()._get_train_sampler(*args, **kwargs)
        return torch.utils.data.SequentialSampler(self.train_dataset)

    def add_stats(self, parts: dict) -> None:
        """Add one step's statistics (scalars, or a vector logged as name_0, name_1, ...)."""
        for name, value in parts.items():
            if value is not None:
                self._stats[name] = self._stats.get(name, 0) + value.detach()
        self._stats_n += 1

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if self._stats_n and "loss" in logs:
            for name, total in self._stats.items():
                mean = total / self._stats_n
                if mean.dim() == 0:
                    logs[name] = round(mean.item(), 5)
                else:
                    logs.update({f"{name}_{i}": round(v, 4) for i, v in enumerate(mean.tolist())})
            self._stats, self._stats_n = {}, 0
        super().log(logs, start_time)


def answer_loss(token_losses: torch.Tensor, labels: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Mean loss on the answer tokens alone. token_losses: (N,) over the labelled targets
    labels[:, 1:] != -100 in row-major order; answer_mask: (B, L), 1 on answer tokens."""
    on_answer = answer_mask[:, 1:][labels[:, 1:] != -100].bool()
    return (token_losses * on_answer).sum() / on_answer.sum().clamp(min=1)


class CSReftTrainer(OrderedTrainer):
    """Trainer for a CSReftModel; see the module docstring."""

    loss_is_scaled_for_ga = False  # our loss is a per-batch mean

    def __init__(self, *args, adapter_metadata: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.adapter_metadata = adapter_metadata or {}
        self.tokens_seen = 0  # becomes a tensor on the training device (no per-step sync)
        self._routed: list[tuple[torch.Tensor, torch.Tensor]] = []  # (gates, skills) since the last log

    # -- loss and statistics -------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        answer_mask = inputs.pop("answer_mask", None)
        skills = inputs.pop("skill_ids", inputs.get("skill_labels"))
        out = model(**inputs, full_logits=False)
        if model.training:
            self._accumulate(out, inputs, answer_mask, skills)
        return (out.loss, out) if return_outputs else out.loss

    def _accumulate(self, out, inputs, answer_mask=None, skills=None) -> None:
        parts = {"task_loss": out.task_loss, "sparsity_loss": out.sparsity_loss, "routing_loss": out.routing_loss,
                 "balance_loss": out.balance_loss}
        if answer_mask is not None:  # loss on the answer tokens alone (format tokens are learnt fast)
            parts["answer_loss"] = answer_loss(out.token_losses, inputs["labels"], answer_mask)
        core = self.accelerator.unwrap_model(self.model)
        if core.router is not None:
            gates = out.gates.detach().float()
            mass = gates / gates.sum(-1, keepdim=True).clamp(min=1e-12)
            parts["gate_entropy"] = -(mass * mass.clamp(min=1e-12).log()).sum(-1).mean()
            parts["gate_active_frac"] = (out.probs.detach() >= core.csreft_config.threshold).float().mean()
            parts["gate_mean"] = gates.mean(0)
            if skills is not None:
                self._routed.append((gates.cpu(), skills.detach().cpu()))
        self.add_stats(parts)
        self.tokens_seen = self.tokens_seen + inputs["attention_mask"].sum()

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """Adds routing_nmi / routing_soft_nmi: how much this window's gates say about the skill."""
        if self._routed and "loss" in logs:
            gates = torch.cat([g for g, _ in self._routed])
            skills = torch.cat([s for _, s in self._routed]).tolist()
            scores = routing_nmi(gates, skills)
            logs["routing_nmi"], logs["routing_soft_nmi"] = round(scores["nmi"], 4), round(scores["soft_nmi"], 4)
            self._routed = []
        super().log(logs, start_time)

    def _set_progress(self, value: float) -> None:
        router = self.accelerator.unwrap_model(self.model).router
        if router is not None:
            router.progress = min(max(float(value), 0.0), 1.0)

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self._set_progress(1.0)  # annealed gates are hard after training

    def training_step(self, model, inputs, num_items_in_batch=None):
        # annealed gating: a rises from 0 (first step) to 1 (last step); a function of the
        # step alone, so a resumed run anneals exactly like an uninterrupted one
        self._set_progress(self.state.global_step / max(self.state.max_steps - 1, 1))
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss):
            last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at step {self.state.global_step + 1}; training "
                f"stopped. Last good checkpoint: {last or 'none'} (intact). Try a lower learning "
                "rate, bf16 off, or check the data."
            )
        return loss

    # -- checkpoints: adapter only, atomic -----------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            self.accelerator.unwrap_model(self.model).write_adapter(output_dir, self.adapter_metadata)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        (model or self.accelerator.unwrap_model(self.model)).load_adapter_weights(resume_from_checkpoint)

    def _save_checkpoint(self, model, trial) -> None:
        """Write the checkpoint into a staging folder, then rename it into place."""
        run_dir = self.args.output_dir
        staging = os.path.join(run_dir, ".staging")
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.args.output_dir = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = run_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            name = f"checkpoint-{self.state.global_step}"
            target = os.path.join(run_dir, name)
            if os.path.exists(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging, name), target)
            shutil.rmtree(staging, ignore_errors=True)
            self._rotate_checkpoints_in(run_dir)
        self.accelerator.wait_for_everyone()

    def _rotate_checkpoints_in(self, run_dir: str) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        found = sorted(Path(run_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        for old in found[:-limit]:
            shutil.rmtree(old, ignore_errors=True)


class JsonlLogger(TrainerCallback):
    """Appends every log record (with its step) to OUTPUT_DIR/log.jsonl on the main process."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


# transformers 5.x renamed gradient_checkpointing to activation_checkpointing
_CHECKPOINTING = (
    "activation_checkpointing"
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing"
)


def training_arguments(opts: dict) -> TrainingArguments:
    """TrainingArguments from recipe options (see DEFAULTS)."""
    report_to = ["tensorboard"] if _has_tensorboard() else "none"
    return TrainingArguments(
        output_dir=opts["output_dir"],
        max_steps=opts["max_steps"] if opts["max_steps"] is not None else -1,
        num_train_epochs=opts["epochs"],
        per_device_train_batch_size=opts["batch_size"],
        per_device_eval_batch_size=opts["batch_size"],
        gradient_accumulation_steps=opts["grad_accum"],
        learning_rate=opts["lr"],
        weight_decay=opts["weight_decay"],
        warmup_steps=opts["warmup"],
        lr_scheduler_type=opts["scheduler"],
        max_grad_norm=opts["max_grad_norm"],
        seed=opts["seed"],
        bf16=opts["bf16"],
        **{_CHECKPOINTING: opts["gradient_checkpointing"], f"{_CHECKPOINTING}_kwargs": {"use_reentrant": False}},
        logging_steps=opts["logging_steps"],
        save_strategy="steps" if opts["save_steps"] else "no",
        save_steps=opts["save_steps"] or 500,
        save_total_limit=opts["save_total_limit"],
        eval_strategy="steps" if opts["eval_data"] and opts["save_steps"] else ("epoch" if opts["eval_data"] else "no"),
        eval_steps=opts["save_steps"] or None,
        remove_unused_columns=False,
        prediction_loss_only=True,
        label_names=["labels"],
        report_to=report_to,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=False,  # every edit and the router take part in each step
        **_cpu_multiprocess_arguments(),
    )


def _cpu_multiprocess_arguments() -> dict:
    """Several processes without CUDA (torchrun / accelerate launch on CPUs): DDP over gloo."""
    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return {}
    return {"use_cpu": True, "ddp_backend": "gloo"}


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """"latest" -> newest OUTPUT_DIR/checkpoint-N (error if none); a path -> itself."""
    if not resume:
        return None
    if resume == "latest":
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if last is None:
            raise FileNotFoundError(f"--resume latest: no checkpoint-N directory in {output_dir}")
        return last
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint directory")
    return resume


@dataclass
class TrainingRun:
    """Everything a training run is made of; `build` makes it, `fit` runs it."""

    trainer: CSReftTrainer
    model: CSReftModel
    tokenizer: object
    train_set: SupervisedDataset
    eval_set: SupervisedDataset | None
    config: CSReftConfig
    options: dict
    skills: list[str]
    resume: str | None


def build(options: dict, callbacks: list | None = None) -> TrainingRun:
    """Load base and data, attach edits, and set up the trainer.

    `options` holds DEFAULTS keys and CSReftConfig fields (None means "default").
    """
    from .base_models import DEFAULT_MODEL, load_base

    opts = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    if not opts["data"]:
        raise ValueError("no training data: give --data FILE (JSON or JSONL) or a dataset name")
    if opts["train"] not in ("all", "router"):
        raise ValueError(f"--train {opts['train']!r}: expected 'all' (edits and router) or 'router'")
    if opts["init_adapter"]:
        config = None  # the adapter's own (see _init_model)
    else:
        config = CSReftConfig(**{k: v for k, v in opts.items() if k in CSReftConfig.__dataclass_fields__})
    resume = resolve_resume(opts["resume"], opts["output_dir"])

    records = load_records(opts["data"])
    if opts["max_examples"]:
        records = records[: opts["max_examples"]]
    skills = skill_names(records)
    if opts["skill_routing"] and not skills:
        raise ValueError(f"--skill-routing: no record in {opts['data']} has a 'skill' field")
    if config is not None:
        _check_skill_count(opts, skills, config)
    base, tokenizer = load_base(opts["model"] or DEFAULT_MODEL)
    set_seed(opts["seed"])  # the adapter's initial values depend on the seed only
    metadata = {}
    if opts["init_adapter"]:
        model, metadata, skills = _init_model(base, opts, options, records, skills)
        config = model.csreft_config
        _check_skill_count(opts, skills, config)
    else:
        model = get_csreft_model(base, config)
    if opts["train"] == "router":
        if model.router is None:
            raise ValueError("--train router: this adapter has no router (use_router=False)")
        model.edits.requires_grad_(False)
    train_set = SupervisedDataset(records, tokenizer, opts["max_length"], skills)
    eval_set = None
    if opts["eval_data"]:
        eval_set = SupervisedDataset(load_records(opts["eval_data"]), tokenizer, opts["max_length"], skills)
    trainer = CSReftTrainer(
        model=model,
        args=training_arguments(opts),
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=Collator(tokenizer.pad_token_id, with_skills=opts["skill_routing"]),
        callbacks=[JsonlLogger(Path(opts["output_dir"]) / "log.jsonl"), *(callbacks or [])],
        adapter_metadata={**metadata, "skills": skills,
                          "skill_routing": opts["skill_routing"] or bool(metadata.get("skill_routing"))},
    )
    return TrainingRun(trainer, model, tokenizer, train_set, eval_set, config, opts, skills, resume)


def _check_skill_count(opts: dict, skills: list[str], config: CSReftConfig) -> None:
    if opts["skill_routing"] and len(skills) > config.num_subspaces:
        raise ValueError(
            f"--skill-routing: {len(skills)} skills ({', '.join(skills)}) but num_subspaces="
            f"{config.num_subspaces}; each skill needs its own subspace"
        )


def _init_model(base, opts: dict, options: dict, records: list[dict], skills: list[str]):
    """(model, its metadata, skill list) from opts["init_adapter"]; only the config fields in
    INIT_OVERRIDABLE may be changed by the run's options."""
    directory = Path(opts["init_adapter"])
    model = CSReftModel.from_pretrained(base, directory).train()
    meta = json.loads((directory / "adapter_config.json").read_text()).get("metadata") or {}
    given = {k: v for k, v in options.items() if v is not None and k in CSReftConfig.__dataclass_fields__}
    fixed = sorted(set(given) - set(INIT_OVERRIDABLE))
    if fixed:
        raise ValueError(f"--init-adapter {directory}: {', '.join(fixed)} come(s) from the adapter; only "
                         f"{', '.join(INIT_OVERRIDABLE)} may be changed")
    for name, value in given.items():
        setattr(model.csreft_config, name, value)
        if model.router is not None and hasattr(model.router, name):
            setattr(model.router, name, value)
    model.csreft_config.validate()
    if model.skill_names is not None:
        if opts["skill_routing"]:
            unknown = sorted({r["skill"] for r in records if r.get("skill")} - set(model.skill_names))
            if unknown:
                raise ValueError(f"--skill-routing: skill(s) {unknown} of {opts['data']} are not among the "
                                 f"adapter's skills ({', '.join(model.skill_names)})")
        skills = list(model.skill_names)
    return model, {**meta, "init_adapter": str(directory)}, skills


def fit(run: TrainingRun) -> dict:
    """Train, save OUTPUT_DIR/adapter, and return the summary (also OUTPUT_DIR/summary.json)."""
    trainer, model, opts = run.trainer, run.model, run.options
    started = time.time()
    result = trainer.train(resume_from_checkpoint=run.resume)
    wall = time.time() - started
    adapter_dir = Path(opts["output_dir"]) / "adapter"
    counts = model.trainable_parameters()
    history = [h for h in trainer.state.log_history if "loss" in h]
    world = trainer.accelerator.num_processes
    summary = {
        "steps": result.global_step,
        "examples": len(run.train_set),
        "examples_seen": result.global_step * opts["batch_size"] * opts["grad_accum"] * world,
        "truncated": run.train_set.truncated,
        "dropped": run.train_set.dropped,
        "tokens_per_second": round(float(trainer.tokens_seen) * world / max(wall, 1e-9), 1),
        "wall_seconds": round(wall, 1),
        "first_loss": history[0]["loss"] if history else None,
        "final_loss": history[-1]["loss"] if history else None,
        "final_losses": {k: v for k, v in (history[-1] if history else {}).items() if k.endswith("loss")},
        "trainable_parameters": counts["total"],
        "edit_parameters": counts["edits"],
        "router_parameters": counts["router"],
        "percent_of_base": counts["percent"],
        "skills": run.skills,
        "adapter": str(adapter_dir),
        "config": run.config.to_dict(),
        "options": {k: v for k, v in opts.items() if k not in CSReftConfig.__dataclass_fields__},
    }
    if run.eval_set is not None:
        summary["eval_loss"] = trainer.evaluate().get("eval_loss")
    if trainer.is_world_process_zero():
        model.save_pretrained(adapter_dir, metadata=trainer.adapter_metadata)
        (Path(opts["output_dir"]) / "summary.json").write_text(json.dumps(summary, indent=2))
        print_summary(summary)
    return summary


def run(options: dict, callbacks: list | None = None) -> dict:
    """The whole recipe: build(options) then fit()."""
    return fit(build(options, callbacks))


def print_summary(s: dict) -> None:
    def fmt(x):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"

    print(
        f"\ntraining done: {s['steps']} steps, {s['examples_seen']} examples seen "
        f"({s['examples']} in the data; {s['truncated']} truncated, {s['dropped']} dropped), "
        f"{s['tokens_per_second']} tokens/s, {s['wall_seconds']} s\n"
        f"loss: first logged {fmt(s['first_loss'])} -> final {fmt(s['final_loss'])}"
        + (f" | eval {fmt(s['eval_loss'])}" if "eval_loss" in s else "")
        + f"\ntrainable parameters: {s['trainable_parameters']:,} (edits {s['edit_parameters']:,}, "
        f"router {s['router_parameters']:,}) = {s['percent_of_base']:.4f}% of the base\n"
        f"adapter saved to {s['adapter']}"
    )
