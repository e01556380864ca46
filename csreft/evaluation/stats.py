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
