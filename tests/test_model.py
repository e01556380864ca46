"""CSReftModel on a tiny random Llama: frozen base, attached edits, positions, routing, I/O."""

import json

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

from conftest import randomize_edits, tiny_llama
from csreft import CSReftConfig, CSReftModel, get_csreft_model
from csreft.model import edit_positions


def ids_batch(batch=2, length=12, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def test_base_frozen_and_untouched_by_training(tiny_csreft):
    model = tiny_csreft
    assert not any(p.requires_grad for p in model.base_model.parameters())
    before = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = ids_batch()
    labels = ids.clone()
    labels[:, :8] = -100
    model.train()
    out = model(ids, labels=labels)
    out.loss.backward()
    for name, p in model.named_parameters():
        if not name.startswith("base_model."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.base_model.parameters())
    opt.step()
    for k, v in model.base_model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert set(model.adapter_state_dict()) and not any(k.startswith("base_model") for k in model.adapter_state_dict())


def test_edits_change_logits_only_from_first_edited_position():
    base = tiny_llama()
    ids = ids_batch(length=16)
    with torch.no_grad():
        ref = base(ids).logits
    # only the last 3 prompt positions (13, 14, 15) are edited
    model = get_csreft_model(base, CSReftConfig(layers=[1, 3], rank=2, num_subspaces=2, positions="l3"))
    randomize_edits(model)
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out[:, :13], ref[:, :13])
    assert (out[:, 13:] - ref[:, 13:]).abs().amax(-1).min() > 1e-3
    # remove_hooks gives the untouched base back
    with torch.no_grad():
        torch.testing.assert_close(model.remove_hooks()(ids).logits, ref)


