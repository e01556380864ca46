"""Fault injection: kill -9 and resume, concurrent runs, reused and read-only directories,
disk errors at save, damaged checkpoints and adapters, and every CLI error as one line."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_llama
from csreft import CSReftConfig, get_csreft_model
from csreft.cli import main
from csreft.integrity import checkpoint_problems
from csreft.model import CSReftModel
from csreft.training.recipe import build, fit
from csreft.training.trainer import NonFiniteLossError
from test_train import PoisonAt, options, skill_records, write_jsonl

ROOT = Path(__file__).parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def train_argv(tmp_path, model_dir, out="out", max_steps=4, save_steps=2, data=None, extra=()):
    data = data or write_jsonl(tmp_path / "train.jsonl", skill_records())
    return ["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(tmp_path / out),
            "--layers", "1,2", "--rank", "2", "--num-subspaces", "2", "--positions", "f3+l3",
            "--batch-size", "4", "--max-length", "64", "--logging-steps", "1", "--max-steps", str(max_steps),
            "--save-steps", str(save_steps), *extra]


def one_line_error(argv, capsys=None) -> str:
    """Run the CLI expecting an error; returns its one-line message."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    message = str(exc.value.code)
    assert exc.value.code != 0 and "\n" not in message and message.startswith("csreft"), message
    return message


# -- kill -9 and resume --------------------------------------------------------------------------
def test_kill_9_at_20_points_resumes_bit_identical(tmp_path, tiny_model_dir):
    argv = train_argv(tmp_path, tiny_model_dir, max_steps=8)
    args = [a for a in argv[1:] if a not in ("--output-dir", str(tmp_path / "out"))]
    args = args[: args.index("--save-steps")] + args[args.index("--save-steps") + 2:]
    spec = {"args": args, "max_steps": 8, "workdir": str(tmp_path / "runs"), "seeds": [0, 1, 2, 3],
            "points_per_seed": 5, "save_steps": [1, 1, 2, 2]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, str(Path(__file__).parent / "kill_runner.py"), str(tmp_path / "spec.json")],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    killed = sum(p["killed_status"] == -signal.SIGKILL for p in report["points"])
    resumed = sum(p["resumed"] for p in report["points"])
    print(f"\nkill -9: {report['total']} points ({killed} killed mid-run, {report['total'] - killed} after "
          f"the end; {resumed} resumed from a checkpoint, {report['total'] - resumed} rerun before the first), "
          f"{report['identical']}/{report['total']} ended bit-identical")
    bad = [p for p in report["points"] if not p["identical"]]
    assert report["total"] == 20 and not bad, bad


