"""What should an unsupervised router read? An offline screen, no training: which view of the
prompt (layer, pooling, whitening) lets k-means find the skills, on phrasings it has not seen.

    python benchmarks/router_views.py --suites paraphrase,builtin --json docs/results/data/router-views.json

For each suite the base runs once over the training records (forward only) and every view's
prompt summaries are kept: the input of layer L (what a router at L reads), pooled over the
prompt span as `mean`, `head` (first 4 tokens) or `head+mean` (both, each layer-normalised,
concatenated). A view's clustering is csreft.router's: layer norm, whitening in the top
`dims` principal directions, k-means++ with 10 restarts. Two rules choose among the restarts:
`inertia` (k-means' own, what router_init=kmeans uses) and `balance` (the restart whose cluster
sizes have the highest entropy among those within 5% of the lowest inertia; the balance term
assumes skills of similar frequency too).

Validation never reads a test split: on paraphrase, each of the 5 training phrasings is held
out in turn (leave-one-phrasing-out): clusters are fitted on a sample of `--fit` prompts of the
other 4 and the held-out phrasing's prompts are assigned to the nearest centre; NMI against
the skills. On builtin (one template per skill) the held-out part is a random fifth of the
training records. Each fit is repeated on `--samples` random samples; the table gives the mean
and the worst NMI over folds and samples.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from csreft.evaluation.suites import get_suite
from csreft.router import kmeans_runs, routing_nmi, whitening

SIZES = {"builtin": dict(train_per_skill=60, test_per_skill=1),
         "classification": dict(train_per_skill=300, test_per_skill=1),
         "paraphrase": dict(train_per_skill=300, test_per_skill=1)}
HEAD = 4


@torch.no_grad()
def pooled(suite, layers: list[int], batch_size: int = 16) -> dict[str, torch.Tensor]:
    """{"L<l>/<pool>": (N, d)} over suite.train, in record order."""
    from csreft.base_models import load_base
    from csreft.data import encode_example, pad_batch, template_parts
    from csreft.router import span_mask

    base, tok = load_base()
    base.eval()
    parts = template_parts(tok)
    enc = [encode_example(tok, r["prompt"], parts=parts) for r in suite.train]
    out: dict[str, list] = {}
    for s in range(0, len(enc), batch_size):
        b = pad_batch(enc[s:s + batch_size], tok.pad_token_id, side="left")
        hs = base(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True).hidden_states
        pad = b["input_ids"].shape[1] - b["attention_mask"].sum(1)
        starts, ends = pad + b["prompt_starts"], pad + b["prompt_lengths"]
        spans = {"mean": span_mask(hs[0].shape[1], starts, ends),
                 "head": span_mask(hs[0].shape[1], starts, torch.minimum(ends, starts + HEAD))}
        for layer in layers:
            h = hs[layer].float()  # the input of decoder layer `layer`
            for name, m in spans.items():
                out.setdefault(f"L{layer}/{name}", []).append((h * m[..., None]).sum(1) / m.sum(1, keepdim=True))
    views = {key: torch.cat(v) for key, v in out.items()}
    for layer in layers:
        views[f"L{layer}/head+mean"] = torch.cat([F.layer_norm(views[f"L{layer}/{p}"], (views[f"L{layer}/{p}"].shape[-1],))
                                                  for p in ("head", "mean")], 1)
    return views


def fit_clusters(x: torch.Tensor, k: int, dims: int, rule: str, seed: int, restarts: int = 10):
    """(centres, project) fitted on x (N, m) as csreft.router.cluster_init clusters (layer norm,
    whitening, k-means restarts), the restart chosen by `rule`: project(y) maps y to the view
    the centres are in."""
    whitened = whitening(F.layer_norm(x.double(), x.shape[-1:]), dims)

    def project(y):
        return whitened(F.layer_norm(y.double(), y.shape[-1:]))

    runs = kmeans_runs(project(x), k, restarts, seed=seed)
    if rule == "inertia":
        return min(runs, key=lambda r: r[2])[1], project
    low = min(r[2] for r in runs)

    def evenness(run):
        p = torch.bincount(run[0], minlength=k).double() / len(x)
        return float(-(p[p > 0] * p[p > 0].log()).sum())

    return max((r for r in runs if r[2] <= 1.05 * low), key=evenness)[1], project


def nmi_of(assign: torch.Tensor, skills: torch.Tensor, k: int) -> float:
    return routing_nmi(F.one_hot(assign, k), skills.tolist())["nmi"]


def screen(name: str, args) -> dict:
    suite = get_suite(name, **SIZES[name])
    k = len(suite.skills)
    skills = torch.tensor([suite.skills.index(r["skill"]) for r in suite.train])
    if name == "paraphrase":
        fold = torch.tensor([r["phrasing"] for r in suite.train])
    else:
        fold = torch.randperm(len(suite.train), generator=torch.Generator().manual_seed(0)) % 5
    started = time.time()
    views = pooled(suite, args.layers)
    forward_s = time.time() - started
    rows = []
    for view, x in views.items():
        for dims in args.dims:
            for rule in ("inertia", "balance"):
                scores = []
                for f in range(5):
                    held, rest = (fold == f).nonzero()[:, 0], (fold != f).nonzero()[:, 0]
                    for sample in range(args.samples):
                        g = torch.Generator().manual_seed(1000 * sample + f)
                        pick = rest[torch.randperm(len(rest), generator=g)[:args.fit]]
                        centres, project = fit_clusters(x[pick], k, dims * k, rule, seed=sample)
                        assign = torch.cdist(project(x[held]), centres).argmin(1)
                        scores.append(nmi_of(assign, skills[held], k))
                rows.append({"view": view, "dims": f"{dims}k", "rule": rule, "nmi_mean": round(sum(scores) / len(scores), 3),
                             "nmi_min": round(min(scores), 3), "n": len(scores)})
                print(f"{name:12s} {view:14s} dims={dims}k {rule:8s} NMI mean {rows[-1]['nmi_mean']:.3f} "
                      f"min {rows[-1]['nmi_min']:.3f}", flush=True)
    return {"suite": name, "sizes": SIZES[name], "fit": args.fit, "samples": args.samples,
            "forward_seconds": round(forward_s, 1), "rows": rows}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suites", default="paraphrase,builtin")
    p.add_argument("--layers", default="3,6,9,12,18", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--dims", default="1,2,4", type=lambda s: [int(x) for x in s.split(",")],
                   help="whitening directions, in multiples of k")
    p.add_argument("--fit", type=int, default=512, help="prompts per fit (router_init=kmeans reads 512)")
    p.add_argument("--samples", type=int, default=3, help="random fit samples per fold")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    results = [screen(s, args) for s in args.suites.split(",")]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
