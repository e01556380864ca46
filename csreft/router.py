"""Router: reads the prompt's hidden states, gives k gates per sequence; its losses; and how
much the gates say about the skill (routing_nmi):

    nmi       I(skill; strongest gate) / mean(H(skill), H(strongest gate))   (hard assignment)
    soft_nmi  the same with each example spread over the subspaces in proportion to its gates

Both are 0 when the gates are the same for every skill and 1 when each skill has subspaces of
its own that no other skill uses (up to a relabelling of the subspaces).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def span_mask(seq_len: int, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """(B, seq_len) bool: position t of row b is in the prompt span [starts[b], ends[b])."""
    pos = torch.arange(seq_len, device=starts.device)
    return (pos >= starts[:, None]) & (pos < ends[:, None])


class _StraightThroughThreshold(torch.autograd.Function):
    """Forward: exact 0/1 = 1[p >= threshold]. Backward: the identity (straight-through)."""

    @staticmethod
    def forward(ctx, probs, threshold):
        return (probs >= threshold).to(probs.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class Router(nn.Module):
    """Prompt summary -> MLP d -> hidden (ReLU) -> k with sigmoid outputs.

    summarise(hidden (B, L, d), starts, ends) reads the prompt span [start, end) of each row:
      mean       mean of the span's hidden states
      first/last the span's first / last token
      head       mean of the span's first `head` tokens (where prompts state their request)
      attention  learned attention pooling over the span (one query vector; it starts at zero,
                 i.e. as `mean`, and learns which tokens to read)
    The summary is layer-normalised without parameters, so the router behaves the same whatever
    the scale of the hidden states it reads.

    forward(x: (B, d)) -> (gates (B, k), probs (B, k)). `probs` are the sigmoid outputs;
    `gates` are what the edits use:
      soft:   gates = probs
      hard:   gates = 1[probs >= threshold] forward, d gates / d probs = 1 backward
              (straight-through), so the router still learns
      topk:   probs of the top_k subspaces, 0 elsewhere
      anneal: (1 - a) * probs + a * hard, a = `progress` in [0, 1] (set by the trainer from 0
              at the first step to 1 at the last; 1, i.e. hard, outside training)
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
        router_input: str = "mean",
        head: int = 8,
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, router_hidden), nn.ReLU(), nn.Linear(router_hidden, num_subspaces)
        )
        self.gating, self.threshold, self.top_k = gating, threshold, top_k
        self.router_input, self.head = router_input, head
        if router_input == "attention":
            self.query = nn.Parameter(torch.zeros(hidden_size))
        self.progress = 1.0  # annealed gating: 0 = soft ... 1 = hard (not saved: a loaded router is hard)

    def summarise(self, hidden: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """One vector per row from the prompt span [starts, ends) of hidden (B, L, d)."""
        b = torch.arange(hidden.shape[0], device=hidden.device)
        if self.router_input == "first":
            return hidden[b, starts]
        if self.router_input == "last":
            return hidden[b, ends - 1]
        if self.router_input == "head":
            ends = torch.minimum(ends, starts + self.head)
        span = span_mask(hidden.shape[1], starts, ends)  # (B, L)
        if self.router_input == "attention":
            h = hidden.to(self.query.dtype)
            scores = F.layer_norm(h, h.shape[-1:]) @ self.query / math.sqrt(h.shape[-1])
            weights = scores.masked_fill(~span, float("-inf")).softmax(-1)
            return (weights[..., None] * h).sum(1)
        return (hidden * span[..., None]).sum(1) / span.sum(1, keepdim=True).clamp(min=1)

    def forward(self, x: torch.Tensor, starts: torch.Tensor | None = None,
                ends: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Gates of summaries x (B, d), or of hidden states x (B, L, d) summarised over the spans
        [starts, ends) first (inside the call, so engines that gather parameters around a module
        call, ZeRO-3, see the attention query used)."""
        if starts is not None:
            x = self.summarise(x, starts, ends)
        x = x.to(self.mlp[0].weight.dtype)
        probs = torch.sigmoid(self.mlp(F.layer_norm(x, x.shape[-1:])))
        if self.gating == "soft":
            return probs, probs
        if self.gating in ("hard", "anneal"):
            hard = _StraightThroughThreshold.apply(probs, self.threshold)
            if self.gating == "hard":
                return hard, probs
            return probs + self.progress * (hard - probs), probs
        keep = torch.zeros_like(probs).scatter(-1, probs.topk(self.top_k, dim=-1).indices, 1.0)
        return probs * keep, probs


def sparsity_loss(probs: torch.Tensor) -> torch.Tensor:
    """Omega: mean L1 norm of the gates per subspace (gates are >= 0). probs: (B, k)."""
    return probs.mean()


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of distributions along the last axis; 0 log 0 = 0."""
    return -(p * p.clamp(min=1e-12).log()).sum(-1)


def balance_loss(probs: torch.Tensor) -> torch.Tensor:
    """Information-maximising balance term, in [-1, 1] (lower is better):

        [ mean_b H(p_b) - H(mean_b p_b) ] / log k,    p_b = probs_b / sum(probs_b)

    Low per-example entropy (each input commits to few subspaces) and high entropy of the
    batch-average assignment (all subspaces in use): the unsupervised clustering objective,
    a cousin of mixture-of-experts load balancing. Without it the gates collapse to nearly the
    same vector for every input. probs: (B, k)."""
    k = probs.shape[-1]
    if k < 2:
        return probs.new_zeros(())
    p = probs / probs.sum(-1, keepdim=True).clamp(min=1e-12)
    return (entropy(p).mean() - entropy(p.mean(0))) / math.log(k)


def routing_loss(probs: torch.Tensor, skill_labels: torch.Tensor) -> torch.Tensor:
    """BCE of gate probabilities against one-hot skills; labels < 0 mean "unlabelled".

    probs: (B, k); skill_labels: (B,) ints in [-1, k), or (B, k) 0/1 targets (several skills per
    row; a row of -1 is unlabelled). Returns 0 when nothing is labelled.
    """
    if skill_labels.dim() == 2:
        labelled, target = (skill_labels >= 0).all(-1), skill_labels.clamp(min=0).to(probs.dtype)
    else:
        labelled = skill_labels >= 0
        target = F.one_hot(skill_labels.clamp(min=0), probs.shape[-1]).to(probs.dtype)
    per_example = F.binary_cross_entropy(probs, target, reduction="none").mean(-1)
    return (per_example * labelled).sum() / labelled.sum().clamp(min=1)


# -- routing quality: mutual information between skills and gates ------------------------------
def _nmi(joint: torch.Tensor) -> float:
    """Normalised MI of a joint distribution (skills x subspaces), arithmetic-mean normaliser."""
    joint = joint / joint.sum()
    ps, pg = joint.sum(1), joint.sum(0)
    h_s, h_g = entropy(ps), entropy(pg)
    if h_s <= 0 or h_g <= 0:
        return 0.0
    mi = h_s + h_g - entropy(joint.flatten())
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


# -- starting the router at a clustering of the prompts ------------------------------------------
def kmeans_runs(x: torch.Tensor, k: int, restarts: int = 10, iters: int = 50, seed: int = 0) -> list[tuple]:
    """`restarts` k-means runs on the rows of x (N, m): k-means++ seeding, Lloyd iterations;
    one (cluster ids (N,), centres (k, m), inertia) per run (seeded: the same x, the same runs)."""
    x = x.double()
    g = torch.Generator().manual_seed(seed)
    runs = []
    for _ in range(restarts):
        centres = x[torch.randint(len(x), (1,), generator=g)]
        for _ in range(1, k):
            d2 = torch.cdist(x, centres).min(1).values ** 2
            pick = torch.multinomial(d2 / d2.sum(), 1, generator=g) if d2.sum() > 0 else torch.randint(len(x), (1,), generator=g)
            centres = torch.cat([centres, x[pick]])
        for _ in range(iters):
            assign = torch.cdist(x, centres).argmin(1)
            moved = torch.stack([x[assign == j].mean(0) if (assign == j).any() else centres[j] for j in range(k)])
            if torch.equal(moved, centres):
                break
            centres = moved
        runs.append((assign, centres, float(((x - centres[assign]) ** 2).sum())))
    return runs


def kmeans(x: torch.Tensor, k: int, restarts: int = 10, iters: int = 50, seed: int = 0) -> torch.Tensor:
    """Cluster ids (N,) of the rows of x (N, m): the lowest-inertia of `restarts` k-means runs."""
    return min(kmeans_runs(x, k, restarts, iters, seed), key=lambda run: run[2])[0]


def whitening(x: torch.Tensor, dims: int):
    """The map that centres rows like x's (N, d) and projects them on x's top `dims` principal
    directions, each scaled to unit variance over x."""
    x = x.double()
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    dims = min(dims, vh.shape[0])
    scale = (s[:dims] / max(len(x) - 1, 1) ** 0.5).clamp(min=1e-12)
    return lambda y: (y.double() - mean) @ vh[:dims].T / scale


def whiten(x: torch.Tensor, dims: int) -> torch.Tensor:
    """x (N, d) whitened in its top `dims` principal directions: the view in which prompt
    clusters are skills (docs/results/routing-study.md)."""
    return whitening(x, dims)(x)


def cluster_init(router: Router, summaries: torch.Tensor, dims: int | None = None, steps: int = 300,
                 lr: float = 1e-2, seed: int = 0) -> torch.Tensor:
    """Start `router` at the k-means partition of prompt summaries (N, d) (as the router reads
    them, before its layer norm): cluster the summaries, whitened in their top `dims` principal
    directions (default k: chosen on held-out training phrasings, benchmarks/router_views.py;
    2k and 4k let one skill's phrasings form clusters of their own), into k groups, then fit the
    router's gates to the one-hot clusters (BCE, Adam, full batch). Returns the cluster ids.
    Training then starts from gates that already tell the clusters apart, instead of a balance
    term's local optimum that merges two skills."""
    k = router.mlp[-1].out_features
    assign = kmeans(whiten(F.layer_norm(summaries.double(), summaries.shape[-1:]), dims or k), k, seed=seed)
    summaries = summaries.to(router.mlp[0].weight.dtype)
    target = F.one_hot(assign, k).to(summaries.dtype)
    params = list(router.mlp.parameters())
    frozen = [p for p in params if not p.requires_grad]  # router_init=kmeans-fixed: set here, kept after
    for p in frozen:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            _, probs = router(summaries)
            loss = F.binary_cross_entropy(probs, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for p in frozen:
        p.grad = None
        p.requires_grad_(False)
    return assign