# -- one run per directory -----------------------------------------------------------------------
def test_second_run_in_a_directory_gets_the_lock_error_and_a_killed_run_is_taken_over(
        tmp_path, tiny_model_dir, capsys):
    argv = train_argv(tmp_path, tiny_model_dir, max_steps=100000, save_steps=0)
    first = subprocess.Popen([sys.executable, "-m", "csreft.cli", *argv], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "out" / ".csreft.lock"
    try:
        deadline = time.time() + 120
        while not (lock.is_file() and str(first.pid) in lock.read_text()):
            assert first.poll() is None and time.time() < deadline, first.stderr.read()
            time.sleep(0.1)
        message = one_line_error(train_argv(tmp_path, tiny_model_dir, max_steps=2, save_steps=0))
        assert f"in use by another csreft run (pid {first.pid} on " in message and "started" in message
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    main(train_argv(tmp_path, tiny_model_dir, max_steps=2, save_steps=0))  # the dead run's lock
    assert "taking over the lock" in capsys.readouterr().err
    assert not lock.exists() and (tmp_path / "out" / "adapter").is_dir()


def test_reused_directory_needs_resume_or_overwrite(tmp_path, tiny_model_dir):
    main(train_argv(tmp_path, tiny_model_dir, max_steps=4, save_steps=2))
    other = write_jsonl(tmp_path / "b.jsonl", skill_records()[::-1])
    second = train_argv(tmp_path, tiny_model_dir, max_steps=2, save_steps=2, data=other, extra=["--seed", "7"])
    assert "already holds a run (checkpoint-2, checkpoint-4, adapter)" in one_line_error(second)
    message = one_line_error(second + ["--resume"])
    assert "belongs to another run (differs in: data, seed)" in message
    assert "contradict" in one_line_error(second + ["--resume", "--overwrite"])
    main(second + ["--overwrite"])
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    meta = json.loads((out / "adapter" / "csreft_config.json").read_text())
    assert meta["metadata"]["step"] == 2 and meta["metadata"]["run"]["parts"]["seed"] == 7


def test_resume_at_the_last_step_trains_nothing_and_keeps_the_adapter(tmp_path, tiny_model_dir, capsys):
    argv = train_argv(tmp_path, tiny_model_dir, max_steps=4, save_steps=2)
    main(argv)
    adapter = tmp_path / "out" / "adapter" / "csreft_model.safetensors"
    before, inode = adapter.read_bytes(), adapter.stat().st_ino
    main(argv + ["--resume"])
    assert "nothing left to train" in capsys.readouterr().out
    assert adapter.stat().st_ino == inode and adapter.read_bytes() == before  # not rewritten
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["adapter_kept"]
    # killed between the last checkpoint and the adapter: the adapter comes from the checkpoint
    import shutil

    shutil.rmtree(tmp_path / "out" / "adapter")
    main(argv + ["--resume"])
    assert adapter.read_bytes() == before
    message = one_line_error(train_argv(tmp_path, tiny_model_dir, max_steps=2, save_steps=2) + ["--resume"])
    assert "at step 4, past this run's last step 2" in message
    shutil.copytree(tmp_path / "out" / "checkpoint-4", tmp_path / "kept")  # a checkpoint under another name
    main(argv + ["--resume", str(tmp_path / "kept")])
    assert "nothing left to train" in capsys.readouterr().out and adapter.read_bytes() == before


@pytest.mark.parametrize("damage,problem", [
    (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt is missing"),
    (lambda c: (c / "rng_state.pth").unlink(), "rng_state.pth"),
    (lambda c: _poison(c, keep_checksum=True), "tensor router.mlp.0.weight holds NaN"),
    (lambda c: _poison(c, keep_checksum=False), "checksum mismatch"),
])
def test_resume_refuses_an_incomplete_or_damaged_checkpoint(tmp_path, tiny_model_dir, damage, problem):
    argv = train_argv(tmp_path, tiny_model_dir, max_steps=2, save_steps=2)
    main(argv)
    damage(tmp_path / "out" / "checkpoint-2")
    message = one_line_error(train_argv(tmp_path, tiny_model_dir, max_steps=4, save_steps=2) + ["--resume"])
    assert "cannot resume exactly" in message and problem in message


def _poison(checkpoint: Path, keep_checksum: bool) -> None:
    """NaN into one adapter tensor; with keep_checksum the config's checksum is updated too."""
    import hashlib

    weights = checkpoint / "csreft_model.safetensors"
    state = load_file(weights)
    state["router.mlp.0.weight"][0, 0] = float("nan")
    save_file(state, weights, metadata={"format": "pt"})
    if keep_checksum:
        cfg = checkpoint / "csreft_config.json"
        meta = json.loads(cfg.read_text())
        meta["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
        cfg.write_text(json.dumps(meta))


class BreakCheckpoint(PoisonAt):
    """NaN into the router (next loss is NaN) and the last checkpoint's optimizer state removed."""

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            (Path(args.output_dir) / f"checkpoint-{self.step}" / "optimizer.pt").unlink()
        super().on_step_begin(args, state, control, **kwargs)


def test_non_finite_loss_message_says_whether_the_checkpoint_was_verified(tmp_path, tiny_model_dir):
    run = build(options(tmp_path / "a", tiny_model_dir, max_steps=6, save_steps=2))
    run.trainer.add_callback(PoisonAt(run.model, 2))
    with pytest.raises(NonFiniteLossError, match=r"checkpoint-2 \(verified: complete, finite\)"):
        fit(run)
    run = build(options(tmp_path / "b", tiny_model_dir, max_steps=6, save_steps=2))
    run.trainer.add_callback(BreakCheckpoint(run.model, 2))
    with pytest.raises(NonFiniteLossError, match=r"checkpoint-2 \(not usable: optimizer.pt is missing\)") as exc:
        fit(run)
    assert "intact" not in str(exc.value)


# -- storage faults ------------------------------------------------------------------------------
def test_read_only_output_directory_is_a_clear_error(tmp_path, tiny_model_dir, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):  # root ignores the mode bits
        if str(path).startswith(str(out)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    try:
        message = one_line_error(train_argv(tmp_path, tiny_model_dir))
    finally:
        out.chmod(0o755)
    assert f"cannot write to output directory {out}" in message


@pytest.mark.parametrize("target", ["csreft.integrity.write_file", "torch.save"])
def test_disk_error_at_a_checkpoint_keeps_the_previous_one(tmp_path, tiny_model_dir, monkeypatch, target):
    import importlib

    module_name, name = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    real = getattr(module, name)

    def failing(*args, **kwargs):
        if any("checkpoint-4" in str(a) for a in args if isinstance(a, (str, os.PathLike))):
            raise OSError(errno.ENOSPC, "No space left on device", "checkpoint-4")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)
    with pytest.raises(OSError, match="No space left"):
        fit(build(options(tmp_path, tiny_model_dir, max_steps=6, save_steps=2)))
    monkeypatch.setattr(module, name, real)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert checkpoint_problems(out / "checkpoint-2") == []
    summary = fit(build(options(tmp_path, tiny_model_dir, max_steps=6, save_steps=2, resume="latest")))
    assert summary["steps"] == 6


def test_disk_error_at_the_final_save_keeps_the_previous_adapter(tmp_path, tiny_model_dir, monkeypatch):
    fit(build(options(tmp_path, tiny_model_dir, max_steps=2)))
    adapter = tmp_path / "out" / "adapter"
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    import csreft.integrity as integrity

    real = integrity.write_file

    def full_disk(path, data):
        if ".adapter.tmp-" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(integrity, "write_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        fit(build(options(tmp_path, tiny_model_dir, max_steps=3, overwrite=True)))
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before
    assert [p.name for p in adapter.parent.iterdir() if p.name.startswith(".adapter")] == []


def test_saves_leave_normal_permissions_and_clean_up_a_killed_save(tmp_path, tiny_csreft):
    dead = tmp_path / ".adapter.tmp-999999999-abcd"  # left by a save that was killed
    alive = tmp_path / f".adapter.old-{os.getppid()}-abcd"  # a save in progress elsewhere
    dead.mkdir()
    alive.mkdir()
    tiny_csreft.save_pretrained(tmp_path / "adapter")
    tiny_csreft.save_pretrained(tmp_path / "adapter")
    assert not dead.exists() and alive.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o777 & ~umask
    for f in (tmp_path / "adapter").iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


# -- adapters that must not load -----------------------------------------------------------------
def test_damaged_adapters_are_refused_naming_file_and_tensor(tmp_path, tiny_csreft):
    path = tmp_path / "a"
    tiny_csreft.save_pretrained(path)
    weights = path / "csreft_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="csreft_model.safetensors: checksum mismatch"):
        CSReftModel.from_pretrained(tiny_llama(), path)
    # without a checksum (as saved before checksums), the contents are still checked
    tiny_csreft.save_pretrained(path)
    meta = json.loads((path / "csreft_config.json").read_text())
    del meta["weights_sha256"]
    (path / "csreft_config.json").write_text(json.dumps(meta))
    assert CSReftModel.from_pretrained(tiny_llama(), path) is not None  # an older adapter loads
    state = load_file(weights)
    key = "edits.1.0.basis"
    save_file({**state, key: state[key] * 1.5}, weights)
    with pytest.raises(ValueError, match="edits.1.0.basis: the basis is not orthonormal"):
        CSReftModel.from_pretrained(tiny_llama(), path)
    save_file({**state, "edits.2.0.bias": state["edits.2.0.bias"] * float("inf")}, weights)
    with pytest.raises(ValueError, match="tensor edits.2.0.bias holds NaN or infinite"):
        CSReftModel.from_pretrained(tiny_llama(), path)
    save_file({**state, "edits.2.0.bias": state["edits.2.0.bias"].to(torch.int32)}, weights)
    with pytest.raises(ValueError, match="tensor edits.2.0.bias has dtype torch.int32"):
        CSReftModel.from_pretrained(tiny_llama(), path)


# -- the command line: one line per expected failure ---------------------------------------------
def _write(path: Path, content) -> str:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def test_cli_errors_are_one_line(tmp_path, tiny_model_dir):
    model = str(tiny_model_dir)
    good = write_jsonl(tmp_path / "good.jsonl", skill_records())
    latin1 = _write(tmp_path / "latin1.jsonl", '{"prompt": "caf\xe9", "response": "x"}\n'.encode("latin-1"))
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "reverse the word " * 40, "response": "x"}] * 3)
    (tmp_path / "bad_adapter").mkdir()
    _write(tmp_path / "bad_adapter" / "csreft_config.json", "{not json")
    cases = [
        (["generate", "--adapter", str(tmp_path / "nowhere"), "--prompt", "hi"], "nowhere/csreft_config.json: missing"),
        (["generate", "--adapter", str(tmp_path / "bad_adapter"), "--prompt", "hi"], "not a valid csreft adapter config"),
        (["generate", "--model", model, "--prompts-file", latin1], "latin1.jsonl: not UTF-8 text (byte 0xe9"),
        (["eval", "--model", model, "--data", latin1], "latin1.jsonl: not UTF-8 text"),
        (["eval", "--model", model, "--data", str(good), "--adapter", str(tmp_path / "nowhere")], "missing"),
        (["info", "--config", _write(tmp_path / "c.yaml", "rnak: 2\n")], "c.yaml, line 1: unknown option 'rnak'; did you mean 'rank'?"),
        (["info", "--rank", "0"], "rank=0 is not valid"),
        (train_argv(tmp_path, model, data=long, extra=["--max-length", "16"]), "long.jsonl: all 3 records were dropped"),
        (train_argv(tmp_path, model, max_steps=0), "--max-steps 0 is not valid"),
        (train_argv(tmp_path, model, max_steps=-1, extra=["--epochs", "0"]), "--epochs 0.0 is not valid"),
        (train_argv(tmp_path, model, extra=["--grad-accum", "0"]), "--grad-accum 0 is not valid"),
        (train_argv(tmp_path, model, extra=["--sparsity-weight", "nan"]), "sparsity_weight=nan is not valid"),
        (train_argv(tmp_path, model, extra=["--lr", "inf"]), "--lr inf is not valid"),
        (train_argv(tmp_path, model, extra=["--scheduler", "linearr"]), "--scheduler 'linearr' is not valid"),
        (train_argv(tmp_path, model, data=tmp_path / "missing.jsonl"), "missing.jsonl"),
        (["compare", "--lr-grid-reft", "0"], "--lr-grid-reft: give learning rates > 0"),
    ]
    for argv, expected in cases:
        assert expected in one_line_error(argv), argv
    with pytest.raises(FileNotFoundError):  # --debug: the exception itself, with its traceback
        main(["--debug", "generate", "--adapter", str(tmp_path / "nowhere"), "--prompt", "hi"])


def test_cli_error_from_a_real_process_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "csreft.cli", "generate", "--adapter", str(tmp_path), "--prompt", "x"],
                          env=ENV, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("csreft generate: ") and "csreft_config.json: missing" in lines[0]


