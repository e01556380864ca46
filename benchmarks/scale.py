#!/usr/bin/env python
"""CS-ReFT at a 7B shape on the CPU: adapter file size, peak memory and step time against the base.

    python benchmarks/scale.py [--shape llama2-7b] [--dtype bfloat16] [--router-hidden 128,2048]
                               [--batch-size 1 --seq-len 32 --new-tokens 4] [--json FILE]

The base is a Llama of the given shape with random weights (built on the meta device, then
materialised on the CPU and filled with N(0, 0.02): no weights are read, 13.6 GB at 7B in
bf16), edits as in the paper: k 4, r 4, layers 3, 9, 18, 24, positions f7+l7. Each measurement
runs in a fresh process that builds only what it measures (one at a time: two 7B bases do not
fit in 24 GB):

  train      reference (frozen base + one trainable scalar after the first edited layer: the
             cheapest backward through the same layers) against csreft at each router width:
             peak RSS over two forward + backward + AdamW steps (AdamW states included), the
             second step's time, the trainable parameters and the saved adapter's size
  generate   base against csreft (default router): peak RSS of greedy decoding
             (--new-tokens) of a --seq-len / 2 token prompt

Peak RSS is VmHWM reset once the model is built (as in benchmarks/speed.py), so the ratios
compare what training or generation adds on top of the same resident weights.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed import SHAPES, Method, _reset_peak_rss, _rss_mb, prompt_batch, train_batch  # noqa: E402

LAYERS = [3, 9, 18, 24]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES), help="Llama shape of the random base")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="dtype of the base weights")
    p.add_argument("--router-hidden", default="128,d/2",
                   help="comma-separated router widths to measure in training (d/2: the paper's)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=32, help="tokens per training row; prompts are half of it")
    p.add_argument("--new-tokens", type=int, default=4, help="tokens generated in the generate part")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads of every measuring process (1: its CPU time is the work itself, see speed.py)")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: train, generate")
    p.add_argument("--json", metavar="FILE", help="write all results to FILE")
    p.add_argument("--probe", help=argparse.SUPPRESS)  # internal: METHOD:PHASE:WIDTH, prints one JSON line
    return p.parse_args(argv)


class _FrozenLinear(torch.autograd.Function):
    """y = x W^T for a frozen W whose input gradient is computed as (W^T g^T)^T with g^T made
    contiguous: torch's CPU bfloat16 matmul takes a slow path for g @ W with both operands
    row-major (11.3 s against 0.19 s for 32 x 11008 by 11008 x 4096 on one core here), which
    would make one 7B backward take most of an hour. Same values; reference and csreft alike."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(weight)
        return torch.nn.functional.linear(x, weight)

    @staticmethod
    def backward(ctx, g):
        (weight,) = ctx.saved_tensors
        rows = g.reshape(-1, g.shape[-1])
        grad = (weight.t() @ rows.t().contiguous()).t()
        return grad.reshape(*g.shape[:-1], weight.shape[1]), None


def _frozen_forward(module, x):
    return _FrozenLinear.apply(x, module.weight)


