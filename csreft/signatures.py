"""Routing a skill library without training a router: signatures and data-free prototypes.

signature of a skill: where its prompts lie at the router's layer. Each prompt is summarised
as the layer-normalised mean of its hidden states over the prompt span (the `mean` summary of
csreft.router); a skill's summaries are kept as a probabilistic PCA (a few KB):

    mean mu (d), top `rank` principal directions U (d, m), their variances v (m), and the
    mean variance s of the other d - m directions:   N(mu, U diag(v) U^T + s (I - U U^T))

An input x (its prompt summary) scores each skill by its log-likelihood there:

    log p_i(x) = -1/2 [ sum_j (U_j.c)^2 / v_j + (|c|^2 - |U^T c|^2) / s + sum_j log v_j + (d - m) log s ],
    c = x - mu_i

prototypes (no data, after PEFT's Arrow): each skill's edit at the router's layer reads its
input through W - R (r x d); its top right singular vector p_i is the direction of hidden
states the edit responds to most. An input scores skill i by the mean over its prompt tokens of
|<LN(h_t), p_i>| (layer-normalised tokens, unit p_i).

Either score becomes gates the same way: softmax(score / temperature), the top_k skills keep
their share renormalised to sum 1, the others get 0 (top_k = 1: a one-hot gate, so an input
routed to skill i gets exactly skill i's edits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ROUTINGS
from .router import span_mask

RANK = 8  # principal directions per signature
KEYS = ("mean", "basis", "variances", "residual", "count")


def prompt_summary(hidden: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """(B, d) float32: the layer-normalised mean of hidden (B, L, d) over [starts, ends)."""
    span = span_mask(hidden.shape[1], starts, ends).to(torch.float32)
    mean = (hidden.float() * span[..., None]).sum(1) / span.sum(1, keepdim=True).clamp(min=1)
    return F.layer_norm(mean, mean.shape[-1:])


def fit(summaries: torch.Tensor, rank: int = RANK) -> dict[str, torch.Tensor]:
    """The signature (float32 tensors) of summaries (N, d), N >= 1."""
    x = summaries.detach().double().cpu()
    n, d = x.shape
    if n < 1:
        raise ValueError("a signature needs at least one prompt")
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    var = s ** 2 / max(n - 1, 1)
    m = min(rank, d - 1)
    top = torch.zeros(m, dtype=x.dtype)
    top[: min(m, len(var))] = var[:m]
    basis = torch.zeros(d, m, dtype=x.dtype)
    basis[:, : min(m, vh.shape[0])] = vh[:m].T
    floor = 1e-4 * max(float((x ** 2).mean()), 1e-8)  # a few (or identical) prompts: no zero variance
    residual = (var[m:].sum() / (d - m)).clamp(min=floor)
    return {"mean": mean.float(), "basis": basis.float(), "variances": top.clamp(min=float(residual)).float(),
            "residual": residual.float().reshape(()), "count": torch.tensor(float(n))}


def stack(signatures: list[dict]) -> dict[str, torch.Tensor]:
    """One table (k leading) from k signatures of the same shape."""
    return {key: torch.stack([s[key] for s in signatures]) for key in KEYS}


def unstack(table: dict[str, torch.Tensor]) -> list[dict]:
    return [{key: table[key][i] for key in KEYS} for i in range(table["mean"].shape[0])]


def check_table(table: dict, k: int, d: int, where: str) -> None:
    """Shapes and finite values of a signature table of k skills, hidden size d."""
    missing = [key for key in KEYS if key not in table]
    if missing:
        raise ValueError(f"{where}: signature tensors {missing} are missing")
    m = table["basis"].shape[-1]
    shapes = {"mean": (k, d), "basis": (k, d, m), "variances": (k, m), "residual": (k,), "count": (k,)}
    for key, shape in shapes.items():
        if tuple(table[key].shape) != shape:
            raise ValueError(f"{where}: signature.{key} has shape {tuple(table[key].shape)}, expected {shape} "
                             f"({k} skills, hidden size {d})")
        if not bool(torch.isfinite(table[key]).all()):
            raise ValueError(f"{where}: signature.{key} holds non-finite values")
    if bool((table["residual"] <= 0).any()) or bool((table["variances"] <= 0).any()):
        raise ValueError(f"{where}: signature variances must be > 0")


def log_likelihood(table: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """(B, k) log-likelihoods of summaries x (B, d) under the k signatures."""
    x = x.float()
    c = x[:, None, :] - table["mean"][None]  # (B, k, d)
    proj = torch.einsum("bkd,kdm->bkm", c, table["basis"])
    d, m = x.shape[-1], table["basis"].shape[-1]
    inside = (proj ** 2 / table["variances"][None]).sum(-1)
    outside = ((c ** 2).sum(-1) - (proj ** 2).sum(-1)).clamp(min=0) / table["residual"][None]
    logdet = table["variances"].log().sum(-1) + (d - m) * table["residual"].log()
    return -0.5 * (inside + outside + logdet[None])


def prototypes(basis: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(k, d) unit prototypes of one layer's edits: basis (k, d, r), weight (k*r, d). A null
    edit (W = R) has a zero prototype."""
    k, d, r = basis.shape
    delta = weight.detach().double().reshape(k, r, d) - basis.detach().double().transpose(1, 2)
    _, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (vh[:, 0, :] * (s[:, :1] > 1e-6 * max(1.0, float(s.max())))).float()


