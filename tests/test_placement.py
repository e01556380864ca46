"""Placement (each subspace at its own layers / position group) and per-layer gates."""

import pytest
import torch

from conftest import randomize_edits, tiny_llama
from csreft import CSReftConfig, CSReftModel, get_csreft_model


def ids_batch(batch=2, length=12, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def make(**overrides):
    cfg = dict(layers=[1, 2], rank=2, num_subspaces=3, positions="f3+l3")
    cfg.update(overrides)
    model = get_csreft_model(tiny_llama(0), CSReftConfig(**cfg))
    randomize_edits(model, 0.5)
    return model.eval()


def same_edits(dst, src):
    dst.edits.load_state_dict(src.edits.state_dict())
    return dst


GATES = torch.tensor([[1.0, 0.5, -1.0], [0.3, 1.0, 2.0]])


def test_per_layer_gates_that_agree_across_layers_equal_plain_gates():
    model = make()
    ids = ids_batch()
    with torch.no_grad():
        plain = model(ids, gates=GATES).logits
        layered = model(ids, gates=GATES[:, None, :].expand(2, 2, 3)).logits
        whole = model(ids, gates=GATES[:1, None, :].expand(1, 2, 3)).logits  # one row for the batch
        first = model(ids, gates=GATES[:1]).logits
    assert torch.equal(plain, layered) and torch.equal(whole, first)


def test_a_layer_gated_off_is_a_model_without_that_layer():
    model = make()
    one = get_csreft_model(tiny_llama(0), CSReftConfig(layers=[1], rank=2, num_subspaces=3, positions="f3+l3")).eval()
    one.edits["1"].load_state_dict(model.edits["1"].state_dict())
    ids = ids_batch()
    layered = torch.stack([GATES, torch.zeros_like(GATES)], 1)  # (B, layers, k): layer 2 off
    with torch.no_grad():
        assert (model(ids, gates=layered).logits - one(ids, gates=GATES).logits).abs().max() < 1e-6
        assert not torch.allclose(model(ids, gates=GATES).logits, one(ids, gates=GATES).logits)


def test_layer_placement_equals_per_layer_gates_of_an_unplaced_model():
    placed = make(placement="1;2x2")  # subspace 0 at layer 1, subspaces 1 and 2 at layer 2
    free = same_edits(make(), placed)
    ids = ids_batch()
    mask = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])  # (layers, k)
    with torch.no_grad():
        got = placed(ids, gates=GATES).logits
        want = free(ids, gates=GATES[:, None, :] * mask).logits
        routed_placed, routed_free = placed(ids), free(ids)  # the router's gates are placed too
        want_routed = free(ids, gates=routed_free.gates[:, None, :] * mask).logits
    assert (got - want).abs().max() < 1e-6
    assert (routed_placed.logits - want_routed).abs().max() < 1e-6


def test_position_placement_leaves_the_other_group_unedited():
    placed = make(share_positions=False, placement="1,2@f;1,2@l;1,2")
    free = same_edits(make(share_positions=False), placed)
    with torch.no_grad():  # reference: subspace 0's edit made null (W = R, b = 0) in group l, 1's in group f
        for group in free.edits.values():
            for g, sub in ((1, 0), (0, 1)):
                edit, r = group[g], 2
                q = edit.stacked_basis()
                edit.weight[sub * r:(sub + 1) * r] = q[:, sub * r:(sub + 1) * r].T
                edit.bias[sub * r:(sub + 1) * r] = 0
        ids = ids_batch(length=10)
        diff = (placed(ids, gates=GATES).logits - free(ids, gates=GATES).logits).abs().max()
    assert diff < 1e-5


def test_placement_round_trips_through_save_and_load(tmp_path):
    model = make(placement="1x2;2")
    model.save_pretrained(tmp_path / "a")
    back = CSReftModel.from_pretrained(tiny_llama(0), tmp_path / "a").eval()
    assert back.csreft_config.placement == "1x2;2"
    ids = ids_batch()
    with torch.no_grad():
        assert torch.equal(back(ids, gates=GATES).logits, model(ids, gates=GATES).logits)
        assert not torch.equal(model(ids, gates=GATES).logits, same_edits(make(), model)(ids, gates=GATES).logits)


