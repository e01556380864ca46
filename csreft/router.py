"""Router: maps one summary vector per sequence to k gates in [0, 1], and its losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _StraightThroughThreshold(torch.autograd.Function):
    """Forward: exact 0/1 = 1[p >= threshold]. Backward: the identity (straight-through)."""

    @staticmethod
    def forward(ctx, probs, threshold):
        return (probs >= threshold).to(probs.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class Router(nn.Module):
    """MLP d -> hidden (ReLU) -> k with sigmoid outputs, on the layer-normalised input.

    The input is normalised without parameters, so the router behaves the same whatever the
    scale of the hidden states it reads (it differs by orders of magnitude across models and
    layers).

    forward(x: (B, d)) -> (gates (B, k), probs (B, k)). `probs` are the sigmoid outputs;
    `gates` are what the edits use:
      soft: gates = probs
      hard: gates = 1[probs >= threshold] forward, d gates / d probs = 1 backward
            (straight-through), so the router still learns
      topk: probs of the top_k subspaces, 0 elsewhere
    Default nn.Linear initialisation: gates start near 0.5 and already depend on the input.
    """

    def __init__(
        self,
        hidden_size: int,
        router_hidden: int,
        num_subspaces: int,
        gating: str = "soft",
        threshold: float = 0.5,
        top_k: int = 1,
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, router_hidden), nn.ReLU(), nn.Linear(router_hidden, num_subspaces)
        )
        self.gating, self.threshold, self.top_k = gating, threshold, top_k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.mlp[0].weight.dtype)
        probs = torch.sigmoid(self.mlp(F.layer_norm(x, x.shape[-1:])))
        if self.gating == "soft":
            return probs, probs
        if self.gating == "hard":
            return _StraightThroughThreshold.apply(probs, self.threshold), probs
        keep = torch.zeros_like(probs).scatter(-1, probs.topk(self.top_k, dim=-1).indices, 1.0)
        return probs * keep, probs


def sparsity_loss(probs: torch.Tensor) -> torch.Tensor:
    """Omega: mean L1 norm of the gates per subspace (gates are >= 0). probs: (B, k)."""
    return probs.mean()


def routing_loss(probs: torch.Tensor, skill_labels: torch.Tensor) -> torch.Tensor:
    """BCE of gate probabilities against one-hot skills; labels < 0 mean "unlabelled".

    probs: (B, k); skill_labels: (B,) ints in [-1, k). Returns 0 when nothing is labelled.
    """
    labelled = skill_labels >= 0
    target = F.one_hot(skill_labels.clamp(min=0), probs.shape[-1]).to(probs.dtype)
    per_example = F.binary_cross_entropy(probs, target, reduction="none").mean(-1)
    return (per_example * labelled).sum() / labelled.sum().clamp(min=1)