def test_fresh_model_equals_base(tiny):
    ids = ids_batch()
    with torch.no_grad():
        ref = tiny(ids).logits
        out = get_csreft_model(tiny, CSReftConfig(layers=[0, 2], num_subspaces=2, rank=2))(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_single_subspace_without_router_is_loreft():
    base = tiny_llama()
    cfg = CSReftConfig(layers=[2], rank=4, num_subspaces=1, use_router=False, positions="f2+l2")
    model = get_csreft_model(base, cfg)
    randomize_edits(model)
    assert model.router is None
    ids = ids_batch(batch=1, length=10)
    captured = {}
    layer = base.model.layers[2]
    h = layer.register_forward_hook(lambda m, a, o: captured.update(h=o), prepend=True)
    with torch.no_grad():
        model(ids)
    h.remove()
    edited = {}
    h = layer.register_forward_hook(lambda m, a, o: edited.update(h=o))
    with torch.no_grad():
        model(ids)
    h.remove()
    raw, out = captured["h"][0], edited["h"][0]
    edit = model.edits["2"][0]
    R = edit.stacked_basis().T
    expected = raw.clone()
    for pos in (0, 1, 8, 9):
        x = raw[pos]
        expected[pos] = x + R.T @ (edit.weight @ x + edit.bias - R @ x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_edit_positions_first_last_shared_and_all():
    starts, ends = torch.tensor([2, 0]), torch.tensor([6, 10])
    idx, valid = edit_positions([("f", 3), ("l", 3)], starts, ends, seq_len=12)
    # row 0: prompt 2..5 (4 tokens): first 2,3,4 ; last 3,4,5 -> 3,4 already edited
    assert idx[0][valid[0]].tolist() == [2, 3, 4, 5]
    assert idx[1][valid[1]].tolist() == [0, 1, 2, 7, 8, 9]
    idx, valid = edit_positions([("l", 3)], starts, ends, seq_len=12)
    assert idx[0][valid[0]].tolist() == [3, 4, 5]
    idx, valid = edit_positions([("all", 0)], starts, ends, seq_len=12)
    assert idx[0][valid[0]].tolist() == [2, 3, 4, 5]
    assert idx[1][valid[1]].tolist() == list(range(10))
    idx, valid = edit_positions([("f", 8)], torch.tensor([0]), torch.tensor([3]), seq_len=3)
    assert idx[0][valid[0]].tolist() == [0, 1, 2] and idx.max() <= 2


@pytest.mark.parametrize("share", [True, False])
def test_left_and_right_padding_give_the_same_result(share):
    cfg = CSReftConfig(layers=[1, 2], rank=2, num_subspaces=3, positions="f3+l3", share_positions=share)
    model = get_csreft_model(tiny_llama(), cfg)
    randomize_edits(model, 0.5)
    a, b = ids_batch(1, 9, seed=1)[0], ids_batch(1, 6, seed=2)[0]
    with torch.no_grad():
        single = [model(x[None], prompt_starts=[1]).logits[0] for x in (a, b)]
        right = torch.zeros(2, 9, dtype=torch.long)
        right[0], right[1, :6] = a, b
        rmask = (torch.arange(9) < torch.tensor([[9], [6]])).long()
        out_r = model(right, attention_mask=rmask, prompt_starts=[1, 1])
        left = torch.zeros(2, 9, dtype=torch.long)
        left[0], left[1, 3:] = a, b
        lmask = (torch.arange(9) >= torch.tensor([[0], [3]])).long()
        out_l = model(left, attention_mask=lmask, prompt_starts=[1, 1])
    torch.testing.assert_close(out_r.logits[0], single[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_r.logits[1, :6], single[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_l.logits[1, 3:], single[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_l.gates, out_r.gates, atol=1e-5, rtol=1e-5)


def test_gates_depend_on_input_with_mean_but_not_with_shared_first_token():
    cfg = CSReftConfig(layers=[1, 2], rank=2, num_subspaces=3, router_input="mean")
    model = get_csreft_model(tiny_llama(), cfg)
    ids = ids_batch(2, 10)
    ids[:, 0] = 7  # the same first token (BOS / template) in both prompts
    gates = model.route(ids)
    assert (gates[0] - gates[1]).abs().max() > 1e-4
    model.router.router_input = "first"  # the mode is the router's own
    gates = model.route(ids)
    torch.testing.assert_close(gates[0], gates[1])  # the paper's first-token choice sees no input
    # counting from the user's content (prompt_starts) fixes it
    gates = model.route(ids, prompt_starts=[1, 1])
    assert (gates[0] - gates[1]).abs().max() > 1e-4


def test_route_matches_forward_gates_and_loss_paths_agree(tiny_csreft):
    ids = ids_batch(3, 14)
    labels = ids.clone()
    labels[:, :9] = -100
    with torch.no_grad():
        full = tiny_csreft(ids, labels=labels)
        lean = tiny_csreft(ids, labels=labels, full_logits=False)
        gates = tiny_csreft.route(ids, prompt_lengths=[9, 9, 9])
    torch.testing.assert_close(full.gates, gates)
    torch.testing.assert_close(full.loss, lean.loss, atol=1e-5, rtol=1e-5)
    assert lean.logits is None and full.logits.shape == (3, 14, 128)


def test_router_losses_enter_the_loss():
    cfg = CSReftConfig(layers=[1], rank=2, num_subspaces=3, sparsity_weight=0.5, routing_loss_weight=2.0,
                       balance_weight=0.25)
    model = get_csreft_model(tiny_llama(), cfg)
    ids = ids_batch(2, 10)
    labels = ids.clone()
    labels[:, :6] = -100
    out = model(ids, labels=labels, skill_labels=torch.tensor([0, 2]))
    expected = out.task_loss + 0.5 * out.sparsity_loss + 2.0 * out.routing_loss + 0.25 * out.balance_loss
    torch.testing.assert_close(out.loss, expected)
    assert out.sparsity_loss > 0 and out.routing_loss > 0 and out.balance_loss != 0


def test_hard_gating_in_model_uses_binary_gates_and_trains_router():
    cfg = CSReftConfig(layers=[1, 2], rank=2, num_subspaces=4, gating="hard")
    model = get_csreft_model(tiny_llama(), cfg)
    randomize_edits(model, 0.5)
    ids = ids_batch(4, 10)
    labels = ids.clone()
    labels[:, :6] = -100
    out = model(ids, labels=labels)
    assert set(out.gates.detach().unique().tolist()) <= {0.0, 1.0}
    out.loss.backward()
    assert model.router.mlp[0].weight.grad.abs().sum() > 0


def test_batched_left_padded_generation_equals_single(tiny_csreft):
    prompts = [ids_batch(1, n, seed=n)[0] for n in (5, 9, 7)]
    singles = []
    for p in prompts:
        out = tiny_csreft.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                   prompt_starts=[1], max_new_tokens=8, do_sample=False, pad_token_id=0)
        singles.append(out[0, len(p):])
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    batched = tiny_csreft.generate(ids, attention_mask=mask, prompt_starts=[1, 1, 1],
                                   max_new_tokens=8, do_sample=False, pad_token_id=0)
    for i in range(3):
        assert batched[i, width:].tolist() == singles[i].tolist()
    # edits really change what is generated
    base_out = tiny_csreft.base_model.generate(ids, attention_mask=mask, max_new_tokens=8,
                                               do_sample=False, pad_token_id=0)
    assert not torch.equal(base_out, batched)
    assert tiny_csreft._ctx is None  # nothing is left active after generation


def test_save_load_round_trip(tmp_path, tiny_csreft):
    ids = ids_batch()
    with torch.no_grad():
        ref = tiny_csreft(ids)
    tiny_csreft.save_pretrained(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["csreft_config.json", "csreft_model.safetensors"]
    meta = json.loads((tmp_path / "adapter" / "csreft_config.json").read_text())
    assert meta["base_model"]["hidden_size"] == 64 and meta["csreft_config"]["num_subspaces"] == 3
    loaded = CSReftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    with torch.no_grad():
        out = loaded(ids)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.gates, ref.gates)
    # saving again replaces the directory atomically and leaves no temp dirs behind
    tiny_csreft.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_failed_save_keeps_previous_adapter(tmp_path, tiny_csreft, monkeypatch):
    tiny_csreft.save_pretrained(tmp_path / "adapter")
    before = (tmp_path / "adapter" / "csreft_model.safetensors").read_bytes()
    import csreft.integrity as m

    monkeypatch.setattr(m, "write_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        tiny_csreft.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "csreft_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


@pytest.mark.parametrize("kwargs,field", [({"d": 96}, "hidden_size"), ({"layers": 5}, "num_hidden_layers")])
def test_load_on_another_base_fails_naming_the_mismatch(tmp_path, tiny_csreft, kwargs, field):
    tiny_csreft.save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match=field):
        CSReftModel.from_pretrained(tiny_llama(**kwargs), tmp_path / "a")


def test_load_rejects_missing_or_corrupt_files(tmp_path, tiny_csreft):
    with pytest.raises(FileNotFoundError, match="csreft_config.json"):
        CSReftModel.from_pretrained(tiny_llama(), tmp_path)
    tiny_csreft.save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "csreft_config.json").write_text('{"csreft_config": {"rank": 0}}')
    with pytest.raises(ValueError, match="rank=0"):
        CSReftModel.from_pretrained(tiny_llama(), tmp_path / "a")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"layers": [1, 9]}, "layers=.*4 layers"),
        ({"rank": 20, "num_subspaces": 4}, "rank \\* \\(num_subspaces \\+ shared_subspaces\\).*64"),
        ({"num_subspaces": 0}, "num_subspaces=0"),
        ({"positions": "x7"}, "positions='x7'"),
        ({"positions": "f0"}, "positions"),
        ({"gating": "gumbel"}, "gating='gumbel'.*soft, hard, topk"),
        ({"router_input": "cls"}, "router_input='cls'"),
        ({"intervention": "lora"}, "intervention='lora'"),
        ({"threshold": 1.5}, "threshold"),
        ({"gating": "topk", "top_k": 5, "num_subspaces": 3}, "top_k=5"),
    ],
)
def test_bad_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_csreft_model(tiny_llama(), CSReftConfig(**{"layers": [1], "rank": 2, **kwargs}))