def test_per_layer_gates_can_be_fitted_and_the_base_stays_frozen():
    model = make()
    weights = torch.ones(1, 2, 3, requires_grad=True)
    ids = ids_batch()
    labels = ids.clone()
    labels[:, :6] = -100  # a 6-token prompt, then the response
    loss = model(ids, labels=labels, gates=weights).loss
    loss.backward()
    assert weights.grad is not None and weights.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.base_model.parameters())


def test_bad_per_layer_gates_and_placements_name_the_problem():
    model = make()
    with pytest.raises(ValueError, match=r"gates has shape \(1, 3, 3\).*or \(2, 2, 3\) per edited layer"):
        model(ids_batch(), gates=torch.ones(1, 3, 3))
    for spec, msg in (("1;2", "places 2 subspaces, num_subspaces is 3"),
                      ("1;2;5", r"entry '5': its layers must be among the edited layers \[1, 2\]"),
                      ("1@f;2;2", "@f / @l need positions fN\\+lN with share_positions false"),
                      ("1;2;two", "LAYERS\\[@f\\|@l\\]\\[xN\\]")):
        with pytest.raises(ValueError, match=msg):
            CSReftConfig(layers=[1, 2], num_subspaces=3, placement=spec)


def test_generated_tokens_are_edited_as_the_response_is_in_training():
    """edit_generated: the logits of greedy decoding (one edited token per step) equal a
    full-sequence pass over prompt + generated tokens with the response edited."""
    model = make(edit_generated=True, positions="f2+l2", placement="1;2;1,2")
    plain = same_edits(make(positions="f2+l2", placement="1;2;1,2"), model)
    ids = ids_batch(2, 9)
    with torch.no_grad():
        gen = model.generate(ids, torch.ones_like(ids), gates=GATES, max_new_tokens=5, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
        full = gen.sequences
        lengths = torch.full((2,), ids.shape[1])
        teacher = model(full, prompt_lengths=lengths, gates=GATES).logits
        step_logits = torch.stack(gen.scores, 1)  # (B, 5, V): predictions of tokens 9..13
        assert (teacher[:, ids.shape[1] - 1:-1] - step_logits).abs().max() < 1e-4
        # without edit_generated the response is left alone: the prompt logits agree, later ones not
        other = plain(full, prompt_lengths=lengths, gates=GATES).logits
        assert (other[:, :ids.shape[1]] - teacher[:, :ids.shape[1]]).abs().max() < 1e-6
        assert (other[:, ids.shape[1]:] - teacher[:, ids.shape[1]:]).abs().max() > 1e-3
        # gates 0 on every subspace: the base model, decoding included
        zero = model.generate(ids, torch.ones_like(ids), gates=[0.0, 0.0, 0.0], max_new_tokens=5, do_sample=False,
                              pad_token_id=0, eos_token_id=None)
        base = model.base_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                         pad_token_id=0, eos_token_id=None)
    assert torch.equal(zero, base)


def test_generated_edits_need_one_token_per_step():
    model = make(edit_generated=True)
    ids = ids_batch(1, 9)
    with pytest.raises(RuntimeError, match="use_cache=True"):
        model.generate(ids, torch.ones_like(ids), max_new_tokens=2, use_cache=False, pad_token_id=0)


def test_a_placed_adapter_composes_with_its_placement(tmp_path):
    """Sites a subspace is placed away from hold untrained (non-null) weights; a library made
    from the adapter leaves them out, so it computes what the placed adapter computes."""
    placed = make(placement="1;2;1,2")  # randomize_edits gave every site, placed or not, weights
    placed.save_pretrained(tmp_path / "placed")
    library = CSReftModel.from_adapters(tiny_llama(0), [tmp_path / "placed"], router=False).eval()
    ids = ids_batch()
    with torch.no_grad():
        diff = (library(ids, gates=GATES).logits - placed(ids, gates=GATES).logits).abs().max()
        unplaced = same_edits(make(), placed)(ids, gates=GATES).logits
    assert diff < 1e-5 and (unplaced - placed(ids, gates=GATES).logits).abs().max() > 1e-3


def test_layer_lists_with_spaces_inside_are_refused():
    with pytest.raises(ValueError, match="entry '1 2': its layers are comma-separated indices"):
        CSReftConfig(layers=[1, 2], num_subspaces=1, placement="1 2")
