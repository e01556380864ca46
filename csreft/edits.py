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
            with torch.no_grad():
                self.weight = nn.Parameter(self.stacked_basis().T.clone())
        self.bias = nn.Parameter(torch.zeros(k * r))
        self.dropout = nn.Dropout(dropout)

    def stacked_basis(self) -> torch.Tensor:
        """Q = [R_1^T ... R_k^T], shape (d, k*r)."""
        q = self.basis
        return q if q.dim() == 2 else q.permute(1, 0, 2).reshape(self.hidden_size, -1)

    def delta(self, h: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """sum_i g_i R_i^T (W_i h + b_i [- R_i h]) for h (..., d), gates (..., k) -> (..., d).

        Computed in the parameters' dtype (float32 by default), returned in h's dtype.
        """
        q = self.stacked_basis()
        x = h.to(q.dtype)
        w = self.weight - q.T if self.subtract_projection else self.weight
        coords = self.dropout(x @ w.T + self.bias)  # (..., k*r)
        coords = coords * gates.to(q.dtype).repeat_interleave(self.rank, dim=-1)
        return (coords @ q.T).to(h.dtype)

    def forward(self, h: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        return h + self.delta(h, gates)
