"""The training recipe: build (base, data, edits, trainer) then fit (train, save, summary).

Options are TrainingOptions (training/options.py) and CSReftConfig fields in one mapping, as
`csreft train` flags and --config files give them; see trainer.py for what the Trainer does.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerState, set_seed

from ..config import CSReftConfig
from ..data import Collator, SupervisedDataset, load_records, skill_names
from ..integrity import read_adapter_config
from ..model import CSReftModel, get_csreft_model
from ..signatures import signatures_of
from .distributed import end_process_group, single_process_launch
from .options import dropin_factors, split_options
from .rundir import (RunDirectoryError, RunLock, adapter_is_final, checkpoint_step, claim, fingerprint,
                     is_main_process, resolve_resume, trim_log, verify_checkpoint)
from .trainer import CSReftTrainer, JsonlLogger, start_router, training_arguments

# config fields that --init-adapter lets a run change: they shape no parameter
INIT_OVERRIDABLE = ("sparsity_weight", "balance_weight", "routing_loss_weight", "gating", "threshold", "top_k",
                    "router_init")




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

    `options` holds TrainingOptions and CSReftConfig fields (None means "default"). The main
    process holds OUTPUT_DIR's lock from here until fit() ends.
    """
    training, config_fields = split_options(options)
    opts = training.to_dict()
    lone = single_process_launch()
    if lone:  # never a silent single process
        raise ValueError(lone)
    if not opts["data"]:
        raise ValueError("no training data: give --data FILE (JSON or JSONL) or a dataset name")
    # with --init-adapter, the adapter's own config (see _init_model)
    config = None if opts["init_adapter"] else CSReftConfig(**config_fields)
    records = load_records(opts["data"])
    if opts["max_examples"]:
        records = records[: opts["max_examples"]]
    lock = RunLock(opts["output_dir"]).acquire() if is_main_process() else None
    try:
        return _build(opts, options, config_fields, config, records, lock, callbacks)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _build(opts: dict, options: dict, config_fields: dict, config: CSReftConfig | None, records: list[dict], lock,
           callbacks) -> TrainingRun:
    from ..base_models import DEFAULT_MODEL, load_base

    started_from = {"init_adapter": str(opts["init_adapter"]), "train": opts["train"]}
    if opts["init_adapter"]:  # its contents, not only its path: a library replaced there is another run
        init = read_adapter_config(opts["init_adapter"])
        started_from["init_weights"] = init.get("weights_sha256")
        started_from["init_config"] = init["csreft_config"]
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
        model, metadata, skills = _init_model(base, opts, config_fields, records, skills)
        config = model.csreft_config
        _check_skill_count(opts, skills, config)
    else:
        model = get_csreft_model(base, config)
    if opts["train"] == "router":
        if model.router is None:
            raise ValueError("--train router: this adapter has no router (use_router=False)")
        if model.csreft_config.routing != "learned":
            raise ValueError(f"--train router: this library routes by {model.csreft_config.routing}, which has "
                             "nothing to train; compose it with --routing learned to train a router")
        model.edits.requires_grad_(False)
    train_set = usable(SupervisedDataset(records, tokenizer, opts["max_length"], skills), opts["data"], opts)
    gated = opts["train_gates"] == "skills"
    if gated and model.router is not None:  # it never runs: no gradient (DDP would wait for one)
        model.router.requires_grad_(False)
    if gated:
        unlabelled = next((i for i, r in enumerate(records) if not (r.get("skills") or r.get("skill"))), None)
        if unlabelled is not None:
            raise ValueError(f"--train-gates skills: record {unlabelled + 1} of {opts['data']} has no "
                             "'skill' or 'skills' (each record's skills are its gates)")
    # a fresh router starts at its router_init; an --init-adapter's router is kept as trained
    # unless --router-init asks for a new start
    if not resume and (not opts["init_adapter"] or "router_init" in config_fields):
        clusters = start_router(model, train_set, seed=opts["seed"])
        if clusters:
            print(f"router started at the k-means clusters of {clusters['prompts']} training prompts: "
                  f"sizes {clusters['cluster_sizes']}")
    eval_set = None
    if opts["eval_data"]:
        eval_set = SupervisedDataset(load_records(opts["eval_data"]), tokenizer, opts["max_length"], skills)
        usable(eval_set, opts["eval_data"], opts)
    trainer = CSReftTrainer(
        model=model,
        args=training_arguments(opts),
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=Collator(tokenizer.pad_token_id, with_skills=opts["skill_routing"], gates_from_skills=gated,
                               k=model.csreft_config.num_subspaces, dropin=opts["gate_dropin"],
                               factors=dropin_factors(opts["dropin_factors"]),
                               seed=opts["seed"]),
        callbacks=[JsonlLogger(Path(opts["output_dir"]) / "log.jsonl"), *(callbacks or [])],
        adapter_metadata={**metadata, "skills": skills, "run": run_id,
                          "training": {"data": str(opts["data"]), "command": train_command(options)},
                          "skill_routing": opts["skill_routing"] or bool(metadata.get("skill_routing")),
                          **({"train_gates": "skills"} if gated or metadata.get("train_gates") == "skills" else {})},
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
    if (opts["skill_routing"] or opts["train_gates"] == "skills") and len(skills) > config.num_subspaces:
        raise ValueError(
            f"{'--skill-routing' if opts['skill_routing'] else '--train-gates skills'}: {len(skills)} skills "
            f"({', '.join(skills)}) but num_subspaces="
            f"{config.num_subspaces}; each skill needs its own subspace"
        )


def _init_model(base, opts: dict, given: dict, records: list[dict], skills: list[str]):
    """(model, its metadata, skill list) from opts["init_adapter"]; of the config fields
    `given`, only those in INIT_OVERRIDABLE may be changed."""
    directory = Path(opts["init_adapter"])
    model = CSReftModel.from_pretrained(base, directory).train()
    meta = read_adapter_config(directory).get("metadata") or {}
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
        "options": opts,
    }
    if run.eval_set is not None:
        summary["eval_loss"] = trainer.evaluate().get("eval_loss")
    summary["signatures"] = _attach_signatures(run)
    state = trainer.adapter_state()  # collective under FSDP / ZeRO-3: every rank gathers, rank 0 writes
    if trainer.is_world_process_zero():
        if run.finished and adapter_is_final(opts["output_dir"], run.fingerprint, result.global_step):
            summary["adapter_kept"] = True  # already saved by the run that reached this step
        else:
            model.save_pretrained(adapter_dir, metadata={**trainer.adapter_metadata, "step": result.global_step},
                                  state=state, overwrite=True)  # the run's own folder (claimed in build)
        (Path(opts["output_dir"]) / "summary.json").write_text(json.dumps(summary, indent=2))
        print_summary(summary)
    return summary


