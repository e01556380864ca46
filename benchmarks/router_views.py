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
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from csreft.evaluation.suites import get_suite
from csreft.router import _nmi

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


def fit_clusters(x: torch.Tensor, k: int, dims: int, rule: str, seed: int, restarts: int = 10, iters: int = 50):
    """(centre, project) fitted on x (N, m): project(y) whitens y as x was; centres in that view."""
    x = F.layer_norm(x.double(), x.shape[-1:])
    mu = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mu, full_matrices=False)
    dims = min(dims, vh.shape[0])
    scale = (s[:dims] / max(len(x) - 1, 1) ** 0.5).clamp(min=1e-12)

    def project(y):
        return (F.layer_norm(y.double(), y.shape[-1:]) - mu) @ vh[:dims].T / scale

    z = project(x.float())
    g = torch.Generator().manual_seed(seed)
    runs = []
    for _ in range(restarts):
        centres = z[torch.randint(len(z), (1,), generator=g)]
        for _ in range(1, k):
            d2 = torch.cdist(z, centres).min(1).values ** 2
            centres = torch.cat([centres, z[torch.multinomial(d2 / d2.sum(), 1, generator=g)]])
        for _ in range(iters):
            assign = torch.cdist(z, centres).argmin(1)
            moved = torch.stack([z[assign == j].mean(0) if (assign == j).any() else centres[j] for j in range(k)])
            if torch.equal(moved, centres):
                break
            centres = moved
        inertia = float(((z - centres[assign]) ** 2).sum())
        p = torch.bincount(assign, minlength=k).double() / len(z)
        runs.append((inertia, float(-(p[p > 0] * p[p > 0].log()).sum()), centres))
    best = min(r[0] for r in runs)
    if rule == "inertia":
        centres = min(runs, key=lambda r: r[0])[2]
    else:
        centres = max((r for r in runs if r[0] <= 1.05 * best), key=lambda r: r[1])[2]
    return centres, project


def nmi_of(assign: torch.Tensor, skills: torch.Tensor, k: int) -> float:
    joint = torch.zeros(int(skills.max()) + 1, k, dtype=torch.float64)
    joint.index_put_((skills, assign), torch.ones(len(assign), dtype=torch.float64), accumulate=True)
    return _nmi(joint)


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
