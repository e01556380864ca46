"""The Trainer subclass behind every csreft training run, and its logger.

transformers' Trainer brings gradient accumulation, schedulers, bf16, gradient checkpointing,
progress bars, resume with RNG state, and DDP / FSDP / DeepSpeed through accelerate.
CSReftTrainer changes only what an adapter needs: the loss (task + router terms, LM head only
at response tokens), what a checkpoint holds (adapter safetensors, not the base), atomic
checkpoints, router statistics in the logs, and a stop with a clear message on a non-finite loss.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..router import entropy, routing_nmi
from .distributed import adapter_part, full_adapter_state, mark_zero3_leaves, zero_stage
from .options import TrainingOptions
from .rundir import checkpoints, describe_checkpoint


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
        self._in_checkpoint = False  # _save writes a checkpoint's adapter (training form)
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
        if core.router is not None and out.probs is not None:  # routed (explicit gates have no probs)
            gates = out.gates.detach().float()
            mass = gates / gates.sum(-1, keepdim=True).clamp(min=1e-12)
            parts["gate_entropy"] = entropy(mass).mean()
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
            # a checkpoint keeps the tensors training moves, so a resume continues bit for bit
            core.write_adapter(output_dir, metadata, state, training=self._in_checkpoint)

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
        self.args.output_dir, self._in_checkpoint = staging, True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir, self._in_checkpoint = run_dir, False
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


def start_router(model, dataset, max_prompts: int = 512, seed: int = 0) -> dict | None:
    """router_init=kmeans: start the learned router at the k-means clusters of the first
    `max_prompts` training prompts (csreft.router.cluster_init). Runs before any engine wraps
    the model (the base runs up to the router's layer on each prompt, no gradient). Returns
    the cluster sizes, or None when there is nothing to do."""
    from ..router import Router, cluster_init
    from ..signatures import summaries_of

    if not model.csreft_config.router_init.startswith("kmeans") or not isinstance(model.router, Router):
        return None
    examples = [dataset[i] for i in range(min(len(dataset), max_prompts))]
    if len(examples) < model.csreft_config.num_subspaces:
        raise ValueError(f"router_init=kmeans: {len(examples)} training prompts for "
                         f"{model.csreft_config.num_subspaces} clusters; give more data or router_init=random")
    training = model.training
    model.eval()
    try:
        assign = cluster_init(model.router, summaries_of(model, examples, of="router"), seed=seed)
    finally:
        model.train(training)
    return {"prompts": len(examples), "cluster_sizes": torch.bincount(assign, minlength=model.router.mlp[-1].out_features).tolist()}


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


def training_arguments(opts: TrainingOptions | dict) -> TrainingArguments:
    """TrainingArguments from recipe options (TrainingOptions, or a dict of its fields)."""
    if isinstance(opts, TrainingOptions):
        opts = opts.to_dict()
    if not opts["deepspeed"] and not torch.cuda.is_available():
        # accelerate imports an installed DeepSpeed even when unused, and DeepSpeed then warns
        # that it found no GPU; its accelerator does not matter to a run without it
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
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
        **_cpu_arguments(opts["bf16"]),
    )


def _cpu_arguments(bf16: bool = False) -> dict:
    """Without CUDA: use_cpu for bf16 autocast on the CPU (Trainer refuses bf16 otherwise) and
    for several processes (torchrun / accelerate launch on CPUs: DDP over gloo)."""
    if torch.cuda.is_available():
        return {}
    if bf16:
        warnings.warn("--bf16 on the CPU runs the base under bfloat16 autocast (the edits stay float32); on a "
                      "2-core avx512_bf16 CPU with torch's CPU build a SmolLM2 step took 35x the float32 time "
                      "(docs/performance.md): time one step against float32 before a long run")
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return {**({"use_cpu": True} if bf16 or several else {}), **({"ddp_backend": "gloo"} if several else {})}


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None
