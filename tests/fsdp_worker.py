"""Run by torch.distributed.run (2 processes, gloo) in the FSDP2 test: the same batch through an
unsharded model and through one whose decoder layers and root are sharded with fully_shard;
writes this rank's max abs differences of logits, adapter gradients and gathered adapter."""

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from conftest import randomize_edits, tiny_llama
from csreft import CSReftConfig, get_csreft_model
from csreft.base_models import find_decoder_layers
from csreft.training.distributed import full_adapter_state

dist.init_process_group("gloo")
torch.manual_seed(0)
config = CSReftConfig(layers=[1, 2], rank=2, num_subspaces=3, positions="f3+l3", router_input="attention")
reference = get_csreft_model(tiny_llama(), config)
randomize_edits(reference, scale=0.5)
with torch.no_grad():
    reference.router.query.normal_()
sharded = copy.deepcopy(reference)
for layer in find_decoder_layers(sharded.base_model):
    fully_shard(layer)
fully_shard(sharded)  # the root: edits, router, embeddings and head

g = torch.Generator().manual_seed(5)
ids = torch.randint(3, 128, (4, 12), generator=g)
mask = torch.ones_like(ids)
mask[0, :3] = 0  # one left-padded row
labels = ids.clone()
labels[:, :7] = -100
batch = dict(input_ids=ids, attention_mask=mask, labels=labels)


def run(model):
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


ref_logits, ref_grads = run(reference)
logits, grads = run(sharded)
whole = {n: g.full_tensor() if hasattr(g, "full_tensor") else g for n, g in grads.items()}
state, ref_state = full_adapter_state(sharded), full_adapter_state(reference)
report = {
    "sharded": sum(hasattr(p, "full_tensor") for p in sharded.parameters()),
    "logits": (logits - ref_logits).abs().max().item(),
    "grad_names_equal": sorted(whole) == sorted(ref_grads),
    "grads": max((whole[n] - ref_grads[n]).abs().max().item() for n in ref_grads),
    "adapter": max((state[k] - ref_state[k]).abs().max().item() for k in ref_state),
    "adapter_shapes": sorted(state) == sorted(ref_state),
}
with open(os.path.join(sys.argv[1], f"fsdp{dist.get_rank()}.json"), "w") as f:
    json.dump(report, f)
dist.destroy_process_group()