def random_base(shape: str, dtype: torch.dtype):
    """A Llama of `shape`, built on the meta device and filled in place by tiling one block of
    N(0, 0.02) values: a minute, not the hour a full random initialisation of 7B parameters
    takes on two cores."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, pad_token_id=0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    block = (torch.randn(2**24 + 7, generator=g) * 0.02).to(dtype)  # 7: rows do not repeat in step
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
                continue
            flat = p.view(-1)
            for start in range(0, flat.numel(), block.numel()):
                part = flat[start:start + block.numel()]
                part.copy_(block[: part.numel()])
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its buffers were not filled
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.bias is None:
            module.forward = types.MethodType(_frozen_forward, module)
    return model.eval()


def width_option(width: str, d: int) -> str:
    return "" if width == "default" else f"router_hidden={d // 2 if width == 'd/2' else int(width)}"


def probe(args) -> dict:
    method, phase, width = args.probe.split(":")
    torch.set_num_threads(args.threads)
    base = random_base(args.shape, getattr(torch, args.dtype))
    d = base.config.hidden_size
    opts = SimpleNamespace(layers=LAYERS, csreft_options=width_option(width, d))
    m = Method(method, base, opts, share=False)
    gc.collect()
    _reset_peak_rss()
    start = _rss_mb("VmRSS")
    out = {"start_mb": start}
    if phase == "train":
        batch = train_batch(SimpleNamespace(batch_size=args.batch_size, seq_len=args.seq_len),
                            base.config.vocab_size, "cpu")
        m.train(batch)  # the first step also allocates the AdamW states
        t = time.process_time()
        m.train(batch)
        out["step_cpu_seconds"] = time.process_time() - t
    else:
        ids, mask = prompt_batch(args.batch_size, args.seq_len // 2, base.config.vocab_size, 0, "cpu")
        for _ in range(2):
            m.generate(ids, mask, args.new_tokens, 0)
    out["peak_mb"] = _rss_mb("VmHWM")
    if method == "csreft":
        counts = m.model.trainable_parameters()
        out.update(edit_parameters=counts["edits"], router_parameters=counts["router"], percent=counts["percent"])
        with tempfile.TemporaryDirectory() as tmp:
            m.model.save_pretrained(Path(tmp) / "adapter")
            out["adapter_bytes"] = (Path(tmp) / "adapter" / "csreft_model.safetensors").stat().st_size
            edits_only = {k: v for k, v in m.model.adapter_state_dict().items() if k.startswith("edits.")}
            out["edits_bytes"] = sum(v.numel() * v.element_size() for v in edits_only.values())
    return out


def run_probe(args, spec: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--probe", spec, "--shape", args.shape, "--dtype", args.dtype,
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"probe {spec} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {spec}: done in {time.time() - started:.0f} s", flush=True)
    return result


def report(res: dict) -> None:
    d = SHAPES[res["config"]["shape"]]["hidden_size"]
    print(f"\n{res['config']['shape']} ({res['config']['dtype']} base), edits k 4, r 4, layers {LAYERS}, f7+l7; "
          f"batch {res['config']['batch_size']} x {res['config']['seq_len']}")
    train = res.get("train", {})
    if train:
        ref = train["reference"]
        print(f"train     reference          peak {ref['peak_mb']:9.0f} MiB   step {ref['step_cpu_seconds']:6.1f} s")
        for width, r in train.items():
            if width == "reference":
                continue
            hidden = d // 2 if width == "d/2" else width
            print(f"train     csreft router {hidden!s:>5}  peak {r['peak_mb']:9.0f} MiB x{r['peak_mb'] / ref['peak_mb']:.4f}"
                  f"   step {r['step_cpu_seconds']:6.1f} s x{r['step_cpu_seconds'] / ref['step_cpu_seconds']:.3f}"
                  f"   adapter {r['adapter_bytes'] / 1e6:6.2f} MB (edits {r['edits_bytes'] / 1e6:.2f} MB)"
                  f"   params: edits {r['edit_parameters']:,}, router {r['router_parameters']:,}"
                  f" ({r['percent']:.4f}% of the base)")
    gen = res.get("generate", {})
    if gen:
        print(f"generate  base               peak {gen['base']['peak_mb']:9.0f} MiB")
        print(f"generate  csreft             peak {gen['csreft']['peak_mb']:9.0f} MiB "
              f"x{gen['csreft']['peak_mb'] / gen['base']['peak_mb']:.4f}")


def main(argv=None):
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args)))
        return None
    started = time.time()
    res = {"config": vars(args).copy(), "environment": {"torch": torch.__version__, "cpus": os.cpu_count()}}
    skip = set(args.skip.split(","))
    if "train" not in skip:
        res["train"] = {"reference": run_probe(args, "reference:train:default")}
        for width in args.router_hidden.split(","):
            res["train"][width.strip()] = run_probe(args, f"csreft:train:{width.strip()}")
    if "generate" not in skip:
        res["generate"] = {"base": run_probe(args, "base:generate:default"),
                           "csreft": run_probe(args, "csreft:generate:default")}
    res["wall_seconds"] = time.time() - started
    report(res)
    print(f"\n(total {res['wall_seconds']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