def _attach_signatures(run: TrainingRun) -> str:
    """Store each skill's signature in the adapter (csreft.signatures) from the training prompts,
    so that a library of it routes without training; returns what was done, for the summary."""
    trainer, model = run.trainer, run.model
    if trainer.accelerator.num_processes > 1 or trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        return "none: a sharded or multi-process run (compose with --calibration FILE instead)"
    examples = [run.train_set[i] for i in range(len(run.train_set))]
    if model.csreft_config.num_subspaces == 1:
        groups = [0] * len(examples)
    elif model.adapter_metadata.get("skill_routing") or run.trainer.adapter_metadata.get("skill_routing"):
        groups = [e["skill_label"] for e in examples]
    else:
        return "none: the subspaces are not tied to skills (train with --skill-routing for signatures)"
    training = model.training
    model.eval()
    try:
        model.set_signatures(signatures_of(model, examples, groups, run.tokenizer.pad_token_id),
                             {"prompts": [sum(g == j for g in groups) for j in range(model.csreft_config.num_subspaces)]})
    except ValueError as err:
        return f"none: {err}"
    finally:
        model.train(training)
    return f"stored: {len(examples)} training prompts at layer {model.signature_layer}"


def run(options: dict, callbacks: list | None = None) -> dict:
    """The whole recipe, as `csreft train` runs it: build(options), fit(), and, under a
    multi-process launcher, the process group ended once every rank has finished."""
    summary = fit(build(options, callbacks))
    end_process_group()
    return summary


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
