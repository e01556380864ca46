"""Run by torch.distributed.run in the two-process test: train, then dump this rank's adapter."""

import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from csreft.train import build, fit

opts = json.loads(Path(sys.argv[1]).read_text())
run = build(opts)
fit(run)
state = {k: v.detach().cpu().contiguous() for k, v in run.model.adapter_state_dict().items()}
save_file(state, Path(opts["output_dir"]) / f"rank{os.environ['RANK']}.safetensors")
