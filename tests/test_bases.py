"""The orthonormal bases without a d x d tensor: the map, what is saved, and old adapters."""

from pathlib import Path

import pytest
import torch
from conftest import randomize_edits, tiny_llama
from safetensors.torch import load_file, save_file
from torch.nn.utils.parametrizations import orthogonal

from csreft import CSReftConfig, CSReftModel, get_csreft_model
from csreft.edits import householder, identity_reflectors, rotate

FORMAT1 = Path(__file__).parent / "data" / "format1"  # written by csreft at commit ef78b50


def ids_batch(batch=2, length=12, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def trained(model, steps=3):
    """Move every basis away from its start (fresh bases equal their anchors)."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ids = ids_batch()
    labels = ids.clone()
    labels[:, :6] = -100
    for _ in range(steps):
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def complete(anchor):
    """B = [anchor | C] of rotate() as an explicit d x d matrix (float64)."""
    d, n = anchor.shape
    a, tau = torch.geqrf(anchor.double())
    full = torch.linalg.householder_product(torch.cat([a, torch.zeros(d, d - n, dtype=a.dtype)], 1),
                                            torch.cat([tau, torch.zeros(d - n, dtype=a.dtype)]))
    return torch.cat([anchor.double(), full[:, n:]], 1)


def test_the_map_is_torchs_trivialised_orthogonal_map_with_an_implicit_base():
    """Value and gradient equal base @ P(X) of torch.nn.utils.parametrizations.orthogonal."""
    torch.manual_seed(0)
    d, n = 40, 6
    anchor = torch.nn.init.orthogonal_(torch.empty(d, n, dtype=torch.float64))
    x = identity_reflectors(anchor) + 0.3 * torch.randn(d, n, dtype=torch.float64).tril(-1)
    holder = torch.nn.Module()
    holder.w = torch.nn.Parameter(anchor.clone())
    orthogonal(holder, "w")
    param = holder.parametrizations.w
    with torch.no_grad():
        param[0].base.copy_(complete(anchor))
        param.original.copy_(x)
    ours_x = x.clone().requires_grad_()
    ours = rotate(anchor, householder(ours_x))
    assert torch.allclose(ours, holder.w, atol=1e-12)
    target = torch.randn(d, n, dtype=torch.float64)
    (holder.w * target).sum().backward()
    (ours * target).sum().backward()
    grad = ours_x.grad.tril(-1)  # the diagonal holds signs: no gradient in either map
    assert torch.allclose(grad, param.original.grad.tril(-1), atol=1e-10)
    assert grad.abs().max() > 1e-3


def test_the_identity_reflectors_give_the_anchor_exactly():
    torch.manual_seed(0)
    for shape in [(48, 8), (3, 48, 4)]:
        anchor = torch.linalg.qr(torch.randn(shape)).Q
        assert torch.equal(rotate(anchor, householder(identity_reflectors(anchor))), anchor)


@pytest.mark.parametrize("shared", [True, False])
def test_no_d_by_d_tensor_in_the_model_or_the_file(tmp_path, shared):
    d = 64
    model = get_csreft_model(tiny_llama(), CSReftConfig(layers=[1, 2], rank=2, num_subspaces=3, positions="f3+l3",
                                                        orthogonal_subspaces=shared))
    for name, t in [*model.edits.named_parameters(), *model.edits.named_buffers()]:
        assert t.shape[-2:] != (d, d), name
    model.save_pretrained(tmp_path / "a")
    saved = load_file(tmp_path / "a" / "csreft_model.safetensors")
    edits = sorted(k for k in saved if k.startswith("edits."))
    assert edits == [f"edits.{layer}.0.{part}" for layer in (1, 2) for part in ("basis", "bias", "weight")]
    assert saved["edits.1.0.basis"].shape == ((d, 6) if shared else (3, d, 2))


@pytest.mark.parametrize("shared", [True, False])
def test_a_saved_adapter_loads_bit_identical(tmp_path, shared):
    model = trained(get_csreft_model(tiny_llama(), CSReftConfig(layers=[1, 2], rank=2, num_subspaces=3,
                                                                positions="f3+l3", orthogonal_subspaces=shared)))
    model.save_pretrained(tmp_path / "a")
    loaded = CSReftModel.from_pretrained(tiny_llama(), tmp_path / "a")
    for layer, groups in model.edits.items():
        assert torch.equal(loaded.edits[layer][0].stacked_basis(), groups[0].stacked_basis())
    ids = ids_batch(seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)
    # and through plain load_state_dict, as users copy adapters between models
    other = get_csreft_model(tiny_llama(), model.csreft_config)
    missing, unexpected = other.load_state_dict(model.adapter_state_dict(), strict=False)
    assert not unexpected and not [k for k in missing if not k.startswith("base_model.")]
    with torch.no_grad():
        assert torch.equal(other.eval()(ids).logits, model(ids).logits)


def test_a_checkpoint_keeps_the_training_tensors_exactly(tmp_path):
    model = trained(get_csreft_model(tiny_llama(), CSReftConfig(layers=[1], rank=2, num_subspaces=2, positions="l2")))
    (tmp_path / "c").mkdir()
    model.write_adapter(tmp_path / "c", training=True)
    saved = load_file(tmp_path / "c" / "csreft_model.safetensors")
    assert {"edits.1.0.reflectors", "edits.1.0.anchor"} <= set(saved) and "edits.1.0.basis" not in saved
    loaded = CSReftModel.from_pretrained(tiny_llama(), tmp_path / "c")
    for key, value in model.adapter_state_dict(training=True).items():
        assert torch.equal(loaded.adapter_state_dict(training=True)[key], value), key


@pytest.mark.parametrize("kind", ["shared", "independent"])
def test_format1_adapters_load_as_the_same_bases(tmp_path, kind):
    """Adapters saved by csreft with torch's parametrisation (d x d base) load, and save anew
    in the new form without a change."""
    expected = load_file(FORMAT1 / "expected_bases.safetensors")
    assert "parametrizations.basis.0.base" in " ".join(load_file(FORMAT1 / kind / "csreft_model.safetensors"))
    loaded = CSReftModel.from_pretrained(tiny_llama(), FORMAT1 / kind)
    for layer, groups in loaded.edits.items():
        want = expected[f"{kind}.edits.{layer}.0.basis"]
        assert torch.allclose(groups[0].stacked_basis(), want, atol=1e-6)
    assert loaded.adapter_metadata["skills"] == ["a", "b", "c"]
    loaded.save_pretrained(tmp_path / "again")
    again = CSReftModel.from_pretrained(tiny_llama(), tmp_path / "again")
    assert again.csreft_config.format_version == 2
    ids = ids_batch(seed=5)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, loaded(ids).logits)


def test_a_damaged_basis_is_refused_before_anything_loads(tmp_path):
    model = trained(get_csreft_model(tiny_llama(), CSReftConfig(layers=[1], rank=2, num_subspaces=2, positions="l2")))
    model.save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "csreft_model.safetensors"
    state = load_file(weights)
    bent = state["edits.1.0.basis"].clone()
    bent[:, 0] += 0.1 * bent[:, 1]  # still full rank, no longer orthonormal
    save_file({**state, "edits.1.0.basis": bent}, weights)
    import json
    meta = json.loads((tmp_path / "a" / "csreft_config.json").read_text())
    del meta["weights_sha256"]
    (tmp_path / "a" / "csreft_config.json").write_text(json.dumps(meta))
    target = get_csreft_model(tiny_llama(), model.csreft_config)
    randomize_edits(target)
    before = {k: v.clone() for k, v in target.adapter_state_dict(training=True).items()}
    with pytest.raises(ValueError, match=r"edits\.1\.0\.basis: the basis is not orthonormal"):
        target.load_adapter_weights(tmp_path / "a")
    assert all(torch.equal(before[k], v) for k, v in target.adapter_state_dict(training=True).items())


def test_router_width_default_and_what_older_configs_meant():
    from csreft.config import CSReftConfig as C

    assert C().router_hidden == 128 and C().router_width(4096) == 128
    assert C(router_hidden=None).router_width(4096) == 2048  # the paper's d // 2
    saved = C(layers=[1]).to_dict()
    del saved["router_hidden"]
    assert C.from_dict({**saved, "format_version": 1}).router_hidden is None  # d // 2 until format 2
    assert C.from_dict(saved).router_hidden == 128
