"""One SmolLM2 training step (CS-ReFT defaults, batch 8 x 128, loss on the last 64 tokens) in
float32 and under bfloat16 autocast, alternated, after a warm-up round: what `--bf16` costs on
this CPU. Prints each step and the bf16 / fp32 ratios.

    python benchmarks/bf16_cpu.py [--rounds 3]
"""

import argparse
import time

import torch

import csreft


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    base, _ = csreft.load_base()
    model = csreft.get_csreft_model(base, csreft.CSReftConfig())
    ids = torch.randint(3, 40000, (8, 128), generator=torch.Generator().manual_seed(0))
    labels = ids.masked_fill(torch.arange(128) < 64, -100)

    def step(bf16: bool) -> tuple[float, float]:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(ids, labels=labels)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - started, out.loss.detach().item()

    seconds = {False: [], True: []}
    for r in range(args.rounds + 1):
        for bf16 in ((False, True) if r % 2 == 0 else (True, False)):
            s, loss = step(bf16)
            if r:
                seconds[bf16].append(s)
            print(f"round {r}{' (warm-up)' if not r else ''} {'bf16' if bf16 else 'fp32'}: {s:.2f} s, loss {loss:.4f}",
                  flush=True)
    ratios = sorted(b / f for b, f in zip(seconds[True], seconds[False]))
    if not ratios:
        return
    print(f"bf16 / fp32 step time: median {ratios[len(ratios) // 2]:.3f} (all {[round(x, 3) for x in ratios]}); "
          f"threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
