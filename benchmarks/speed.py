#!/usr/bin/env python
"""Speed and memory of CS-ReFT against LoReFT, LoRA and the frozen base model.

    python benchmarks/speed.py [--quick] [--json FILE] [--batch-size 8 --seq-len 128 --repeats 7
                               --new-tokens 128] [--threads N] [--clock wall|cpu]
                               [--device cpu|cuda --dtype float32|bfloat16]
                               [--model NAME | --model-shape llama2-7b|tiny]

What is measured, all on one batch of B rows x L tokens whose first half is the prompt (labels
-100 there), edits at --layers (default 3, 9, 18, 24), rank 4, positions f7+l7:

  train     forward + backward + AdamW step, LM head only at labelled positions, of
              reference  the frozen base plus one trainable scalar added to the output of the
                         first edited layer: the cheapest possible backward through the same
                         layers, the floor any method editing that layer pays
              loreft     CS-ReFT with k=1 and no router (LoReFT)
              csreft     CS-ReFT with k=4 and the router
              lora       PEFT LoRA, r=8 on q_proj and v_proj
            and, timed apart on synthetic hidden states (best of 7), the adapter's own work in
            a step: prompt spans, router hook, edit hooks forward + backward, AdamW step.
  generate  greedy decoding of exactly N new tokens (min_new_tokens = max_new_tokens) for the
            base, loreft and csreft, at batch 1 and batch B (left padded, prompts of L/2 down
            to L/4 tokens). prefill tokens/s = padded prompt positions / time to the first
            token; decode tokens/s = B * (N - 1) / time from the first to the last token (also
            B / median time per step, which short stalls on a busy machine do not move).
  mixed     the same decoding at batch --mixed-batch-size (8) where every row of the csreft
            batch has gates of its own (explicit gates: one or two skills per row, as a server
            of several skills would send), against the base.
  memory    peak memory of each method, each in a fresh subprocess that builds only that
            method. CPU: peak resident set size (VmHWM, reset through /proc/self/clear_refs once
            the model is built, so loading spikes do not count; it includes the Python/torch
            runtime and the weights, which all methods share), one thread, and glibc's mmap
            threshold fixed so that freed tensors leave the RSS at once. CUDA:
            torch.cuda.max_memory_allocated. Ratios compare peaks: csreft training against the
            reference step, csreft generation (batch B) against the base. --quick probes only those.

Timing: all methods live in one process and share the base weights; every round runs each
method once, in an order rotated from round to round, after one warm-up round. The ratios
reported are medians of per-round ratios (the two runs of a pair see the same machine load),
with their interquartile range. Wall-clock and process CPU time are both recorded.
On CPU the default is one intra-op thread, timed by CPU time (--clock auto): on a machine that
other jobs share, OpenMP threads wait for each other at every op whenever one of them is
descheduled, which made a 4 x 64 SmolLM2 step take anywhere from 0.7 s to 16 s with two threads
on two busy cores; one thread's CPU time measures the work itself and equals its wall time on
an idle machine. --threads 0 (torch's choice) with --clock wall times what all cores give.
On CUDA every timed region is bracketed by torch.cuda.synchronize and the clock is the wall clock.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import functools
import gc
import importlib
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
import csreft  # noqa: E402
from csreft import CSReftConfig, get_csreft_model  # noqa: E402

TRAIN_METHODS = ("reference", "loreft", "csreft", "lora")
GEN_METHODS = ("base", "loreft", "csreft")
SHAPES = {  # random-initialised Llama shapes (no weights are read)
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=26,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
}
START_SPREAD_MB = 32  # probes whose resident size once built differs by more compare unequal setups
# (csreft's own start is ~8-14 MiB more: its tensors and the LAPACK code its set-up touches)
FULL = dict(batch_size=8, seq_len=128, repeats=7, new_tokens=128)
QUICK = dict(batch_size=4, seq_len=64, repeats=3, new_tokens=16)
TARGETS = {  # key: (comparison, bound)
    "train_ratio_vs_reference": ("<=", 1.10),
    "train_ratio_vs_loreft": ("<=", 1.05),
    "decode_ratio_vs_base": (">=", 0.97),
    "memory_ratio_vs_base": ("<", 1.02),
    "memory_ratio_generate_vs_base": ("<", 1.02),
    "decode_ratio_mixed_vs_base": (">=", 0.97),
}


# -- setup ----------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="batch 4 x 64, 3 repeats, 16 new tokens, 4 memory probes (< 2 min on 2 idle CPU cores)")
    p.add_argument("--json", metavar="FILE", help="write all results to FILE")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--new-tokens", type=int)
    p.add_argument("--gen-batch-sizes", help="comma-separated; default 1 and --batch-size")
    p.add_argument("--layers", default="3,9,18,24")
    p.add_argument("--csreft-options", default="", metavar="KEY=VALUE,...",
                   help="CSReftConfig fields for the csreft method, e.g. router_layer=12,router_input=last")
    p.add_argument("--model", default=csreft.DEFAULT_MODEL, help="base model (name, Hub id or path)")
    p.add_argument("--model-shape", choices=sorted(SHAPES), help="random-initialised Llama of this shape instead of --model")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--threads", type=int,
                   help="torch.set_num_threads; default 1 on CPU (see above), 0 = torch's own choice")
    p.add_argument("--clock", choices=("auto", "wall", "cpu"), default="auto",
                   help="time the headline ratios use (both are recorded): auto = this process's CPU "
                        "time when it runs on one CPU thread, else the wall clock")
    p.add_argument("--mixed-batch-size", type=int, default=8, help="batch of the mixed-gates generation")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: train, lora, generate, mixed, memory")
    p.add_argument("--memory-jobs", type=int, default=0, help="memory subprocesses at once (default 2 on CPU, 1 on CUDA)")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: METHOD:PHASE, prints one JSON line
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cpu = not args.device.startswith("cuda")
    if args.threads is None:
        args.threads = 1 if cpu else 0
    if args.clock == "auto" or not cpu:
        args.clock = "cpu" if cpu and args.threads == 1 else "wall"
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    args.layers = [int(x) for x in args.layers.split(",")]
    args.gen_batch_sizes = sorted({int(x) for x in (args.gen_batch_sizes or f"1,{args.batch_size}").split(",")})
    args.skip = {s for s in args.skip.split(",") if s}
    return args


def csreft_options(text):
    """"router_layer=12,router_input=last" -> {"router_layer": 12, "router_input": "last"}."""
    from csreft.comparison.methods import scalar

    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    return {k.strip(): scalar(v.strip()) for k, v in pairs}


def load_model(args):
    """(base model in eval mode, pad id) on args.device in args.dtype."""
    dtype = getattr(torch, args.dtype)
    if args.model_shape:
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        config = LlamaConfig(**SHAPES[args.model_shape], max_position_embeddings=4096, pad_token_id=0)
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        pad_id = 0
    else:
        model, tokenizer = csreft.load_base(args.model, dtype=dtype)
        model, pad_id = model.to(args.device), tokenizer.pad_token_id
    for p in model.parameters():  # every method trains with the base frozen
        p.requires_grad_(False)
    return model.eval(), pad_id


def shared_copy(model):
    """A copy of `model` with its own modules (and hooks) but the same weight tensors."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def labelled_loss(model, input_ids, attention_mask, labels):
    """Cross-entropy with the LM head applied only where labels are set, as CSReftModel does."""
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    hidden, targets = hidden[:, :-1], labels[:, 1:]
    keep = targets != -100
    return F.cross_entropy(model.get_output_embeddings()(hidden[keep]).float(), targets[keep])


