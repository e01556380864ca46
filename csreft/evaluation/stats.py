"""Paired statistics of two methods scored on the same examples: McNemar's test and a paired
bootstrap of the accuracy difference."""

from __future__ import annotations

import math

import torch


def _paired(a, b) -> tuple[list[float], list[float]]:
    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) != len(b) or not a:
        raise ValueError(f"paired results need equal, nonzero lengths; got {len(a)} and {len(b)}")
    return a, b


def mcnemar(correct_a, correct_b, exact: bool | None = None) -> float:
    """Two-sided McNemar p-value for paired correctness lists (same records, same order).

    Only discordant pairs count: n01 = a right, b wrong; n10 = a wrong, b right. exact (default
    when n01 + n10 < 25): binomial test, p = min(1, 2 P[Bin(n, 1/2) <= min(n01, n10)]); else the
    chi-square approximation with continuity correction. No discordant pairs: p = 1.
    """
    a, b = _paired(correct_a, correct_b)
    n01 = sum(1 for x, y in zip(a, b) if x and not y)
    n10 = sum(1 for x, y in zip(a, b) if y and not x)
    n = n01 + n10
    if n == 0:
        return 1.0
    if exact is None:
        exact = n < 25
    if exact:
        tail = sum(math.comb(n, i) for i in range(min(n01, n10) + 1))
        return min(1.0, 2 * tail / 2**n)
    chi2 = max(0, abs(n01 - n10) - 1) ** 2 / n
    return math.erfc(math.sqrt(chi2 / 2))


def paired_bootstrap(correct_a, correct_b, n: int = 10000, seed: int = 0,
                     confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean(a - b), CI low, CI high): percentile bootstrap over records, resampled in pairs.

    Works for correctness (bools) and any per-record scores; deterministic per seed.
    """
    a, b = _paired(correct_a, correct_b)
    diff = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    means = []
    for i in range(0, n, 1000):
        idx = torch.randint(len(diff), (min(1000, n - i), len(diff)), generator=gen)
        means.append(diff[idx].mean(1))
    means = torch.cat(means)
    alpha = (1.0 - confidence) / 2
    lo, hi = torch.quantile(means, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)).tolist()
    return float(diff.mean()), lo, hi


def paired_over_seeds(correct_a, correct_b, n: int = 2000, seed: int = 0) -> dict:
    """Two methods, each trained with the same seeds and scored on the same records (one list of
    answers per seed: right/wrong or any per-record score, None where a record was not scored).
    The record is the unit: its paired observation is the mean over seeds of a - b, so k seeds'
    answers on one record count once, not as k independent records (which would narrow the CI
    about sqrt(k)-fold when seeds agree).

    Returns n (records with an answer from both in every seed), difference (mean), ci95 (paired
    bootstrap over records), p and test: McNemar's test for one seed; for several, a two-sided
    sign-flip test of the per-record differences (McNemar's exact test is its one-seed case),
    `n` random flips; per_seed: each seed's difference on those records."""
    if len(correct_a) != len(correct_b) or not correct_a:
        raise ValueError(f"paired seeds need equal, nonzero counts; got {len(correct_a)} and {len(correct_b)}")
    if len({len(c) for c in (*correct_a, *correct_b)}) != 1:
        raise ValueError("every seed must answer the same records")
    keep = [i for i in range(len(correct_a[0]))
            if all(c[i] is not None for c in (*correct_a, *correct_b))]
    if not keep:
        raise ValueError("no record has an answer from both methods in every seed")
    a = [[float(c[i]) for i in keep] for c in correct_a]
    b = [[float(c[i]) for i in keep] for c in correct_b]
    k = len(a)
    mean_a = [sum(s[i] for s in a) / k for i in range(len(keep))]
    mean_b = [sum(s[i] for s in b) / k for i in range(len(keep))]
    diff, lo, hi = paired_bootstrap(mean_a, mean_b, n=n, seed=seed)
    if k == 1:
        p, test = mcnemar(a[0], b[0]), "mcnemar"
    else:
        d = torch.tensor(mean_a, dtype=torch.float64) - torch.tensor(mean_b, dtype=torch.float64)
        gen = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (n, len(d)), generator=gen, dtype=torch.float64) * 2 - 1
        extreme = int(((signs * d).sum(1).abs() >= d.sum().abs() - 1e-12).sum())
        p, test = (1 + extreme) / (1 + n), "sign-flip"
    per_seed = [sum(x - y for x, y in zip(sa, sb)) / len(keep) for sa, sb in zip(a, b)]
    return {"n": len(keep), "seeds": k, "accuracy_difference": diff, "ci95": [lo, hi], "p": p, "test": test,
            "per_seed": per_seed}