def test_config_json_round_trip():
    cfg = CSReftConfig(layers="3;9", rank=2, positions="F5+L2", gating="topk", top_k=2)
    assert cfg.layers == [3, 9] and cfg.positions == "f5+l2"
    assert CSReftConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown CSReftConfig field"):
        CSReftConfig.from_dict({"rnak": 4})


def test_bad_prompt_span_is_a_clear_error(tiny_csreft):
    with pytest.raises(ValueError, match="example 1.*empty"):
        tiny_csreft(ids_batch(2, 8), prompt_starts=[0, 5], prompt_lengths=[8, 5])
    with pytest.raises(ValueError, match="prompt_starts has 3 entries"):
        tiny_csreft(ids_batch(2, 8), prompt_starts=[0, 1, 2])


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=128, bos_token_id=1, eos_token_id=2)).eval()


def neox():
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                            intermediate_size=128, vocab_size=128, bos_token_id=1, eos_token_id=2)).eval()


@pytest.mark.parametrize("make_base", [gpt2, neox])
def test_other_families_get_edits(make_base):
    base = make_base()
    ids = ids_batch()
    with torch.no_grad():
        ref = base(ids).logits
    model = get_csreft_model(base, CSReftConfig(layers=[1], rank=2, num_subspaces=2, positions="l2"))
    randomize_edits(model)
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out[:, :10], ref[:, :10])
    assert (out[:, 10:] - ref[:, 10:]).abs().max() > 1e-3


