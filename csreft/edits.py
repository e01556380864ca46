"""The edit math: k gated low-rank subspace edits of hidden states, on one screen.

For hidden states h (..., d) and gates g (..., k):

    h' = h + sum_i g_i * R_i^T (W_i h + b_i - R_i h)      (loreft)
    h' = h + sum_i g_i * R_i^T (W_i h + b_i)              (direft)

R_i (r x d) has orthonormal rows. All k edits are computed at once from the stacked basis
Q = [R_1^T ... R_k^T] (d x k*r): coordinates c = (W - Q^T) h + b (k*r values), scaled block-wise
by the gates, mapped back with Q. With `orthogonal_subspaces` the whole Q has orthonormal
columns, so R_j R_i^T = 0 for i != j and edit i never moves subspace j's coordinates.

Q is kept orthonormal by construction, with no d x d tensor anywhere: Q = B P(X), where P(X)
is the d x n matrix of n Householder reflections stored in the trainable X (d x n), and B a
d x d orthogonal matrix whose first n columns are the starting basis A (d x n, a buffer), the
rest the directions orthogonal to it, applied as reflections and never formed. That is torch's
trivialised orthogonal map (base @ P(X)) without its d x d base: the same training, 2 d n
numbers instead of d^2 + d n, and Q = A exactly while X is the identity (a loaded adapter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SubspaceEdits(nn.Module):
    """k rank-r edits of d-dimensional hidden states (one layer, one position group).

    Parameters: reflectors X (d x k*r, or k x d x r when subspaces are independent), weight W
    (k*r x d), bias b (k*r); buffer anchor A (X's shape): the basis where X is the identity.
    Initialised to the identity map (A random orthonormal, X = identity, W = A^T, b = 0), so a
    fresh model equals its base model. Read the basis through stacked_basis() / basis(); set it
    with set_basis().
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
        self.reflectors = nn.Parameter(torch.empty(shape))
        self.register_buffer("anchor", torch.empty(shape))
        self.weight = nn.Parameter(torch.empty(k * r, d))
        self.bias = nn.Parameter(torch.zeros(k * r))
        self.dropout = nn.Dropout(dropout)
        self.keep_basis = False  # set by CSReftModel.generate(): the parameters cannot change there
        self._kept: torch.Tensor | None = None
        if not self.reflectors.is_meta:  # a meta (shape-only) model has no values to set
            self.set_basis(torch.stack([nn.init.orthogonal_(torch.empty(shape[-2:])) for _ in range(k)])
                           if len(shape) == 3 else nn.init.orthogonal_(torch.empty(shape)))
            with torch.no_grad():  # contiguous: FSDP and DeepSpeed refuse strided parameters
                self.weight.copy_(self.stacked_basis().T)

    def basis(self) -> torch.Tensor:
        """The orthonormal bases in X's shape: (d, k*r), or (k, d, r) when independent.
        While keep_basis is set (one generate() call) it is computed once and reused."""
        if self.keep_basis and self._kept is not None:
            return self._kept
        q = rotate(self.anchor, householder(self.reflectors))
        self._kept = q if self.keep_basis else None
        return q

    def stacked_basis(self) -> torch.Tensor:
        """Q = [R_1^T ... R_k^T], shape (d, k*r)."""
        with _full_precision(self.reflectors):  # no bf16 triangular solve on the CPU
            q = self.basis()
        return q if q.dim() == 2 else q.permute(1, 0, 2).reshape(self.hidden_size, -1)

    @torch.no_grad()
    def set_basis(self, q: torch.Tensor) -> None:
        """Make `q` (X's shape, orthonormal columns) the basis, exactly: A = q, X = the identity.
        W and b are left as they are."""
        self.anchor.copy_(q)
        self.reflectors.copy_(identity_reflectors(self.reflectors))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Also reads the basis as a saved adapter holds it, Q under `basis` (set_basis)."""
        q = state_dict.pop(prefix + "basis", None)
        if q is not None:
            state_dict[prefix + "anchor"], state_dict[prefix + "reflectors"] = q, identity_reflectors(q)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def delta(self, h: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """sum_i g_i R_i^T (W_i h + b_i [- R_i h]) for h (..., d), gates (..., k) -> (..., d).

        Computed in the parameters' dtype (float32 by default; under autocast too, as for a
        bf16 base with --bf16), returned in h's dtype.
        """
        if self.reflectors.dim() == 3:
            return self._delta_each(h, gates)
        q = self.stacked_basis()
        with _full_precision(q):
            w = self.weight - q.T if self.subtract_projection else self.weight
            coords = self.dropout(F.linear(h.to(q.dtype), w, self.bias))  # (..., k*r)
            coords = coords.unflatten(-1, (self.num_subspaces, self.rank)) * gates.to(q.dtype)[..., None]
            return F.linear(coords.flatten(-2), q).to(h.dtype)

    def _delta_each(self, h: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """delta() for independent bases (a skill library): each subspace's edit by a matmul of
        its own, then the gated sum, so that a subspace's output does not depend on how many
        others there are (a skill added to a library leaves the others' outputs bit-identical)."""
        k, r, d = self.num_subspaces, self.rank, self.hidden_size
        with _full_precision(self.reflectors):
            q = self.basis()  # (k, d, r)
            w = self.weight.view(k, r, d)
            w = w - q.mT if self.subtract_projection else w
            x = h.to(q.dtype).reshape(-1, d)
            coords = self.dropout(torch.matmul(x, w.mT) + self.bias.view(k, 1, r))  # (k, N, r)
            coords = coords * gates.to(q.dtype).expand(*h.shape[:-1], k).reshape(-1, k).T[..., None]
            return torch.matmul(coords, q.mT).sum(0).reshape(h.shape).to(h.dtype)

    def forward(self, h: torch.Tensor, gates: torch.Tensor, delta_only: bool = False) -> torch.Tensor:
        """h + delta(h, gates), or the delta alone. The model's hooks call the module (not
        delta()), so engines that gather parameters around a module call (ZeRO-3) see it run."""
        delta = self.delta(h, gates)
        return delta if delta_only else h + delta


def _full_precision(like: torch.Tensor):
    """Autocast off on `like`'s device: the edits compute in their parameters' dtype."""
    return torch.autocast(like.device.type, enabled=False)


# -- Householder reflections in compact WY form ----------------------------------------------
# n reflectors live in a (..., d, n) matrix x, LAPACK-style: reflector i is v_i = e_i + the part
# of column i below the diagonal (tau_i = 2 / v_i^T v_i); x's diagonal holds a sign per column.
# H_1 ... H_n = I - V T V^T with T^-1 = striu(V^T V) + diag(V^T V) / 2 (the UT transform): two
# thin matmuls and one n x n triangular solve, forward and backward, where torch's
# linalg.householder_product loops over the reflectors with d x d work in its backward.

def _unit_reflectors(x: torch.Tensor):
    d, n = x.shape[-2:]
    eye = torch.eye(d, n, dtype=x.dtype, device=x.device)
    v = x.tril(-1) + eye
    vtv = v.mT @ v
    return eye, v, vtv.triu(1) + torch.diag_embed(vtv.diagonal(dim1=-2, dim2=-1) / 2)


def householder(x: torch.Tensor) -> torch.Tensor:
    """P(x): the first n columns of H_1 ... H_n, column j times sign(x_jj): (..., d, n),
    orthonormal columns (torch's orthogonal_map="householder" without trivialisation). The
    signs are read with sign() and get no gradient, so weight decay never flips or zeroes them."""
    n = x.shape[-1]
    eye, v, t_inv = _unit_reflectors(x)
    q = eye - v @ torch.linalg.solve_triangular(t_inv, v[..., :n, :].mT, upper=True)
    return q * x.diagonal(dim1=-2, dim2=-1).detach().sign().unsqueeze(-2)


def rotate(anchor: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """B m for m (..., d, n), B = [anchor | C] (d x d orthogonal, never formed): the first n
    columns exactly `anchor` (orthonormal columns), C the rest of anchor's Householder QR, a
    basis of the directions orthogonal to it. rotate(anchor, identity) = anchor exactly."""
    n = anchor.shape[-1]
    with torch.no_grad():  # the anchor is fixed: its reflections need no gradient
        a = torch.geqrf(anchor.to(torch.float64))[0].to(anchor.dtype)
    _, v, t_inv = _unit_reflectors(a)  # H(a)'s columns past n span what anchor leaves out
    rest = torch.cat([torch.zeros_like(m[..., :n, :]), m[..., n:, :]], -2)
    return anchor @ m[..., :n, :] + rest - v @ torch.linalg.solve_triangular(t_inv, v.mT @ rest, upper=True)


def identity_reflectors(like: torch.Tensor) -> torch.Tensor:
    """x with householder(x) = the first n axes: -1 on the diagonal, 0 elsewhere."""
    x = torch.zeros_like(like)
    x.diagonal(dim1=-2, dim2=-1).fill_(-1.0)
    return x


def legacy_basis(original: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The basis of an adapter saved in format 1 (torch's trivialised orthogonal
    parametrisation: tensors parametrizations.basis.original and .0.base): base @ P(original)."""
    return base.to(torch.float64) @ householder(original.to(torch.float64))
