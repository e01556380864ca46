"""A training run owns its output directory.

- A lock (OUTPUT_DIR/.csreft.lock, an flock held while the run lives) keeps a second run out;
  the kernel drops it when the process dies, so a killed run's lock is simply taken over.
- A fresh run refuses a directory holding another run's checkpoints or adapter unless told
  --resume (continue it) or --overwrite (replace it).
- A resumed checkpoint must carry this run's fingerprint (configuration, data, training
  options) and be complete (optimizer, scheduler, RNG state, finite adapter tensors).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from ..integrity import checkpoint_problems, read_adapter_config

LOCK_NAME = ".csreft.lock"
# options that change what a run computes (max_steps / epochs may change on resume: a longer run)
FINGERPRINT_OPTIONS = ("model", "seed", "lr", "weight_decay", "warmup", "scheduler", "batch_size", "grad_accum",
                       "max_grad_norm", "max_length", "skill_routing", "bf16")


class RunDirectoryError(ValueError):
    """The output directory cannot be used as asked (another run's files, a bad checkpoint)."""


class RunLockedError(RunDirectoryError):
    """Another live run holds the output directory."""


# -- the lock ----------------------------------------------------------------------------------
class RunLock:
    """Exclusive ownership of a run directory; release() (or process exit) ends it."""

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirectoryError(f"cannot create output directory {self.path.parent}: {err.strerror}") from err
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as err:
                raise RunDirectoryError(
                    f"cannot write to output directory {self.path.parent} ({err.strerror}); "
                    "give a writable --output-dir") from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunLockedError(
                    f"{self.path.parent} is in use by another csreft run ({holder}); wait for it to "
                    "finish or give another --output-dir"
                ) from None
            if _same_file(fd, self.path):  # not a lock file that its last owner just removed
                break
            os.close(fd)
        stale = _read_holder(fd)
        if stale != "holder unknown":
            print(f"csreft: taking over the lock of a run that is gone ({stale})", file=sys.stderr)
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __del__(self):  # a run dropped without fit(); the process's exit would also do
        try:
            self.release()
        except Exception:
            pass


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "null")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (ValueError, TypeError, KeyError, OSError):
        return "holder unknown"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch, or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


# -- fingerprint -------------------------------------------------------------------------------
def fingerprint(config: dict, records: list[dict], opts: dict) -> dict:
    """What makes two runs the same run: the adapter configuration, the training records and
    the options in FINGERPRINT_OPTIONS; each part hashed, so a mismatch can be named."""
    model = opts.get("model")
    if model and os.path.exists(model):
        model = os.path.realpath(model)
    parts = {
        "config": _digest(config),
        "data": _digest(records),
        **{name: opts.get(name) for name in FINGERPRINT_OPTIONS if name != "model"},
        "model": model,
    }
    return {"digest": _digest(parts), "parts": parts}


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differences(saved: dict, ours: dict) -> list[str]:
    a, b = saved.get("parts", {}), ours["parts"]
    return [name for name in sorted(set(a) | set(b)) if a.get(name) != b.get(name)] or ["fingerprint"]


def saved_run(directory: Path) -> dict | None:
    """(fingerprint, step) stored with an adapter or checkpoint, or None when absent/unreadable."""
    try:
        meta = read_adapter_config(directory).get("metadata", {})
    except (FileNotFoundError, ValueError):
        return None
    return meta if isinstance(meta, dict) and "run" in meta else None


# -- what is in the directory ------------------------------------------------------------------
def checkpoints(directory: str | os.PathLike) -> list[Path]:
    """OUTPUT_DIR/checkpoint-N folders, by N."""
    found = [p for p in Path(directory).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: str | os.PathLike) -> int:
    """N of checkpoint-N; for a checkpoint under another name, the step it records."""
    tail = Path(path).name.split("-")[-1]
    if tail.isdigit():
        return int(tail)
    return int(json.loads((Path(path) / "trainer_state.json").read_text())["global_step"])


def claim(output_dir: str, resume: str | None, overwrite: bool) -> None:
    """Check that a fresh run may use `output_dir` (refuse another run's files) or, with
    `overwrite`, clear them out; the earlier adapter stays until the new one replaces it."""
    out = Path(output_dir)
    found = checkpoints(out)
    adapter = out / "adapter"
    if resume:
        return
    if (found or adapter.exists()) and not overwrite:
        held = [p.name for p in found] + (["adapter"] if adapter.exists() else [])
        raise RunDirectoryError(
            f"{out} already holds a run ({', '.join(held)}); pass --resume to continue it, "
            "--overwrite to replace it, or give another --output-dir"
        )
    for path in found + [out / ".staging"]:
        shutil.rmtree(path, ignore_errors=True)
    for name in ("log.jsonl", "summary.json"):  # the earlier run's, or one that left no checkpoint
        (out / name).unlink(missing_ok=True)


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """"latest" -> newest OUTPUT_DIR/checkpoint-N (error if none); a path -> itself."""
    if not resume:
        return None
    if resume == "latest":
        found = checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume latest: no checkpoint-N directory in {output_dir}")
        return str(found[-1])
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint directory")
    return resume


def verify_checkpoint(path: str, ours: dict) -> None:
    """Refuse a checkpoint that is incomplete, damaged, or from another run."""
    problems = checkpoint_problems(path)
    if problems:
        raise RunDirectoryError(f"--resume {path}: cannot resume exactly: {'; '.join(problems)}")
    saved = saved_run(Path(path))
    if saved is None:
        print(f"csreft: {path} was saved without a run fingerprint (an older csreft); resuming it "
              "unverified", file=sys.stderr)
    elif saved["run"].get("digest") != ours["digest"]:
        raise RunDirectoryError(
            f"--resume {path}: the checkpoint belongs to another run (differs in: "
            f"{', '.join(differences(saved['run'], ours))}); resume with that run's options, or "
            "pass --overwrite to start this one afresh"
        )


def describe_checkpoint(path: str | None) -> str:
    """For error messages: the checkpoint and whether it was verified complete and finite."""
    if path is None:
        return "none"
    problems = checkpoint_problems(path)
    return f"{path} (verified: complete, finite)" if not problems else f"{path} (not usable: {'; '.join(problems)})"


def trim_log(output_dir: str, step: int) -> None:
    """Drop log.jsonl records after `step` (written by the run that was interrupted)."""
    log = Path(output_dir) / "log.jsonl"
    if not log.is_file():
        return
    kept = []
    for line in log.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except (ValueError, AttributeError):
            continue
    log.write_text("".join(line + "\n" for line in kept))


def adapter_is_final(output_dir: str, ours: dict, step: int) -> bool:
    """Whether OUTPUT_DIR/adapter already holds this run's adapter at `step`."""
    saved = saved_run(Path(output_dir) / "adapter")
    return bool(saved) and saved["run"].get("digest") == ours["digest"] and saved.get("step") == step

