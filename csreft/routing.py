"""How much the gates say about the skill: mutual information between skills and gates.

    nmi       I(skill; strongest gate) / mean(H(skill), H(strongest gate))   (hard assignment)
    soft_nmi  the same with each example spread over the subspaces in proportion to its gates

Both are 0 when the gates are the same for every skill and 1 when each skill has subspaces of
its own that no other skill uses (up to a relabelling of the subspaces).
"""

from __future__ import annotations

import torch


def _entropy(p: torch.Tensor) -> torch.Tensor:
    p = p[p > 0]
    return -(p * p.log()).sum()


def _nmi(joint: torch.Tensor) -> float:
    """Normalised MI of a joint distribution (skills x subspaces), arithmetic-mean normaliser."""
    joint = joint / joint.sum()
    ps, pg = joint.sum(1), joint.sum(0)
    h_s, h_g = _entropy(ps), _entropy(pg)
    if h_s <= 0 or h_g <= 0:
        return 0.0
    mi = h_s + h_g - _entropy(joint.flatten())
    return float((mi / ((h_s + h_g) / 2)).clamp(0.0, 1.0))


def routing_nmi(gates: torch.Tensor, skills) -> dict:
    """gates (N, k) >= 0; skills: N skill ids or names (examples without one are skipped)."""
    gates = torch.as_tensor(gates, dtype=torch.float64).detach().cpu()
    names = [s for s in skills]
    keep = [i for i, s in enumerate(names) if s is not None and s != -1]
    if not keep or gates.shape[-1] < 2:
        return {"nmi": 0.0, "soft_nmi": 0.0, "n": len(keep)}
    index = {s: j for j, s in enumerate(sorted({names[i] for i in keep}, key=str))}
    rows = torch.tensor([index[names[i]] for i in keep])
    g = gates[keep].clamp(min=0)
    onehot = torch.nn.functional.one_hot(rows, len(index)).to(g.dtype)  # (N, S)
    hard = torch.nn.functional.one_hot(g.argmax(-1), g.shape[-1]).to(g.dtype)
    soft = g / g.sum(-1, keepdim=True).clamp(min=1e-12)
    return {"nmi": _nmi(onehot.T @ hard), "soft_nmi": _nmi(onehot.T @ soft), "n": len(keep)}
