"""Router: gating modes, straight-through gradients, sparsity and supervised routing losses."""

import torch

from csreft import Router
from csreft.router import routing_loss, sparsity_loss


def test_hard_gates_are_binary_but_router_still_learns():
    torch.manual_seed(0)
    router = Router(16, 8, 4, gating="hard", threshold=0.5)
    x = torch.randn(12, 16) * 4
    gates, probs = router(x)
    assert set(gates.detach().unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(gates.detach(), (probs >= 0.5).float())
    (gates * torch.randn(12, 4)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router.parameters())


def test_topk_keeps_k_gates():
    torch.manual_seed(0)
    gates, probs = Router(16, 8, 4, gating="topk", top_k=2)(torch.randn(5, 16))
    assert ((gates > 0).sum(-1) == 2).all()
    kept = gates > 0
    torch.testing.assert_close(gates[kept], probs[kept])


def test_sparsity_term_lowers_gate_mass():
    torch.manual_seed(0)
    router = Router(16, 8, 4)
    x = torch.randn(64, 16)
    before = router(x)[1].mean().item()
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    for _ in range(30):
        loss = sparsity_loss(router(x)[1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = router(x)[1].mean().item()
    assert after < before - 0.2, (before, after)


def test_routing_loss_pulls_gates_to_labelled_skill_and_ignores_unlabelled():
    torch.manual_seed(0)
    router = Router(16, 8, 3)
    skills = torch.arange(30) % 3
    x = torch.randn(3, 16)[skills] * 2 + 0.3 * torch.randn(30, 16)  # one cluster per skill
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    for _ in range(100):
        loss = routing_loss(router(x)[1], skills)
        opt.zero_grad()
        loss.backward()
        opt.step()
    probs = router(x)[1]
    assert (probs.argmax(-1) == skills).all()
    unlabelled = torch.full((30,), -1)
    assert routing_loss(probs, unlabelled).item() == 0.0
    mixed = skills.clone()
    mixed[:10] = -1
    torch.testing.assert_close(routing_loss(probs, mixed), routing_loss(probs[10:], skills[10:]))
