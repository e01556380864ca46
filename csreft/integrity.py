"""What a saved adapter or checkpoint must be before it is trusted, and how it is written.

Files: csreft_config.json and csreft_model.safetensors (names that Hugging Face tooling does
not take for a PEFT adapter); adapters saved under PEFT's names (adapter_config.json,
adapter_model.safetensors) are still read.
Writing: the safetensors bytes are hashed (sha256, stored as `weights_sha256` in
csreft_config.json) and written with ordinary permissions; a directory is replaced by an
atomic exchange of two names (Linux renameat2), so a reader always finds a complete adapter.
Reading: checksum, tensor names, shapes, kinds of dtype, finite values and orthonormal bases;
every failure names the file and the tensor.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from .edits import householder, legacy_basis, rotate

ADAPTER_CONFIG = "csreft_config.json"
ADAPTER_WEIGHTS = "csreft_model.safetensors"
# the names adapters had before: PEFT's, so Hugging Face tooling took them for PEFT adapters and
# crashed; still read where a directory holds only those
LEGACY_CONFIG, LEGACY_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# what Trainer writes into a checkpoint beside the adapter; a resume needs all of it
CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


# -- writing -------------------------------------------------------------------------------------
def write_file(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` (permissions from the umask) and flush it to disk; an OSError
    (a full disk, a file-size limit) names the file."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        if err.filename:
            raise
        raise OSError(err.errno, f"{err.strerror} (writing {len(data):,} bytes)", str(path)) from err


def write_weights(path: str | os.PathLike, state: dict[str, torch.Tensor]) -> str:
    """Save tensors as safetensors at `path`; returns the sha256 of the bytes written."""
    data = save_bytes(state, metadata={"format": "pt"})
    write_file(path, data)
    return hashlib.sha256(data).hexdigest()


# what an adapter folder holds (the model card of a pushed adapter too); nothing else is replaced
ADAPTER_FOLDER_FILES = {ADAPTER_CONFIG, ADAPTER_WEIGHTS, LEGACY_CONFIG, LEGACY_WEIGHTS, "README.md"}
RUN_LOCK = ".csreft.lock"  # a training run's lock file (csreft.training.rundir)


def check_replaceable(directory: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse to replace `directory` with an adapter unless it is absent, empty or an adapter
    folder; `overwrite` allows any other directory, except a training run's (it holds a run
    lock): a ValueError naming the directory and what it holds."""
    target = Path(os.path.realpath(directory))
    if not target.exists():
        return
    if not target.is_dir():
        raise ValueError(f"{directory}: exists and is not a directory")
    names = sorted(p.name for p in target.iterdir())
    if RUN_LOCK in names:
        raise ValueError(f"{directory}: a training run's directory (it holds {RUN_LOCK}); an adapter "
                         "never replaces it: give another output directory")
    others = [n for n in names if n not in ADAPTER_FOLDER_FILES]
    if others and not overwrite:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise ValueError(f"{directory}: not empty and not an adapter folder (it holds {shown}); writing the "
                         "adapter would replace all of it: give another output directory, or --overwrite")


def atomic_directory(directory: str | os.PathLike, write) -> None:
    """Call write(tmp_dir), then put tmp_dir in place of `directory` (of its target, where
    `directory` is a symbolic link: the link stays and points at the new content).

    The swap is one atomic exchange of names where the system has one (renameat2 on Linux),
    so `directory` always exists; elsewhere two renames leave a window of microseconds, and
    a save killed inside it is undone by the next save or load (restore_interrupted). A
    failure inside write() leaves any existing `directory` as it was. Hidden leftovers of a
    save that was killed (.NAME.tmp-PID-*, .NAME.old-PID-*) are removed first.
    """
    target = Path(os.path.realpath(directory))
    target.parent.mkdir(parents=True, exist_ok=True)
    restore_interrupted(target)
    remove_leftovers(target)
    tmp = _fresh_dir(target, "tmp")
    try:
        write(tmp)
        _fsync_dir(tmp)
        if not target.exists():
            os.replace(tmp, target)
        elif _exchange(tmp, target):  # tmp now holds the previous directory
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            old = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def restore_interrupted(target: Path) -> None:
    """Where a save without renameat2 was killed between its two renames, `target` is gone
    and its previous content waits in .NAME.old-PID-*: put it back."""
    if target.exists():
        return
    for path in sorted(target.parent.glob(f".{target.name}.old-*")):
        pid = path.name.rsplit(".old-", 1)[1].split("-")[0]
        if path.is_dir() and not (pid.isdigit() and _alive(int(pid))):
            os.replace(path, target)
            return


