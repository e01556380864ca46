"""Sharded training on CPU: DeepSpeed ZeRO-2/3 through the Trainer path (2 processes over gloo)
against a single process with the same data order, and FSDP2 (fully_shard) against the
unsharded model."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from csreft.integrity import basis_form

from test_train import options

TESTS = Path(__file__).parent
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed: pip install --no-build-isolation 'csreft[deepspeed]'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, *args, processes: int = 2) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(TESTS / script), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def zero_config(stage: int) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # partition every parameter, the edits' too
    return {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "zero_allow_untested_optimizer": True}


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def adapter(out: Path) -> dict:
    return load_file(out / "adapter" / "csreft_model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def off_by(a: dict, b: dict, tol: float) -> int:
    """How many entries differ by more than `tol`."""
    assert a.keys() == b.keys()
    return sum(int(((a[k] - b[k]).abs() > tol).sum()) for k in a)


def same_training(a: dict, b: dict) -> None:
    """Two runs' adapters agree to rounding: measured, every entry within 2.1e-7 but one of 384
    weights at 1.9e-5 (ZeRO-3) or 2.5e-6 (DDP, ZeRO-2), an entry whose gradient is near zero,
    where Adam's normalisation magnifies the ranks' other summation order (one thread each,
    against the single process's two)."""
    assert off_by(a, b, 1e-6) <= 2
    assert max_diff(a, b) <= 1e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """One single-process run (batch 3, 2 accumulation steps) and the same global batch of 6 over
    2 processes: DDP, ZeRO-2, ZeRO-3. Shuffled, so all see the same seeded order."""
    root = tmp_path_factory.mktemp("sharded")
    common = dict(max_steps=4, batch_size=3, logging_steps=1)
    from csreft.training.recipe import build, fit

    fit(build(options(root / "single", tiny_model_dir, grad_accum=2, **common)))
    outs = {"single": root / "single" / "out"}
    for name, stage in (("ddp", None), ("zero2", 2), ("zero3", 3)):
        if stage is not None and importlib.util.find_spec("deepspeed") is None:
            continue
        opts = options(root / name, tiny_model_dir, **common)
        if stage is not None:
            opts.update(save_steps=2, save_total_limit=5)
            (root / name / "ds.json").write_text(json.dumps(zero_config(stage)))
            opts["deepspeed"] = str(root / name / "ds.json")
        (root / name / "opts.json").write_text(json.dumps(opts))
        launch("ddp_worker.py", root / name / "opts.json")
        outs[name] = root / name / "out"
    return outs


@needs_deepspeed
@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_deepspeed_matches_single_process_and_ddp(runs, engine):
    out, single = runs[engine], runs["single"]
    assert losses(out) == pytest.approx(losses(runs["ddp"]), abs=1e-6)
    assert losses(out) == pytest.approx(losses(single), abs=1e-6)
    same_training(adapter(out), adapter(single))
    ranks = [load_file(out / f"rank{r}.safetensors") for r in (0, 1)]
    assert max_diff(ranks[0], ranks[1]) == 0.0
    assert max_diff(basis_form(ranks[0]), adapter(out)) == 0.0  # the saved adapter is the gathered one
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["examples_seen"] == 4 * 3 * 2
    # checkpoints hold the gathered adapter, and DeepSpeed's own states without the frozen base
    checkpoint = load_file(out / "checkpoint-4" / "csreft_model.safetensors")  # the training tensors
    assert max_diff(basis_form(checkpoint), adapter(out)) == 0.0
    engine_files = list((out / "checkpoint-4").glob("global_step4/*.pt"))
    assert engine_files and (out / "checkpoint-4" / "scheduler.pt").is_file()
    assert sum(p.stat().st_size for p in engine_files) < 300_000  # the base alone: 189k floats, 756 kB


@needs_deepspeed
def test_zero3_partitions_base_and_edits_and_counts_whole_sizes(runs):
    out = runs["zero3"]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["base_partitioned"] and r["edits_partitioned"] for r in reports)
    single = json.loads((runs["single"] / "summary.json").read_text())
    assert reports[0]["counts"]["total"] == single["trainable_parameters"]
    assert reports[0]["counts"]["percent"] == pytest.approx(single["percent_of_base"])
    for name, tensor in adapter(out).items():
        assert tensor.numel() > 0, name  # gathered on save: no (0,)-shaped tensors


def test_ddp_matches_single_process(runs):
    assert losses(runs["ddp"]) == losses(runs["single"])
    same_training(adapter(runs["ddp"]), adapter(runs["single"]))


def test_fsdp2_logits_and_gradients_equal_the_unsharded_model(tmp_path):
    launch("fsdp_worker.py", tmp_path)
    for rank in (0, 1):
        report = json.loads((tmp_path / f"fsdp{rank}.json").read_text())
        assert report["sharded"] > 0 and report["grad_names_equal"] and report["adapter_shapes"], report
        assert report["logits"] <= 1e-6 and report["grads"] <= 1e-6 and report["adapter"] == 0.0, report


def test_parameters_are_contiguous(tiny_csreft):
    for name, p in tiny_csreft.named_parameters():
        assert p.is_contiguous(), name  # FSDP and DeepSpeed refuse strided parameters


def test_engine_flags_reach_training_arguments(monkeypatch, tmp_path):
    from csreft import cli
    from csreft.cli.options import given
    from csreft.training import options, trainer

    seen = {}
    monkeypatch.setattr(trainer, "TrainingArguments", lambda **kw: seen.update(kw))
    args = cli.build_parser().parse_args(["train", "--data", "x.jsonl", "--deepspeed", "ds.json",
                                          "--fsdp", "full_shard auto_wrap", "--fsdp-config", "fsdp.json"])
    trainer.training_arguments(options.split_options(given(args))[0])
    assert (seen["deepspeed"], seen["fsdp"], seen["fsdp_config"]) == ("ds.json", "full_shard auto_wrap", "fsdp.json")


def test_resume_under_deepspeed_is_refused(tmp_path, tiny_model_dir):
    from csreft.training.recipe import build

    with pytest.raises(ValueError, match="--resume with --deepspeed is not supported"):
        build(options(tmp_path, tiny_model_dir, deepspeed="ds.json", resume="latest"))


def test_end_process_group_leaves_the_group_and_is_a_no_op_without_one(tmp_path):
    import torch.distributed as dist

    from csreft.training.distributed import end_process_group

    end_process_group()  # no group: nothing to do
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        end_process_group()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_train_ends_the_process_group_after_a_successful_fit_only(monkeypatch):
    """`csreft train` (recipe.run) under torchrun: every rank leaves the group on success; after
    a failure it must not wait at a barrier the failed rank's peers may never reach."""
    from csreft.training import recipe

    calls = []
    monkeypatch.setattr(recipe, "build", lambda options, callbacks=None: options)
    monkeypatch.setattr(recipe, "end_process_group", lambda: calls.append("end"))
    monkeypatch.setattr(recipe, "fit", lambda run: calls.append("fit") or {"steps": 1})
    assert recipe.run({}) == {"steps": 1} and calls == ["fit", "end"]

    def fails(run):
        calls.append("fit")
        raise RuntimeError("out of memory on this rank")

    calls.clear()
    monkeypatch.setattr(recipe, "fit", fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        recipe.run({})
    assert calls == ["fit"]
