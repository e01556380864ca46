"""Run by torch.distributed.run in the multi-process tests: train, then dump this rank's
adapter (gathered: a collective step under ZeRO-3) and what the engine did to the parameters."""

import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

try:  # DeepSpeed's shared-memory all-reduce serves inference only; skip compiling it (about a minute)
    import deepspeed.comm.torch

    deepspeed.comm.torch.build_shm_op = lambda: None
except ImportError:
    pass

import torch.distributed as dist

from csreft.training.distributed import end_process_group, full_adapter_state, is_partitioned
from csreft.training.recipe import build, fit

opts = json.loads(Path(sys.argv[1]).read_text())
run = build(opts)
fit(run)
rank = os.environ["RANK"]
model = run.model
report = {
    "base_partitioned": all(is_partitioned(p) and p.numel() == 0 for p in model.base_model.parameters()),
    "edits_partitioned": all(is_partitioned(p) and p.numel() == 0 for p in model.edits.parameters()),
    "counts": model.trainable_parameters(),
}
save_file(full_adapter_state(model), Path(opts["output_dir"]) / f"rank{rank}.safetensors")
(Path(opts["output_dir"]) / f"rank{rank}.json").write_text(json.dumps(report))
end_process_group()
assert not dist.is_initialized()
