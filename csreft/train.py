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
from transformers import SchedulerType, Trainer, TrainerCallback, TrainerState, TrainingArguments, set_seed

from .config import CSReftConfig
from .data import Collator, SupervisedDataset, load_records, skill_names
from .distributed import adapter_part, full_adapter_state, mark_zero3_leaves, zero_stage
from .integrity import read_adapter_config
from .model import CSReftModel, get_csreft_model
from .rundir import (RunDirectoryError, RunLock, adapter_is_final, checkpoint_step, checkpoints, claim,
                     describe_checkpoint, fingerprint, is_main_process, resolve_resume, trim_log, verify_checkpoint)
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
    "overwrite": False,  # replace another run's checkpoints and adapter in output_dir
    "max_length": 512,
    "skill_routing": False,  # supervised routing loss from the records' skills
    "max_examples": None,
    "init_adapter": None,  # start from a saved adapter (e.g. a composed skill library)
    "train": "all",  # "all": edits and router; "router": the router alone, edits frozen
    "deepspeed": None,  # DeepSpeed config (JSON file): ZeRO-2 / ZeRO-3 (see csreft.distributed)
    "fsdp": None,  # FSDP options as TrainingArguments takes them, e.g. "full_shard auto_wrap"
    "fsdp_config": None,  # FSDP config (JSON file)
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
        if self.is_deepspeed_enabled:
            mark_zero3_leaves(self.model)
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
            found = checkpoints(self.args.output_dir)
            raise NonFiniteLossError(
                f"non-finite loss ({loss.item()}) at step {self.state.global_step + 1}; training "
                f"stopped. Last checkpoint: {describe_checkpoint(str(found[-1]) if found else None)}. "
                "Try a lower learning rate, bf16 off, or check the data."
            )
        return loss

    # -- checkpoints: adapter only, atomic -----------------------------------------------------
    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's whole tensors; a collective step under FSDP / ZeRO-3: every rank calls it."""
        core = self.accelerator.unwrap_model(self.model)
        if self.is_fsdp_enabled:
            return adapter_part(self.accelerator.get_state_dict(self.model), core)
        return full_adapter_state(core)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Every rank gathers the adapter (never the base: Trainer's own DeepSpeed path would
        consolidate the whole model), rank 0 writes it."""
        self._save(output_dir or self.args.output_dir, state_dict=self.adapter_state())

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Write the adapter; from `state_dict` when given (gathered by the engine: Trainer hands
        the full state dict under FSDP), else from the model's own tensors."""
        if self.args.should_save:
            core = self.accelerator.unwrap_model(self.model)
            state = adapter_part(state_dict, core) if state_dict else None
            os.makedirs(output_dir, exist_ok=True)
            metadata = {**self.adapter_metadata, "step": self.state.global_step}
            core.write_adapter(output_dir, metadata, state)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if zero_stage(self) is None:
            return super()._save_optimizer_and_scheduler(output_dir)
        # DeepSpeed's checkpoint would hold the frozen base too: keep the adapter's states only
        self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        if self.args.should_save and "DeepSpeed" not in type(self.lr_scheduler).__name__:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

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
            self._rotate_checkpoints_in(run_dir, target)
        self.accelerator.wait_for_everyone()

    def _rotate_checkpoints_in(self, run_dir: str, current: str) -> None:
        """Keep the newest save_total_limit checkpoints, never deleting the one just written."""
        limit = self.args.save_total_limit
        if not limit:
            return
        others = [p for p in checkpoints(run_dir) if str(p) != str(current)]
        for old in others[: max(len(others) - (limit - 1), 0)]:
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
        deepspeed=opts["deepspeed"],
        fsdp=opts["fsdp"],
        fsdp_config=opts["fsdp_config"],
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