class Method:
    """One thing to time: .train() runs a training step, .generate(...) a decoding run."""

    def __init__(self, name, base, args, share=True):
        """share: work on a copy of `base` sharing its weights (several methods in one process)."""
        self.name, self.model, self.optimizer = name, None, None
        if name == "base":
            self.model = base
            return
        model = shared_copy(base) if share else base
        torch.manual_seed(1)
        if name == "reference":
            scale = torch.nn.Parameter(torch.zeros((), device=model.device))
            layer = csreft.find_decoder_layers(model)[args.layers[0]]

            def add_scale(module, inputs, output):  # h + 0: same values, gradient flows to h
                if isinstance(output, tuple):
                    return (output[0] + scale.to(output[0].dtype), *output[1:])
                return output + scale.to(output.dtype)

            layer.register_forward_hook(add_scale)
            params = [scale]
        elif name in ("loreft", "csreft"):
            k = 4 if name == "csreft" else 1
            extra = csreft_options(args.csreft_options) if name == "csreft" else {}
            config = CSReftConfig(**{"layers": args.layers, "rank": 4, "num_subspaces": k, "positions": "f7+l7",
                                     "use_router": name == "csreft", **extra})
            model = get_csreft_model(model, config)
            params = [p for p in model.parameters() if p.requires_grad]
        elif name == "lora":
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
            model = get_peft_model(model, lora)
            params = [p for p in model.parameters() if p.requires_grad]
        else:
            raise ValueError(f"unknown method {name!r}")
        self.model = model
        # no weight decay (the training recipe's default too): decoupled decay would also shrink
        # the fixed -1 diagonal of the basis's raw tensor, which torch's orthogonal
        # parametrisation reads through int(), and so zero every basis after one step
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

    def train(self, batch):
        if self.name in ("loreft", "csreft"):
            loss = self.model(**batch, full_logits=False).loss
        else:
            model = self.model.get_base_model() if self.name == "lora" else self.model
            loss = labelled_loss(model, **batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def generate(self, input_ids, attention_mask, new_tokens, pad_id, streamer=None, gates=None):
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=pad_id, streamer=streamer)
        if self.name in ("loreft", "csreft"):
            starts = torch.zeros(input_ids.shape[0], dtype=torch.long)
            return self.model.generate(input_ids, attention_mask, prompt_starts=starts, gates=gates, **kw)
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kw)


