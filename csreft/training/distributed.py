"""What the adapter needs from sharded training engines (DeepSpeed ZeRO, FSDP).

- ZeRO-3 partitions every parameter, the edits' and the router's too, and gathers a module's
  parameters around each call of that module. An edit's basis lives in a child module (torch's
  orthogonal parametrisation) that is never called itself, so every SubspaceEdits is marked a
  ZeRO-3 *leaf*: all its parameters are gathered when the edit runs (mark_zero3_leaves).
- The adapter is saved from whole tensors. Under ZeRO-3 only the adapter's parameters are
  gathered (never the base); under FSDP the full state dict is taken. Both are collective
  steps: every rank must call full_adapter_state(), and only rank 0 writes.
- Parameter counts read `ds_numel`, the full size of a partitioned parameter (partitioned
  ones have numel() == 0 outside a forward pass).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn


def is_partitioned(p: torch.Tensor) -> bool:
    """Whether ZeRO-3 manages (partitions) this parameter."""
    return hasattr(p, "ds_id")


def mark_zero3_leaves(model: nn.Module) -> None:
    """Gather each edit's parameters as one when the edit runs under ZeRO-3 (see above)."""
    from deepspeed.utils import set_z3_leaf_modules

    from ..edits import SubspaceEdits

    if any(isinstance(m, SubspaceEdits) for m in model.modules()):
        set_z3_leaf_modules(model, [SubspaceEdits])


@contextmanager
def gathered(params):
    """Within the block, ZeRO-3-partitioned parameters among `params` hold their whole values
    on every rank (read-only). A collective step; nothing happens for ordinary parameters."""
    zero = [p for p in params if is_partitioned(p)]
    if not zero:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero, modifier_rank=None):
        yield


def _whole(t: torch.Tensor) -> torch.Tensor:
    full = getattr(t, "full_tensor", None)  # an FSDP2 DTensor: gather its shards
    return (full() if callable(full) else t).detach().cpu().clone().contiguous()


def full_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (edits and router), whole and on the CPU, on every rank.

    `model` is the CSReftModel (unwrapped). Under ZeRO-3 this gathers the adapter's parameters
    only, under FSDP2 each sharded tensor: every rank must call it.
    """
    params = [p for name, p in model.named_parameters() if not name.startswith("base_model.")]
    with gathered(params):
        return {k: _whole(v) for k, v in model.adapter_state_dict(training=True).items()}


def adapter_part(state_dict: dict, model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors out of a whole-model state dict an engine gathered (Trainer hands
    one to _save under FSDP); refuses one whose adapter tensors are missing or not whole."""
    expected = {name: (tuple(getattr(p, "ds_shape", p.shape))) for name, p in _adapter_shapes(model).items()}
    state = {k: _whole(v) for k, v in state_dict.items() if not k.startswith("base_model.")}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"the state dict handed to save lacks adapter tensors {missing[:4]}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(
                f"the state dict handed to save holds {name} with shape {tuple(state[name].shape)}, "
                f"expected {shape}: the engine did not gather it (for FSDP use a FULL_STATE_DICT "
                "state dict type)")
    return {k: state[k] for k in expected}


def _adapter_shapes(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensor name -> the parameter or buffer it comes from."""
    named = dict(model.named_parameters())
    named.update(dict(model.named_buffers()))
    return {k: named.get(k, v) for k, v in model.adapter_state_dict(training=True).items()}


def zero_stage(trainer) -> int | None:
    """The ZeRO stage of a Trainer run under DeepSpeed, else None."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    config = plugin.deepspeed_config if plugin is not None else {}
    return int(config.get("zero_optimization", {}).get("stage", 0))


def end_process_group() -> None:
    """Leave a multi-process run together: every rank waits for the others, then the process
    group is destroyed, as torch asks of a program before it exits. A rank that exits first with
    the group alive can be aborted by gloo's threads at interpreter exit ("terminate called
    without an active exception"), and the launcher then fails the whole run. Call it on the way
    out of a successful run only: after a failure the other ranks may never reach the barrier."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def single_process_launch(parent_cmdline: list[str] | None = None, env=None) -> str | None:
    """Why a launcher that was asked for several processes started this one alone, or None.

    `accelerate launch --cpu --num_processes N` (N > 1) without an MPI hostfile starts one
    plain process and says nothing; a training run would then see 1/N of the data it was
    meant to. Read from the parent process's command line (Linux /proc; elsewhere not known)."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_CPU", "").lower() != "true" or int(env.get("WORLD_SIZE", "1")) > 1:
        return None
    if parent_cmdline is None:
        try:
            raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
        except OSError:
            return None
        parent_cmdline = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
    launched = any(part == "launch" or part.endswith("accelerate.commands.launch") for part in parent_cmdline)
    if not launched or "--mpirun_hostfile" in " ".join(parent_cmdline):
        return None
    for i, part in enumerate(parent_cmdline):
        key, _, value = part.partition("=")
        if key in ("--num_processes", "--num-processes") and (value or i + 1 < len(parent_cmdline)):
            wanted = value or parent_cmdline[i + 1]
            if wanted.isdigit() and int(wanted) > 1:
                return (f"`accelerate launch --cpu --num_processes {wanted}` started one process (accelerate "
                        "runs several CPU processes only through MPI, with --mpirun_hostfile); use "
                        f"`torchrun --nproc_per_node {wanted} -m csreft.cli train ...` on CPUs "
                        "(docs/integrations.md)")
    return None