def _check(opts: dict, name: str, ok, allowed: str, kind=(int, float)) -> None:
    value = opts[name]
    fine = isinstance(value, kind) and not isinstance(value, bool)
    if fine and isinstance(value, float):
        fine = math.isfinite(value)
    if not (fine and ok(value)):
        raise ValueError(f"--{name.replace('_', '-')} {value!r} is not valid: {allowed}")


def validate_options(opts: dict) -> None:
    """Refuse training options that cannot mean anything (ValueError naming option, value and
    what is allowed); CSReftConfig checks its own fields."""
    for name in ("batch_size", "grad_accum", "logging_steps"):
        _check(opts, name, lambda v: v >= 1, "an integer >= 1", int)
    _check(opts, "max_steps", lambda v: v == -1 or v >= 1, "an integer >= 1, or -1 (train for --epochs)", int)
    _check(opts, "epochs", lambda v: v > 0, "a number > 0")
    _check(opts, "lr", lambda v: v > 0, "a finite number > 0")
    for name in ("weight_decay", "warmup", "max_grad_norm"):
        _check(opts, name, lambda v: v >= 0, "a finite number >= 0")
    _check(opts, "save_steps", lambda v: v >= 0, "an integer >= 0 (0: no intermediate checkpoints)", int)
    _check(opts, "save_total_limit", lambda v: v >= 1, "an integer >= 1", int)
    _check(opts, "max_length", lambda v: v >= 2, "an integer >= 2", int)
    _check(opts, "seed", lambda v: v >= 0, "an integer >= 0", int)
    if opts["max_examples"] is not None:
        _check(opts, "max_examples", lambda v: v >= 1, "an integer >= 1", int)
    schedulers = [s.value for s in SchedulerType]
    if opts["scheduler"] not in schedulers:
        raise ValueError(f"--scheduler {opts['scheduler']!r} is not valid: one of {', '.join(schedulers)}")
    if opts["resume"] and opts["deepspeed"]:
        raise ValueError("--resume with --deepspeed is not supported: DeepSpeed checkpoints hold the "
                         "optimizer in its own format; restart the run, or resume it without --deepspeed")
    if opts["resume"] and opts["overwrite"]:
        raise ValueError("--resume and --overwrite contradict each other: continue the run, or replace it")


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
    fingerprint: dict | None = None
    lock: RunLock | None = None
    finished: bool = False  # resumed from a checkpoint at the last step: nothing left to train


def build(options: dict, callbacks: list | None = None) -> TrainingRun:
    """Load base and data, attach edits, and set up the trainer.

    `options` holds DEFAULTS keys and CSReftConfig fields (None means "default"). The main
    process holds OUTPUT_DIR's lock from here until fit() ends.
    """
    opts = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    if not opts["data"]:
        raise ValueError("no training data: give --data FILE (JSON or JSONL) or a dataset name")
    if opts["train"] not in ("all", "router"):
        raise ValueError(f"--train {opts['train']!r}: expected 'all' (edits and router) or 'router'")
    validate_options(opts)
    if opts["init_adapter"]:
        config = None  # the adapter's own (see _init_model)
    else:
        config = CSReftConfig(**{k: v for k, v in opts.items() if k in CSReftConfig.__dataclass_fields__})
    records = load_records(opts["data"])
    if opts["max_examples"]:
        records = records[: opts["max_examples"]]
    lock = RunLock(opts["output_dir"]).acquire() if is_main_process() else None
    try:
        return _build(opts, options, config, records, lock, callbacks)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _build(opts: dict, options: dict, config: CSReftConfig | None, records: list[dict], lock,
           callbacks) -> TrainingRun:
    from .base_models import DEFAULT_MODEL, load_base

    started_from = {"init_adapter": str(opts["init_adapter"]), "train": opts["train"]}
    run_id = fingerprint(config.to_dict() if config is not None else started_from, records, opts)
    if is_main_process():
        claim(opts["output_dir"], opts["resume"], opts["overwrite"])
    resume = resolve_resume(opts["resume"], opts["output_dir"])
    if resume:
        verify_checkpoint(resume, run_id)
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
    train_set = usable(SupervisedDataset(records, tokenizer, opts["max_length"], skills), opts["data"], opts)
    eval_set = None
    if opts["eval_data"]:
        eval_set = SupervisedDataset(load_records(opts["eval_data"]), tokenizer, opts["max_length"], skills)
        usable(eval_set, opts["eval_data"], opts)
    trainer = CSReftTrainer(
        model=model,
        args=training_arguments(opts),
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=Collator(tokenizer.pad_token_id, with_skills=opts["skill_routing"]),
        callbacks=[JsonlLogger(Path(opts["output_dir"]) / "log.jsonl"), *(callbacks or [])],
        adapter_metadata={**metadata, "skills": skills, "run": run_id,
                          "training": {"data": str(opts["data"]), "command": train_command(options)},
                          "skill_routing": opts["skill_routing"] or bool(metadata.get("skill_routing"))},
    )
    finished = bool(resume) and _past_the_end(trainer, resume)
    return TrainingRun(trainer, model, tokenizer, train_set, eval_set, config, opts, skills, resume, run_id,
                       lock, finished)


