"""The edit math: orthonormal bases, isolation between subspaces, LoReFT equivalence."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csreft import SubspaceEdits


def ortho_error(edit: SubspaceEdits) -> float:
    """max |R_i R_i^T - I| over subspaces, and over the whole stack when shared."""
    q = edit.stacked_basis()
    if edit.reflectors.dim() == 2:
        return (q.T @ q - torch.eye(q.shape[1])).abs().max().item()
    b = q.unflatten(1, (edit.num_subspaces, edit.rank)).transpose(0, 1)  # (k, d, r): R_i^T blocks
    return (b.transpose(1, 2) @ b - torch.eye(b.shape[-1])).abs().max().item()


@pytest.mark.parametrize("shared", [True, False])
def test_bases_stay_orthonormal_under_training(shared):
    torch.manual_seed(0)
    edit = SubspaceEdits(48, rank=4, num_subspaces=3, orthogonal_subspaces=shared)
    assert ortho_error(edit) < 1e-5
    opt = torch.optim.Adam(edit.parameters(), lr=0.05)
    h, target = torch.randn(32, 48), torch.randn(32, 48)
    start = edit.stacked_basis().detach().clone()
    for _ in range(50):
        loss = (edit(h, torch.rand(32, 3)) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.allclose(edit.stacked_basis(), start, atol=1e-3)  # it did move
    assert ortho_error(edit) < 1e-5


@pytest.mark.parametrize("shared", [True, False])
def test_weight_decay_does_not_destroy_the_bases(shared):
    """200 AdamW steps with weight decay at SmolLM2's width: orthonormal to 1e-5, not zeroed."""
    torch.manual_seed(0)
    edit = SubspaceEdits(576, rank=4, num_subspaces=4, orthogonal_subspaces=shared)
    opt = torch.optim.AdamW(edit.parameters(), lr=1e-2, weight_decay=0.1)
    h = torch.randn(16, 576)
    for _ in range(200):
        loss = (edit(h, torch.rand(16, 4)) - h.flip(0)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (edit.basis() - edit.anchor).abs().max() > 0.05  # it moved
    assert ortho_error(edit) < 1e-5  # still orthonormal columns, not zeroed


def test_independent_bases_are_not_mutually_orthogonal():
    torch.manual_seed(0)
    edit = SubspaceEdits(16, rank=4, num_subspaces=2, orthogonal_subspaces=False)
    q = edit.stacked_basis()
    assert (q[:, :4].T @ q[:, 4:]).abs().max() > 1e-2  # the paper-literal variant


@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(8, 64), r=st.integers(1, 4), k=st.integers(2, 4),
    seed=st.integers(0, 2**16), direft=st.booleans(),
)
def test_edit_i_never_moves_subspace_j(d, r, k, seed, direft):
    if r * k > d:
        return
    torch.manual_seed(seed)
    edit = SubspaceEdits(d, r, k, "direft" if direft else "loreft", orthogonal_subspaces=True)
    with torch.no_grad():
        edit.weight.normal_()
        edit.bias.normal_()
    h = torch.randn(5, d) * 3
    q = edit.stacked_basis().detach()
    for i in range(k):
        gates = torch.zeros(5, k)
        gates[:, i] = 1.0
        moved = edit(h, gates).detach()
        for j in range(k):
            if j != i:
                rj = q[:, j * r:(j + 1) * r].T
                torch.testing.assert_close(moved @ rj.T, h @ rj.T, atol=1e-4, rtol=1e-4)
        # and edit i moves h only inside span(R_i)
        ri = q[:, i * r:(i + 1) * r]
        off = (moved - h) - (moved - h) @ ri @ ri.T
        assert off.abs().max() < 1e-4


def test_one_subspace_equals_loreft_formula():
    torch.manual_seed(0)
    edit = SubspaceEdits(32, rank=4, num_subspaces=1)
    with torch.no_grad():
        edit.weight.normal_()
        edit.bias.normal_()
    h = torch.randn(10, 32)
    R = edit.stacked_basis().T  # (r, d)
    expected = h + (h @ edit.weight.T + edit.bias - h @ R.T) @ R
    torch.testing.assert_close(edit(h, torch.ones(10, 1)), expected, atol=1e-5, rtol=1e-5)


def test_direft_formula_and_gates_scale_each_subspace():
    torch.manual_seed(0)
    edit = SubspaceEdits(32, rank=2, num_subspaces=2, intervention="direft")
    with torch.no_grad():
        edit.weight.normal_()
        edit.bias.normal_()
    h = torch.randn(4, 32)
    q = edit.stacked_basis()
    g = torch.tensor([[0.3, 0.9]]).expand(4, 2)
    expected = h.clone()
    for i in range(2):
        Ri, Wi, bi = q[:, 2 * i:2 * i + 2].T, edit.weight[2 * i:2 * i + 2], edit.bias[2 * i:2 * i + 2]
        expected = expected + g[:, i:i + 1] * ((h @ Wi.T + bi) @ Ri)
    torch.testing.assert_close(edit(h, g), expected, atol=1e-5, rtol=1e-5)


def test_fresh_edit_is_identity_and_zero_gate_is_identity():
    torch.manual_seed(0)
    edit = SubspaceEdits(32, rank=4, num_subspaces=2)
    h = torch.randn(6, 32)
    torch.testing.assert_close(edit(h, torch.ones(6, 2)), h, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        edit.weight.normal_()
    assert not torch.allclose(edit(h, torch.ones(6, 2)), h, atol=1e-3)
    torch.testing.assert_close(edit(h, torch.zeros(6, 2)), h)


@pytest.mark.parametrize("loreft", [True, False])
def test_independent_subspaces_do_not_depend_on_how_many_others_there_are(loreft):
    """A skill library grows by adding subspaces: an old subspace's output, alone under its
    gate, must stay bit-identical (at a real hidden size, where matmul blocking differs)."""
    torch.manual_seed(0)
    d, r = 576, 4
    small = SubspaceEdits(d, r, 2, "loreft" if loreft else "direft", orthogonal_subspaces=False)
    big = SubspaceEdits(d, r, 3, "loreft" if loreft else "direft", orthogonal_subspaces=False)
    with torch.no_grad():
        small.weight.normal_(), small.bias.normal_()
        big.set_basis(torch.cat([small.basis(), torch.nn.init.orthogonal_(torch.empty(1, d, r))]))
        big.weight.copy_(torch.cat([small.weight, torch.randn(r, d)]))
        big.bias.copy_(torch.cat([small.bias, torch.randn(r)]))
    h = torch.randn(8, 28, d)
    for j in range(2):
        gates = torch.zeros(8, 28, 2)
        gates[..., j] = 1.0
        assert torch.equal(small(h, gates), big(h, torch.cat([gates, torch.zeros(8, 28, 1)], -1)))