def remove_leftovers(target: Path) -> None:
    """Remove .NAME.tmp-PID-* / .NAME.old-PID-* folders whose writing process is gone."""
    for kind in ("tmp", "old"):
        for path in target.parent.glob(f".{target.name}.{kind}-*"):
            pid = path.name.rsplit(f".{kind}-", 1)[1].split("-")[0]
            if not (pid.isdigit() and _alive(int(pid))):
                shutil.rmtree(path, ignore_errors=True)


def _fresh_dir(target: Path, kind: str) -> Path:
    """A new hidden sibling folder of `target`, with permissions from the umask (not mkdtemp's 0700)."""
    while True:
        path = target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100
_libc = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the names a and b (Linux renameat2 RENAME_EXCHANGE); False where the
    system or file system cannot."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError:
            _libc = False
    renameat2 = getattr(_libc, "renameat2", None) if _libc else None
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- reading and checking ------------------------------------------------------------------------
def adapter_files(directory: str | os.PathLike) -> tuple[Path, Path]:
    """(config, weights) paths of an adapter directory: ours, or the legacy names when only
    those are there."""
    d = Path(directory)
    if not (d / ADAPTER_CONFIG).exists() and (d / LEGACY_CONFIG).is_file():
        return d / LEGACY_CONFIG, d / LEGACY_WEIGHTS
    return d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """csreft_config.json of an adapter or checkpoint directory, as a dict (clear errors)."""
    path = adapter_files(directory)[0]
    if not path.is_file():
        restore_interrupted(Path(os.path.realpath(directory)))  # a save killed between two renames
        path = adapter_files(directory)[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; is {directory} a csreft adapter directory?")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a valid csreft adapter config: {err}") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("csreft_config"), dict):
        raise ValueError(f"{path}: not a valid csreft adapter config: no 'csreft_config' mapping")
    for key in ("metadata", "base_model"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise ValueError(f"{path}: not a valid csreft adapter config: '{key}' is {type(meta[key]).__name__} "
                             f"{meta[key]!r}, expected a mapping")
    return meta


def adapter_name(directory: str | os.PathLike) -> str:
    """A short name for an adapter folder: its own name, or its run's for `RUN/adapter`."""
    path = Path(os.path.realpath(directory))
    return path.parent.name if path.name == "adapter" and path.parent.name else path.name


def read_weights(directory: str | os.PathLike, checksum: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter tensors, after checking the file against `checksum` (when given) and that
    every floating-point tensor is finite."""
    config, path = adapter_files(directory)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; is {directory} a csreft adapter directory?")
    data = path.read_bytes()
    if checksum is not None and hashlib.sha256(data).hexdigest() != checksum:
        raise ValueError(
            f"{path}: checksum mismatch: the file is not the one saved with {config.name} "
            "(changed or corrupted after saving)"
        )
    try:
        state = load_bytes(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path}: tensor {name} holds NaN or infinite values")
    return state


def check_against(state: dict, expected: dict, path) -> None:
    """Names, shapes and kinds of dtype (floating point or not) of `state` against `expected`."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: missing tensors {missing}, unexpected tensors {unexpected}")
    for name, value in state.items():
        want = expected[name]
        if value.shape != want.shape:
            raise ValueError(f"{path}: tensor {name} has shape {tuple(value.shape)}, expected {tuple(want.shape)}")
        if value.is_floating_point() != want.is_floating_point():
            raise ValueError(f"{path}: tensor {name} has dtype {value.dtype}, expected {want.dtype}")


# -- the two forms of the edits' bases ------------------------------------------------------------
# A saved adapter holds each edit's basis Q as `edits.L.g.basis` (d x n, or k x d x r; a model
# loads it as anchor = Q, see SubspaceEdits). A model, and a checkpoint that must resume bit for
# bit, hold what training moves instead: `reflectors` (trainable) and `anchor` (fixed),
# Q = rotate(anchor, householder(reflectors)). Adapters saved in format 1 held torch's
# parametrisation (`parametrizations.basis.original` and its d x d `parametrizations.basis.0.base`):
# read as their Q.
_RAW = (".reflectors", ".anchor")
_LEGACY = (".parametrizations.basis.original", ".parametrizations.basis.0.base")


def basis_form(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every edit's basis as Q under `<edit>.basis` (from either other form)."""
    out = dict(state)
    for raw, make in ((_RAW, lambda x, a: rotate(a.float(), householder(x.float()))),
                      (_LEGACY, lambda x, base: legacy_basis(x, base).float())):
        for name in [k for k in state if k.endswith(raw[0])]:
            edit = name[: -len(raw[0])]
            other = edit + raw[1]
            if other not in state:
                continue  # check_against names it as missing
            with torch.no_grad():
                q = make(state[name], state[other])
            out[edit + ".basis"] = q.to(state[name].dtype)
            del out[name], out[other]
    return out


def is_training_form(state: dict) -> bool:
    return any(k.endswith(_RAW[0]) for k in state)


def check_orthonormal(state: dict[str, torch.Tensor], path) -> None:
    """Every basis of a basis-form state has orthonormal columns (Q^T Q = I within tolerance):
    the whole (d, n) Q for one shared basis, each subspace's (d, r) block for independent bases
    (k, d, r; a composed skill library), whose subspaces may overlap."""
    with torch.no_grad():
        for name, q in state.items():
            if not name.endswith(".basis"):
                continue
            q64 = q.double()
            eye = torch.eye(q64.shape[-1], dtype=q64.dtype)
            error = (q64.mT @ q64 - eye).abs().max().item() if q64.numel() else 0.0
            tol = 1e-3 if q.dtype in (torch.float32, torch.float64) else 5e-2
            if not error <= tol:
                raise ValueError(f"{path}: tensor {name}: the basis is not orthonormal "
                                 f"(max |Q^T Q - I| = {error:.3g} > {tol})")


def checkpoint_problems(directory: str | os.PathLike) -> list[str]:
    """What keeps a Trainer checkpoint from being resumed exactly (empty: nothing)."""
    directory = Path(directory)
    problems = [f"{name} is missing" for name in CHECKPOINT_FILES if not (directory / name).is_file()]
    if not any(directory.glob("rng_state*.pth")):
        problems.append("rng_state.pth (random number generator state) is missing")
    state = directory / "trainer_state.json"
    if state.is_file():
        try:
            json.loads(state.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            problems.append(f"trainer_state.json is not valid JSON ({err})")
    for name in ("optimizer.pt", "scheduler.pt"):  # tensors and numbers only: nothing is unpickled
        if (directory / name).is_file():
            try:
                torch.load(directory / name, map_location="cpu", weights_only=True)
            except Exception as err:  # truncated or damaged: Trainer would fail with no file named
                problems.append(f"{name} cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
    try:
        meta = read_adapter_config(directory)
        read_weights(directory, meta.get("weights_sha256"))
    except (FileNotFoundError, ValueError) as err:
        problems.append(str(err).replace(f"{directory}{os.sep}", ""))
    return problems