def train_batch(args, vocab, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (args.batch_size, args.seq_len), generator=g)
    labels = ids.clone()
    labels[:, : args.seq_len // 2] = -100  # the first half of every row is the prompt
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    return {k: v.to(device) for k, v in batch.items()}


def prompt_batch(batch_size, prompt_len, vocab, pad_id, device):
    """Left-padded random prompts; row i has prompt_len - i * prompt_len / (2B) real tokens."""
    g = torch.Generator().manual_seed(2)
    ids = torch.full((batch_size, prompt_len), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i in range(batch_size):
        n = prompt_len - i * prompt_len // (2 * batch_size)
        ids[i, prompt_len - n:] = torch.randint(10, vocab, (n,), generator=g)
        mask[i, prompt_len - n:] = 1
    return ids.to(device), mask.to(device)


class Clock:
    """Streamer that records when the prompt and each new token come out of generate()."""

    def __init__(self):
        self.times = []

    def put(self, value):  # generate() hands over CPU tensors: the device is already synced
        self.times.append((time.perf_counter(), time.process_time()))

    def end(self):
        pass


# -- timing ---------------------------------------------------------------------------------
def summary(values):
    v = sorted(values)
    if len(v) == 1:
        return dict(median=v[0], q1=v[0], q3=v[0], iqr=0.0, min=v[0], values=v)
    q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive")
    return dict(median=statistics.median(v), q1=q1, q3=q3, iqr=q3 - q1, min=v[0], values=v)


def rounds(methods, run, repeats, label):
    """Run each method once per round, order rotated each round; round 0 is a warm-up.

    run(method) returns {metric: value}; the result is {metric: {method: [value per round]}}.
    """
    results = {}
    for r in range(repeats + 1):
        order = methods[r % len(methods):] + methods[: r % len(methods)]
        for m in order:
            gc.collect()
            value = run(m)
            for metric, v in value.items():
                if r > 0:
                    results.setdefault(metric, {}).setdefault(m, []).append(v)
        print(f"  {label}: round {r}/{repeats}{' (warm-up)' if r == 0 else ''} done", file=sys.stderr)
    return results


def paired(results, a, b):
    """Summary of the per-round ratios results[a][i] / results[b][i]."""
    return summary([x / y for x, y in zip(results[a], results[b])])


def bench_train(args, built, sync):
    methods = [m for m in TRAIN_METHODS if m in built]
    device = built[methods[0]].model.device
    batch = train_batch(args, built["reference"].model.config.vocab_size, device)

    def run(m):
        sync()
        t, c = time.perf_counter(), time.process_time()
        built[m].train(batch)
        sync()
        return {"seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - c}

    res = rounds(methods, run, args.repeats, "train")
    out = {}
    for metric, times in res.items():
        out[metric] = {m: summary(times[m]) for m in methods}
        out[f"{metric}_ratios"] = {
            f"{a}/{b}": paired(times, a, b)
            for a in methods for b in ("reference", "loreft") if a != b and b in methods
        }
    out["breakdown"] = bench_breakdown(built, batch, sync)
    fastest = out["seconds"]["reference"]["min"] * 1e3
    for parts in out["breakdown"].values():  # the added work as a fraction of a reference step
        parts["fraction_of_reference_step"] = parts["total_ms"] / fastest
    return out


def bench_breakdown(built, batch, sync, reps=7):
    """CS-ReFT's own work in one training step, timed apart on synthetic hidden states (best of
    `reps` runs, the one a busy machine disturbed least), in ms: the prompt spans (context), the
    router hook, the edit hooks of all edited layers (forward and backward), the AdamW step."""
    out = {}
    for name in ("loreft", "csreft"):
        if name not in built:
            continue
        model, optimizer = built[name].model, built[name].optimizer
        layers = model.csreft_config.layers
        shape = (*batch["input_ids"].shape, model.config.hidden_size)
        like = dict(device=model.device, dtype=model.dtype)
        h0 = torch.randn(shape, **like)  # the first edited layer's input (no gradient)
        # the edited layers' outputs; the first one is not yet part of the graph
        hs = [torch.randn(shape, **like, requires_grad=i > 0) for i in range(len(layers))]
        hooks = [functools.partial(model._edit_hook, str(i)) for i in layers]
        grad = torch.randn(shape, **like)

        def context():
            model._ctx = model._context(batch["input_ids"], batch["attention_mask"], None, None, batch["labels"])

        def route():
            context()
            model._route_hook(None, (h0,), {})
            if model._ctx.probs.requires_grad:
                model._ctx.probs.sum().backward()

        def edit():
            context()
            model._route_hook(None, (h0,), {})
            with torch.nn.utils.parametrize.cached():
                outs = [hook(None, (), h) for hook, h in zip(hooks, hs)]
            torch.autograd.backward(outs, [grad] * len(outs))

        def best(fn, prepare=lambda: None):
            times = []
            for _ in range(reps):
                prepare()
                sync()
                t = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - t)
                optimizer.zero_grad(set_to_none=True)
            return min(times) * 1e3

        t_context, t_route, t_edit = best(context), best(route), best(edit)
        t_step = best(optimizer.step, prepare=edit)
        model._ctx = None
        for h in hs:
            h.grad = None
        out[name] = {"context_ms": t_context, "router_ms": max(0.0, t_route - t_context),
                     "edits_ms": max(0.0, t_edit - t_route), "optimizer_ms": t_step, "total_ms": t_edit + t_step}
    return out


def bench_generate(args, built, pad_id, sync):
    methods = [m for m in GEN_METHODS if m in built]
    model = built["base"].model
    out = {}
    for bs in args.gen_batch_sizes:
        ids, mask = prompt_batch(bs, args.seq_len // 2, model.config.vocab_size, pad_id, model.device)

        res = rounds(methods, lambda m: timed_generate(args, built[m], ids, mask, pad_id, sync), args.repeats,
                     f"generate batch {bs}")
        out[f"batch_{bs}"] = generate_entry(res, methods, ids)
    return out


def timed_generate(args, method, ids, mask, pad_id, sync, gates=None):
    """Prefill and decode rates of one greedy run of exactly args.new_tokens tokens."""
    clock = Clock()
    sync()
    method.generate(ids, mask, args.new_tokens, pad_id, streamer=clock, gates=gates)
    sync()
    assert len(clock.times) == args.new_tokens + 1, (method.name, len(clock.times))
    value, bs = {}, ids.shape[0]
    for i, suffix in ((0, ""), (1, "_cpu")):
        t = [times[i] for times in clock.times]
        steps = [b - a for a, b in zip(t[1:], t[2:])] or [float("nan")]
        value[f"prefill_tokens_per_s{suffix}"] = ids.numel() / (t[1] - t[0])
        value[f"decode_tokens_per_s{suffix}"] = bs * len(steps) / sum(steps)
        # from the median step: what a busy machine's short stalls do not move
        value[f"decode_median_step_tokens_per_s{suffix}"] = bs / statistics.median(steps)
    return value


def generate_entry(res, methods, ids):
    """Per-metric summaries and per-round ratios against the base of rounds() results."""
    entry = {"prompt_len": ids.shape[1]}
    for metric, values in res.items():
        entry[metric] = {m: summary(values[m]) for m in methods}
        entry[metric.replace("tokens_per_s", "ratios")] = {
            f"{m}/base": paired(values, m, "base") for m in methods if m != "base"
        }
    return entry


def bench_mixed(args, built, pad_id, sync):
    """Decoding at batch --mixed-batch-size, every csreft row with gates of its own (one skill
    on even rows, two on odd ones) against the base: edits stay prompt-only, so the decode
    rate should be the base's."""
    bs, k = args.mixed_batch_size, built["csreft"].model.csreft_config.num_subspaces
    model = built["base"].model
    ids, mask = prompt_batch(bs, args.seq_len // 2, model.config.vocab_size, pad_id, model.device)
    gates = torch.zeros(bs, k)
    for i in range(bs):
        gates[i, i % k] = 1.0
        gates[i, (i + 1) % k] += float(i % 2)
    res = rounds(["base", "csreft"], lambda m: timed_generate(args, built[m], ids, mask, pad_id, sync,
                                                             gates if m == "csreft" else None),
                 args.repeats, f"mixed-gates generate batch {bs}")
    return {f"batch_{bs}": {**generate_entry(res, ["base", "csreft"], ids), "gates": gates.tolist()}}


# -- memory ---------------------------------------------------------------------------------
def _rss_mb(field):
    """VmRSS (now) or VmHWM (peak) of this process, in MiB; Linux."""
    text = open("/proc/self/status").read()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) / 1024


def _reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed load-time memory back first
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_probe(args):
    """Build one method, run its phase, print {"start_mb", "peak_mb"} as the last line."""
    method, phase = args.memory_probe.split(":")
    cuda = args.device.startswith("cuda")
    # every probe holds the same modules: what one method alone imports stays resident and would
    # count as its memory (importing csreft's comparison module for --csreft-options once added
    # 100 MiB to the csreft probe, reported as a 1.085-1.109x training memory regression)
    for name in ("peft", "csreft.comparison.methods"):
        importlib.import_module(name)
    base, pad_id = load_model(args)
    m = Method(method, base, args, share=False)
    if phase == "train":
        batch = train_batch(args, base.config.vocab_size, base.device)
        run = lambda: m.train(batch)  # noqa: E731
    else:
        ids, mask = prompt_batch(max(args.gen_batch_sizes), args.seq_len // 2, base.config.vocab_size,
                                 pad_id, base.device)
        run = lambda: m.generate(ids, mask, args.new_tokens, pad_id)  # noqa: E731
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated() / 2**20
    else:
        since_start = not _reset_peak_rss()
        start = float("nan") if since_start else _rss_mb("VmRSS")
    for _ in range(2):  # the second run sees a warm allocator, as in a training loop
        run()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    elif since_start:  # no /proc: the peak since the process started (kB on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    else:
        peak = _rss_mb("VmHWM")
    print(json.dumps({"start_mb": start, "peak_mb": peak}))


def bench_memory(args, specs):
    common = ["--device", args.device, "--dtype", args.dtype, "--batch-size", str(args.batch_size),
              "--seq-len", str(args.seq_len), "--new-tokens", str(args.new_tokens),
              "--gen-batch-sizes", ",".join(map(str, args.gen_batch_sizes)),
              "--layers", ",".join(map(str, args.layers)), "--model", args.model,
              "--csreft-options", args.csreft_options]
    if args.model_shape:
        common += ["--model-shape", args.model_shape]
    if not args.device.startswith("cuda"):
        common += ["--threads", "1"]  # peak RSS barely depends on it; cheaper on a busy machine
    elif args.threads:
        common += ["--threads", str(args.threads)]

    # A fixed mmap threshold stops glibc from keeping freed tensors in its heap (its dynamic
    # threshold does after the first large free), so the peak RSS follows the memory in use
    # instead of the allocator's history: repeated probes then agree within ~2 MiB, not ~40.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}

    def probe(spec):
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-probe", spec, *common]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe {spec} failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    jobs = args.memory_jobs or (1 if args.device.startswith("cuda") else 2)
    with ThreadPoolExecutor(jobs) as pool:
        found = dict(zip(specs, pool.map(probe, specs)))
    out = {}
    for spec, value in found.items():
        method, phase = spec.split(":")
        out.setdefault(phase, {})[method] = value
    starts = [v["start_mb"] for v in found.values() if v["start_mb"] == v["start_mb"]]
    if starts and max(starts) - min(starts) > START_SPREAD_MB:
        print(f"WARNING: the memory probes start {max(starts) - min(starts):.0f} MiB apart once built "
              f"({', '.join('%s %.0f' % (k, v['start_mb']) for k, v in found.items())}): the peaks compare "
              "unequal processes, not the methods' own memory", file=sys.stderr)
    return out


# -- report ---------------------------------------------------------------------------------
def fmt_stat(s, digits=3):
    return f"{s['median']:.{digits}f} [{s['q1']:.{digits}f}-{s['q3']:.{digits}f}]"


def report(args, res):
    tm = "seconds" if args.clock == "wall" else "cpu_seconds"
    sfx = "" if args.clock == "wall" else "_cpu"
    lines = [f"clock: {args.clock} time; load average {res['environment']['loadavg_start']} at the start"]
    if args.csreft_options:
        lines.append(f"csreft options: {args.csreft_options}")
    if "train" in res:
        t = res["train"]
        lines.append(f"\ntrain step, batch {args.batch_size} x {args.seq_len} ({tm}: median [IQR]; "
                     "ratios: median [IQR] of per-round ratios)")
        lines.append(f"{'method':<10} {tm:>24} {'vs reference':>24} {'vs loreft':>24}")
        for m, s in t[tm].items():
            r1 = t[f"{tm}_ratios"].get(f"{m}/reference")
            r2 = t[f"{tm}_ratios"].get(f"{m}/loreft")
            lines.append(f"{m:<10} {fmt_stat(s):>24} {fmt_stat(r1) if r1 else '1':>24} "
                         f"{fmt_stat(r2) if r2 else '-':>24}")
        lines.append("own work of the adapter per step, timed apart (best of 7, ms): "
                     "context / router / edits fwd+bwd / AdamW = total (share of the fastest reference step)")
        for m, b in t["breakdown"].items():
            lines.append(f"{m:<10} {b['context_ms']:.2f} / {b['router_ms']:.2f} / {b['edits_ms']:.2f} / "
                         f"{b['optimizer_ms']:.2f} = {b['total_ms']:.2f} ms ({100 * b['fraction_of_reference_step']:.2f}%)")
    for key, g in [*res.get("generate", {}).items(), *(("mixed gates " + k, v) for k, v in res.get("generate_mixed", {}).items())]:
        lines.append(f"\ngenerate, {key.replace('_', ' ')}, prompt {g['prompt_len']}, {args.new_tokens} new tokens "
                     "(tokens/s: median [IQR])")
        lines.append(f"{'method':<10} {'prefill tok/s':>24} {'decode tok/s':>24} {'decode vs base':>24} "
                     f"{'(from median step)':>24}")
        for m, s in g[f"decode_tokens_per_s{sfx}"].items():
            r = g[f"decode_ratios{sfx}"].get(f"{m}/base")
            r2 = g[f"decode_median_step_ratios{sfx}"].get(f"{m}/base")
            lines.append(f"{m:<10} {fmt_stat(g[f'prefill_tokens_per_s{sfx}'][m], 1):>24} {fmt_stat(s, 1):>24} "
                         f"{fmt_stat(r) if r else '1':>24} {fmt_stat(r2) if r2 else '1':>24}")
    if "memory" in res:
        unit = "max_memory_allocated" if args.device.startswith("cuda") else "peak RSS"
        lines.append(f"\npeak memory ({unit}, MiB; each method in a fresh process)")
        for phase, ref in (("train", "reference"), ("generate", "base")):
            for m, v in res["memory"].get(phase, {}).items():
                base_peak = res["memory"][phase][ref]["peak_mb"]
                lines.append(f"{phase:<9} {m:<10} {v['peak_mb']:>10.1f}   x{v['peak_mb'] / base_peak:.4f} "
                             f"({v['peak_mb'] - base_peak:+.1f}) vs {ref}")
    lines.append("\nsummary (CS-ReFT k=4 in the numerator)")
    for key, (op, bound) in TARGETS.items():
        if key in res:
            ok = res[key] <= bound if op == "<=" else res[key] >= bound if op == ">=" else res[key] < bound
            lines.append(f"{key:<32} {res[key]:.4f}   target {op} {bound}: {'met' if ok else 'MISSED'}")
    for clock, values in res.get("ratios_by_clock", {}).items():
        if clock != args.clock:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if not isinstance(v, dict))
            lines.append(f"(by {clock} time: {shown})")
    print("\n".join(lines))


def headline(res):
    """The three timing ratios, for each clock measured."""
    out = {}
    for clock, tm, sfx in (("wall", "seconds", ""), ("cpu", "cpu_seconds", "_cpu")):
        values = {}
        if "train" in res:
            values["train_ratio_vs_reference"] = res["train"][f"{tm}_ratios"]["csreft/reference"]["median"]
            values["train_ratio_vs_loreft"] = res["train"][f"{tm}_ratios"]["csreft/loreft"]["median"]
        if "generate" in res:
            per_batch = {k: g[f"decode_ratios{sfx}"]["csreft/base"]["median"] for k, g in res["generate"].items()}
            values["decode_ratio_by_batch"] = per_batch
            values["decode_ratio_vs_base"] = min(per_batch.values())  # the worse batch size
        for g in res.get("generate_mixed", {}).values():
            values["decode_ratio_mixed_vs_base"] = g[f"decode_ratios{sfx}"]["csreft/base"]["median"]
        out[clock] = values
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        return memory_probe(args)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    started = time.time()
    base, pad_id = load_model(args)
    wanted = set()
    if "train" not in args.skip:
        wanted |= {m for m in TRAIN_METHODS if m != "lora" or "lora" not in args.skip}
    if "generate" not in args.skip:
        wanted |= set(GEN_METHODS)
    built = {m: Method(m, base, args) for m in (*TRAIN_METHODS, *GEN_METHODS) if m in wanted}
    res = {
        "config": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()},
        "environment": {
            "torch": torch.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name(args.device) if cuda else platform.machine(),
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "base_parameters": sum(p.numel() for p in base.parameters()),
        },
    }
    if "train" not in args.skip:
        res["train"] = bench_train(args, built, sync)
    if "generate" not in args.skip:
        res["generate"] = bench_generate(args, built, pad_id, sync)
        if "mixed" not in args.skip:
            res["generate_mixed"] = bench_mixed(args, built, pad_id, sync)
    res["ratios_by_clock"] = headline(res)
    res.update(res["ratios_by_clock"][args.clock])
    res["environment"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    del built, base
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    if "memory" not in args.skip:
        specs = []  # --quick: only what the headline ratios need
        if "train" not in args.skip:
            train = ("reference", "csreft") if args.quick else TRAIN_METHODS
            specs += [f"{m}:train" for m in train if m != "lora" or "lora" not in args.skip]
        if "generate" not in args.skip:
            specs += [f"{m}:generate" for m in (("base", "csreft") if args.quick else GEN_METHODS)]
        mem = bench_memory(args, specs)
        res["memory"] = mem
        if "train" in mem:
            res["memory_ratio_vs_base"] = mem["train"]["csreft"]["peak_mb"] / mem["train"]["reference"]["peak_mb"]
        if "generate" in mem:
            res["memory_ratio_generate_vs_base"] = (
                mem["generate"]["csreft"]["peak_mb"] / mem["generate"]["base"]["peak_mb"]
            )
    res["wall_seconds"] = time.time() - started
    report(args, res)
    print(f"\n(total {res['wall_seconds']:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