def test_config_values_go_through_the_flags_types(tmp_path):
    from csreft.cli import command_parser
    from csreft.cli.config_file import read_options_file as read_file

    def read_options_file(path):
        return read_file(path, command_parser("train"))

    path = _write(tmp_path / "run.yaml", 'lr: 2e-3\nbf16: "false"\nuse_router: "yes"\nmax_steps: 8.0\nresume: true\n')
    assert read_options_file(path) == {"lr": 2e-3, "bf16": False, "use_router": True, "max_steps": 8,
                                       "resume": "latest"}
    for text, message in [('bf16: "maybe"\n', "line 1: bf16: 'maybe' is not valid: true or false"),
                          ("lr: fast\n", "lr: 'fast' is not valid: a number"),
                          ("max_steps: 2.5\n", "max_steps: 2.5 is not valid: an integer"),
                          ("rank: [2]\n", "rank: [2] is not valid: an integer"),
                          ("seed: 1\nnum_subspace: 3\n", "line 2: unknown option 'num_subspace'; did you mean 'num_subspaces'"),
                          ("- a\n- b\n", "expected a mapping")]:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            read_options_file(_write(tmp_path / "bad.yaml", text))
    with pytest.raises(ValueError, match=r'bad.json, line 3: scheduler: .* one of|bad.json, line 3: unknown'):
        read_options_file(_write(tmp_path / "bad.json", '{\n "lr": "1e-3",\n "schedular": "linear"\n}'))