class LibraryRouter(nn.Module):
    """Training-free gates for a library (no parameters): `signatures` scores an input's prompt
    summary by the skills' signatures, `prototypes` by the edits' own directions (see above)."""

    def __init__(self, routing: str, temperature: float = 1.0, top_k: int = 1) -> None:
        super().__init__()
        if routing not in ROUTINGS[1:]:
            raise ValueError(f"routing={routing!r}: a library router is one of {', '.join(ROUTINGS[1:])}")
        self.routing, self.temperature, self.top_k = routing, temperature, top_k

    def scores(self, hidden: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, table) -> torch.Tensor:
        """(B, k) scores from hidden (B, L, d) over the prompt spans [starts, ends); `table`: the
        signature table, or the (k, d) prototypes."""
        if self.routing == "signatures":
            return log_likelihood({k: v.to(hidden.device) for k, v in table.items()},
                                  prompt_summary(hidden, starts, ends))
        span = span_mask(hidden.shape[1], starts, ends).to(torch.float32)  # (B, L)
        n = span.sum(1, keepdim=True).clamp(min=1)
        h = F.layer_norm(hidden.float(), hidden.shape[-1:])
        return (torch.einsum("bld,kd->blk", h, table.to(h.device)).abs() * span[..., None]).sum(1) / n

    def forward(self, hidden, starts, ends, table) -> tuple[torch.Tensor, torch.Tensor]:
        probs = (self.scores(hidden, starts, ends, table) / self.temperature).softmax(-1)
        keep = torch.zeros_like(probs).scatter(-1, probs.topk(min(self.top_k, probs.shape[-1]), -1).indices, 1.0)
        gates = probs * keep
        return gates / gates.sum(-1, keepdim=True).clamp(min=1e-30), probs


MAX_PROMPTS = 1024  # per subspace: a signature of more prompts hardly moves


@torch.no_grad()
def summaries_of(model, examples: list[dict], pad_id: int = 0, batch_size: int = 16, of: str = "signature") -> torch.Tensor:
    """(N, d) prompt summaries of encoded examples (csreft.data: input_ids, prompt_start,
    prompt_length) at the model's signature layer: the signatures' (of="signature") or its
    learned router's own (of="router"); rows left-padded with pad_id (masked, any id does)."""
    from .data import pad_batch

    device = next(model.parameters()).device
    out = []
    for s in range(0, len(examples), batch_size):
        b = pad_batch([{key: e[key] for key in ("input_ids", "prompt_start", "prompt_length")}
                       for e in examples[s:s + batch_size]], pad_id, side="left")
        out.append(model.prompt_summaries(b["input_ids"].to(device), b["attention_mask"].to(device),
                                          b["prompt_starts"], b["prompt_lengths"], of=of).cpu())
    return torch.cat(out)


def signatures_of(model, examples: list[dict], groups: list[int], pad_id: int = 0, batch_size: int = 16,
                  rank: int = RANK, subspaces: int | None = None) -> dict[str, torch.Tensor]:
    """The signature table (one row per routed subspace of `model`) of encoded examples,
    examples[i] belonging to subspace groups[i] (-1: none). Every subspace needs at least one
    example; at most MAX_PROMPTS of each are read (the first ones). `subspaces`: how many
    groups (default: the model's k)."""
    k = model.csreft_config.num_subspaces if subspaces is None else subspaces
    chosen = [[i for i, g in enumerate(groups) if g == j][:MAX_PROMPTS] for j in range(k)]
    empty = [j for j in range(k) if not chosen[j]]
    if empty:
        raise ValueError(f"no prompts for subspace(s) {empty}: a signature needs at least one prompt of its skill")
    return stack([fit(summaries_of(model, [examples[i] for i in part], pad_id, batch_size), rank) for part in chosen])
