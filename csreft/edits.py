"""The edit math: k gated low-rank subspace edits of hidden states, on one screen.

For hidden states h (..., d) and gates g (..., k):

    h' = h + sum_i g_i * R_i^T (W_i h + b_i - R_i h)      (loreft)
    h' = h + sum_i g_i * R_i^T (W_i h + b_i)              (direft)

R_i (r x d) has orthonormal rows. All k edits are computed at once from the stacked basis
Q = [R_1^T ... R_k^T] (d x k*r): coordinates c = (W - Q^T) h + b (k*r values), scaled block-wise
by the gates, mapped back with Q. With `orthogonal_subspaces` the whole Q has orthonormal
columns, so R_j R_i^T = 0 for i != j and edit i never moves subspace j's coordinates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import orthogonal


class SubspaceEdits(nn.Module):
    """k rank-r edits of d-dimensional hidden states (one layer, one position group).

    Parameters: basis (d x k*r, or k x d x r when subspaces are independent; orthonormal
    columns by parametrisation), weight W (k*r x d), bias b (k*r). Initialised to the identity
    map (W = Q^T, b = 0), so a fresh model equals its base model.
    """

    def __init__(
        self,
        hidden_size: int,
        rank: int,
        num_subspaces: int,
        intervention: str = "loreft",
        orthogonal_subspaces: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        d, r, k = hidden_size, rank, num_subspaces
        self.hidden_size, self.rank, self.num_subspaces = d, r, k
        self.subtract_projection = intervention == "loreft"
        shape = (d, k * r) if orthogonal_subspaces else (k, d, r)
        self.basis = nn.Parameter(torch.empty(shape))
        nn.init.orthogonal_(self.basis)
        orthogonal(self, "basis")  # keeps the columns orthonormal under any optimiser step
        if self.parametrizations.basis.original.is_meta:  # shape-only model (parameter counts)
            self.weight = nn.Parameter(torch.empty(k * r, d))
        else:
            with torch.no_grad():  # contiguous: FSDP and DeepSpeed refuse strided parameters
                self.weight = nn.Parameter(self.stacked_basis().T.clone(memory_format=torch.contiguous_format))
        self.bias = nn.Parameter(torch.zeros(k * r))
        self.dropout = nn.Dropout(dropout)

    def stacked_basis(self) -> torch.Tensor:
        """Q = [R_1^T ... R_k^T], shape (d, k*r). Read the bases through this method: it stays
        orthonormal under weight decay, while torch's own `self.basis` does not (it reads the
        sign diagonal with .int())."""
        with _full_precision(self.parametrizations.basis.original):  # no bf16 triangular solve on CPU
            q = _householder_basis(self.parametrizations.basis)
            q = self.basis if q is None else q
        return q if q.dim() == 2 else q.permute(1, 0, 2).reshape(self.hidden_size, -1)

    def delta(self, h: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """sum_i g_i R_i^T (W_i h + b_i [- R_i h]) for h (..., d), gates (..., k) -> (..., d).

        Computed in the parameters' dtype (float32 by default; under autocast too, as for a
        bf16 base with --bf16), returned in h's dtype.
        """
        q = self.stacked_basis()
        with _full_precision(q):
            w = self.weight - q.T if self.subtract_projection else self.weight
            coords = self.dropout(F.linear(h.to(q.dtype), w, self.bias))  # (..., k*r)
            coords = coords.unflatten(-1, (self.num_subspaces, self.rank)) * gates.to(q.dtype)[..., None]
            return F.linear(coords.flatten(-2), q).to(h.dtype)

    def forward(self, h: torch.Tensor, gates: torch.Tensor, delta_only: bool = False) -> torch.Tensor:
        """h + delta(h, gates), or the delta alone. The model's hooks call the module (not
        delta()), so engines that gather parameters around a module call (ZeRO-3) see it run."""
        delta = self.delta(h, gates)
        return delta if delta_only else h + delta


def _full_precision(like: torch.Tensor):
    """Autocast off on `like`'s device: the edits compute in their parameters' dtype."""
    return torch.autocast(like.device.type, enabled=False)


def _householder_basis(parametrization) -> torch.Tensor | None:
    """The value of torch's orthogonal parametrisation (Householder map, trivialised) of a tall
    (..., d, n) matrix, by a cheaper route; None where that is not the map in use.

    torch computes base @ (H_1 ... H_n)[:, :n] * sign with H_i = I - tau_i v_i v_i^T through
    linalg.householder_product, whose backward loops over the n reflectors with d x d work
    (19 ms for d = 576, n = 16 on one CPU core; seconds for d = 4096). The same product in
    compact WY form, I - V T V^T with T^-1 = striu(V^T V) + diag(V^T V) / 2 (the UT
    transform; tau_i = 2 / v_i^T v_i), needs two small matmuls and one n x n triangular solve,
    forward and backward. Equal to torch's result up to rounding (~1e-7).
    """
    orth = parametrization[0]
    x, base = parametrization.original, getattr(orth, "base", None)
    if getattr(orth.orthogonal_map, "name", None) != "householder" or base is None or x.is_complex():
        return None
    d, n = x.shape[-2:]
    eye = torch.eye(d, n, dtype=x.dtype, device=x.device)
    v = x.tril(-1) + eye  # reflectors with their implicit unit diagonal
    vtv = v.mT @ v
    t_inv = vtv.triu(1) + torch.diag_embed(vtv.diagonal(dim1=-2, dim2=-1) / 2)
    q = eye - v @ torch.linalg.solve_triangular(t_inv, v[..., :n, :].mT, upper=True)
    # the diagonal of x holds the column signs (+-1) and gets no gradient. torch reads it with
    # .int(), so weight decay (-1 -> -0.99 -> 0) would zero the basis; sign() is immune to that.
    return base @ (q * x.diagonal(dim1=-2, dim2=-1).detach().sign().unsqueeze(-2))