class _TupleLayer(nn.Module):
    """A decoder layer that returns (hidden, extra) like transformers 4.x layers did."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states, *args, **kwargs):
        return (self.layer(hidden_states, *args, **kwargs), None)


def test_tuple_returning_layers_are_edited():
    base = tiny_llama()
    ids = ids_batch()
    cfg = CSReftConfig(layers=[1], rank=2, num_subspaces=2, positions="l2")
    plain = get_csreft_model(tiny_llama(), cfg)
    randomize_edits(plain)
    with torch.no_grad():
        expected = plain(ids).logits
    base.model.layers[1] = _TupleLayer(base.model.layers[1])
    captured = {}
    hook = base.model.layers[1].register_forward_hook(lambda m, a, o: captured.update(t=type(o)))
    model = get_csreft_model(base, cfg)
    model.load_state_dict(plain.adapter_state_dict(), strict=False)
    # LlamaModel expects a tensor back from its layers: unwrap after the csreft hook ran
    unwrap = base.model.layers[1].register_forward_hook(lambda m, a, o: o[0])
    with torch.no_grad():
        out = model(ids).logits
    hook.remove(), unwrap.remove()
    assert captured["t"] is tuple
    torch.testing.assert_close(out, expected)


def test_unsupported_model_is_a_clear_error():
    class NotAnLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(ValueError, match="cannot find the decoder layers of NotAnLM"):
        get_csreft_model(NotAnLM(), CSReftConfig(layers=[0], rank=1, num_subspaces=1))


def test_trainable_parameter_counts_are_honest():
    model = get_csreft_model(tiny_llama(), CSReftConfig(layers=[1, 2], rank=2, num_subspaces=3,
                                                       share_positions=False))
    c = model.trainable_parameters()
    d, K = 64, 6
    assert c["edits"] == 2 * 2 * (d * K + K * d + K)  # 2 layers x 2 position groups
    assert c["router"] == d * 128 + 128 + 128 * 3 + 3  # router_hidden 128 (the default)
    assert c["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert c["percent"] == pytest.approx(100 * c["total"] / sum(p.numel() for p in model.base_model.parameters()))


def test_base_calls_after_forward_are_not_edited(tiny_csreft):
    ids = ids_batch()
    base = tiny_csreft.base_model
    tiny_csreft.remove_hooks()
    with torch.no_grad():
        ref = base(ids).logits
    model = get_csreft_model(base, tiny_csreft.csreft_config)
    model.load_state_dict(tiny_csreft.adapter_state_dict(), strict=False)
    labels = ids.clone()
    labels[:, :6] = -100
    model(ids, labels=labels).loss.backward()  # a training pass (grad enabled)
    with torch.no_grad():
        edited = model(ids).logits
        again = base(ids).logits  # the same shape straight through the base: no edits
    assert not torch.allclose(edited, ref, atol=1e-4)
    torch.testing.assert_close(again, ref)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = ids_batch(2, 12)
    labels = ids.clone()
    labels[:, :7] = -100
    grads = []
    for checkpointing in (False, True):
        model = get_csreft_model(tiny_llama(), CSReftConfig(layers=[1, 2], rank=2, num_subspaces=3))
        randomize_edits(model, 0.5)
        if checkpointing:
            base = model.base_model
            enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
            enable({"use_reentrant": False})
        model.train()
        model(ids, labels=labels, full_logits=False).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_adapter_files_are_not_taken_for_peft_ones(tmp_path, tiny_csreft):
    """Hugging Face tooling pointed at our folder says it is not theirs, instead of crashing on
    a PEFT-named file that is not a PEFT adapter."""
    from peft import PeftConfig
    from transformers import AutoModelForCausalLM

    tiny_csreft.save_pretrained(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["csreft_config.json", "csreft_model.safetensors"]
    with pytest.raises(ValueError, match="Can't find"):
        PeftConfig.from_pretrained(str(tmp_path / "a"))
    with pytest.raises((OSError, ValueError), match="config.json"):  # no model here; not a KeyError
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "a"))


def test_adapters_saved_under_the_old_names_still_load(tmp_path, tiny_csreft):
    tiny_csreft.save_pretrained(tmp_path / "a")
    for new, old in (("csreft_config.json", "adapter_config.json"), ("csreft_model.safetensors", "adapter_model.safetensors")):
        (tmp_path / "a" / new).rename(tmp_path / "a" / old)
    ids = torch.randint(3, 128, (2, 9))
    loaded = CSReftModel.from_pretrained(tiny_llama(), tmp_path / "a")
    assert torch.equal(loaded(ids).logits, tiny_csreft.eval()(ids).logits)
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"changed")  # still verified by its checksum
    with pytest.raises(ValueError, match="adapter_model.safetensors: checksum mismatch"):
        CSReftModel.from_pretrained(tiny_llama(), tmp_path / "a")