def train_command(options: dict) -> str:
    """The `csreft train` command line that runs these options (for the model card)."""
    import shlex

    parts = ["csreft", "train"]
    for name, value in options.items():
        if value is None or name in ("resume", "overwrite"):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        else:
            parts += [flag, ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
    return shlex.join(parts)


def usable(dataset: SupervisedDataset, source: str, opts: dict) -> SupervisedDataset:
    """The dataset, unless truncation left it empty (a clear error instead of 0 samples)."""
    if len(dataset) == 0:
        raise ValueError(
            f"{source}: all {dataset.dropped} records were dropped: each prompt alone fills "
            f"--max-length {opts['max_length']} tokens; raise --max-length or shorten the prompts"
        )
    return dataset


def _past_the_end(trainer: CSReftTrainer, resume: str) -> bool:
    """Whether the checkpoint is at this run's last step (nothing to train); refuses one past it."""
    args = trainer.args
    planned = args.max_steps if args.max_steps > 0 else trainer.set_initial_training_values(
        args, trainer.get_train_dataloader())[-1]
    step = checkpoint_step(Path(resume))
    if step > planned:
        raise RunDirectoryError(
            f"--resume {resume}: the checkpoint is at step {step}, past this run's last step "
            f"{planned}; give --max-steps {step} or more, or resume an earlier checkpoint"
        )
    return step == planned


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
    meta = read_adapter_config(directory).get("metadata") or {}
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
    """Train, save OUTPUT_DIR/adapter, and return the summary (also OUTPUT_DIR/summary.json);
    releases the run directory's lock when done or failed."""
    try:
        return _fit(run)
    finally:
        if run.lock is not None:
            run.lock.release()


def _fit(run: TrainingRun) -> dict:
    trainer, model, opts = run.trainer, run.model, run.options
    started = time.time()
    if run.resume and is_main_process():
        trim_log(opts["output_dir"], checkpoint_step(Path(run.resume)))
    if run.finished:  # checkpoint at the last step: no training, the checkpoint's weights
        trainer._load_from_checkpoint(run.resume)
        trainer.state = TrainerState.load_from_json(str(Path(run.resume) / "trainer_state.json"))
        result = trainer.state
        print(f"{run.resume} is at the last step ({result.global_step}); nothing left to train")
    else:
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
    state = trainer.adapter_state()  # collective under FSDP / ZeRO-3: every rank gathers, rank 0 writes
    if trainer.is_world_process_zero():
        if run.finished and adapter_is_final(opts["output_dir"], run.fingerprint, result.global_step):
            summary["adapter_kept"] = True  # already saved by the run that reached this step
        else:
            model.save_pretrained(adapter_dir, metadata={**trainer.adapter_metadata, "step": result.global_step},
                                  state=state)
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