# -- the Python API ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    ({"prompt_starts": [0, -1]}, "example 1: prompt start -1 is negative"),
    ({"prompt_lengths": [8, 12]}, "example 1: the prompt span ends at 12, past the sequence end"),
    ({"prompt_starts": [0, 3], "attention_mask": torch.tensor([[1] * 8, [0] * 6 + [1] * 2])}, "example 1"),
    ({"attention_mask": torch.ones(2, 5, dtype=torch.long)}, "attention_mask has shape"),
    ({"labels": torch.full((2, 8), -100)}, "labels are all -100"),
    ({"labels": torch.zeros(2, 5, dtype=torch.long)}, "labels have shape"),
    ({"prompt_start": [0, 0]}, "unknown keyword argument.*did you mean 'prompt_starts'"),
    ({"output_hiden_states": True}, "unknown keyword argument.*did you mean 'output_hidden_states'"),
])
def test_api_misuse_is_a_value_error(tiny_csreft, kwargs, message):
    ids = torch.randint(3, 100, (2, 8))
    with pytest.raises(ValueError, match=message):
        tiny_csreft(ids, **kwargs)


def test_base_keywords_still_pass_through(tiny_csreft):
    ids = torch.randint(3, 100, (2, 8))
    with torch.no_grad():
        plain = tiny_csreft(ids).logits
        same = tiny_csreft(ids, position_ids=torch.arange(8).expand(2, -1), use_cache=False,
                           output_hidden_states=True).logits
    assert torch.equal(plain, same)
    model = get_csreft_model(tiny_llama(), CSReftConfig(layers=[1], rank=2, num_subspaces=2))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers renamed it `cache`, and says so
        model(ids, past_key_values=None, use_cache=True)
