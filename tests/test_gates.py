"""Explicit gates and skills: they replace the router, rows are independent (mixed batches)."""

import pytest
import torch

from conftest import randomize_edits, tiny_llama
from csreft import CSReftConfig, CSReftModel, get_csreft_model
from csreft.gates import steering

SKILLS = ["reverse", "sort", "upper"]


def ids_batch(batch=2, length=12, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def make(seed=0, **overrides):
    cfg = dict(layers=[1, 2], rank=2, num_subspaces=3, positions="f3+l3")
    cfg.update(overrides)
    model = get_csreft_model(tiny_llama(seed), CSReftConfig(**cfg))
    randomize_edits(model, 0.5)
    model.skill_names = list(SKILLS)
    return model.eval()


def no_router(model):
    """Make any router call fail, so a test shows that none runs."""
    def fail(*a, **k):
        raise AssertionError("the router ran")
    model.router.forward = fail


def test_gates_equal_to_the_routers_reproduce_routed_output():
    model = make()
    ids = ids_batch(3, 12)
    with torch.no_grad():
        routed = model(ids)
        explicit = model(ids, gates=routed.gates)
    assert explicit.probs is None
    assert (explicit.logits - routed.logits).abs().max() <= 1e-6


def test_zero_gates_give_the_base_and_no_router_runs():
    for overrides in ({}, {"router_layer": 3}, {"use_router": False}):
        model = make(**overrides)
        if model.router is not None:
            no_router(model)
        ids = ids_batch(2, 12)
        with torch.no_grad():
            out = model(ids, gates=[0.0, 0.0, 0.0]).logits
            ref = model.base_model(ids).logits
            assert model.route(ids, gates=[0, 1, 0]).tolist() == [[0, 1, 0], [0, 1, 0]]
        torch.testing.assert_close(out, ref)


def test_shared_subspaces_stay_on_with_explicit_gates():
    model = make(shared_subspaces=1)
    ids = ids_batch(1, 12)
    with torch.no_grad():
        out = model(ids, gates=[0.0, 0.0, 0.0]).logits
        ref = model.base_model(ids).logits
    assert (out - ref).abs().max() > 1e-3  # the always-on subspace still edits


def test_skills_turn_on_exactly_their_subspaces():
    model = make()
    ids = ids_batch(3, 12)
    with torch.no_grad():
        by_name = model(ids, skills=["sort", "reverse,upper", []])
        by_value = model(ids, gates=[[0, 1, 0], [1, 0, 1], [0, 0, 0]])
        assert torch.equal(by_name.logits, by_value.logits)
        assert torch.equal(model.route(ids, skills="sort, upper"), torch.tensor([[0.0, 1, 1]] * 3))


def test_negative_gate_subtracts_and_large_gate_amplifies_the_edit():
    model = make(layers=[3])  # the last layer: its output change is the edit itself
    ids = ids_batch(1, 10)
    seen = {}
    model.base_model.model.layers[3].register_forward_hook(lambda m, a, o: seen.update(h=o))

    def edit(g):
        with torch.no_grad():
            model(ids, gates=[g, 0.0, 0.0])
        return seen["h"]

    h0, h1, hm, h2 = edit(0.0), edit(1.0), edit(-1.0), edit(2.5)
    torch.testing.assert_close(hm - h0, -(h1 - h0), atol=1e-5, rtol=0)
    torch.testing.assert_close(h2 - h0, 2.5 * (h1 - h0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("overrides", [{}, {"router_layer": 3, "shared_subspaces": 1}])
def test_mixed_batch_equals_each_row_alone(padding, overrides):
    model = make(**overrides)
    if model.router is not None:
        no_router(model)
    lengths = (12, 7, 9, 10)
    rows = [ids_batch(1, n, seed=n)[0] for n in lengths]
    gates = torch.tensor([[1.0, 0, 0], [0, 1, 1], [-1, 0.5, 2], [0, 0, 0]])
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    positions = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if padding == "left" else slice(0, len(r))
        ids[i, span], mask[i, span], positions[i, span] = r, 1, torch.arange(len(r))
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, position_ids=positions, prompt_starts=[1] * 4, gates=gates).logits
        worst = 0.0
        for i, r in enumerate(rows):
            alone = model(r[None], prompt_starts=[1], gates=gates[i]).logits[0]
            span = slice(width - len(r), width) if padding == "left" else slice(0, len(r))
            worst = max(worst, float((batched[i, span] - alone).abs().max()))
    print(f"mixed batch ({padding} padding, {overrides}): max abs logit difference {worst:.2e}")
    assert worst <= 1e-5


def test_mixed_batch_generation_equals_each_row_alone():
    model = make()
    no_router(model)
    rows = [ids_batch(1, n, seed=n)[0] for n in (5, 9, 7)]
    skills = ["reverse", "sort,upper", ""]
    width = max(len(r) for r in rows)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    batched = model.generate(ids, attention_mask=mask, prompt_starts=[1] * 3, skills=skills, **kw)
    worst = 0.0
    for i, r in enumerate(rows):
        alone = model.generate(r[None], attention_mask=torch.ones(1, len(r), dtype=torch.long),
                               prompt_starts=[1], skills=skills[i], **kw)
        assert batched.sequences[i, width:].tolist() == alone.sequences[0, len(r):].tolist()
        worst = max(worst, max(float((a[i] - b[0]).abs().max()) for a, b in zip(batched.scores, alone.scores)))
    print(f"mixed batch generation: max abs score difference {worst:.2e}")
    assert worst <= 1e-5
    assert model._ctx is None


def test_steering_applies_to_calls_without_gates():
    model = make()
    ids = ids_batch(2, 12)
    with torch.no_grad():
        expected = model(ids, skills="upper").logits
        with steering(model, skills="upper"):
            inside = model(ids).logits
            own = model(ids, gates=[1, 0, 0]).logits  # a call's own gates win
        after = model(ids)
    assert torch.equal(inside, expected) and after.probs is not None
    assert not torch.equal(own, expected)


def test_skill_names_come_from_the_adapter(tmp_path):
    model = make()
    model.save_pretrained(tmp_path / "routed", metadata={"skills": SKILLS, "skill_routing": True})
    model.save_pretrained(tmp_path / "unsupervised", metadata={"skills": SKILLS, "skill_routing": False})
    assert CSReftModel.from_pretrained(tiny_llama(), tmp_path / "routed").skill_names == SKILLS
    loaded = CSReftModel.from_pretrained(tiny_llama(), tmp_path / "unsupervised")
    assert loaded.skill_names is None
    with pytest.raises(ValueError, match="pass gates instead"):
        loaded(ids_batch(), skills="sort")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"skills": "sort,shout"}, "unknown skill 'shout'; this adapter's skills: reverse, sort, upper"),
        ({"skills": ["sort", "upper", "reverse"]}, "skills has 3 entries for a batch of 2"),
        ({"gates": [1.0, 0.0]}, r"gates has shape \(1, 2\): expected \(2, 3\).*k = 3"),
        ({"gates": torch.ones(3, 3)}, r"gates has shape \(3, 3\)"),
        ({"gates": [1.0, float("nan"), 0.0]}, "finite"),
        ({"gates": [1.0, 0, 0], "skills": "sort"}, "not both"),
    ],
)
def test_bad_gates_and_skills_are_clear_errors(kwargs, message):
    model = make()
    with pytest.raises(ValueError, match=message):
        model(ids_batch(2, 8), **kwargs)
    with pytest.raises(ValueError, match=message):
        model.generate(ids_batch(2, 8), max_new_tokens=1, pad_token_id=0, **kwargs)


def test_cli_generate_and_eval_take_skills_and_gates(tmp_path, tiny_model_dir, capsys):
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from csreft.cli import main
    from csreft.generation import generate_texts

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_csreft_model(base, CSReftConfig(layers=[1, 2], rank=2, num_subspaces=3, positions="f3+l3"))
    randomize_edits(model, 2.0)
    model.save_pretrained(tmp_path / "a", metadata={"skills": SKILLS, "skill_routing": True})
    model.skill_names = SKILLS
    expected = generate_texts(model, AutoTokenizer.from_pretrained(tiny_model_dir), ["reverse the word abc"],
                              max_new_tokens=4, skills="sort,upper")
    plain = generate_texts(model.base_model, AutoTokenizer.from_pretrained(tiny_model_dir), ["reverse the word abc"],
                           max_new_tokens=4)
    assert expected[0] and expected != plain  # the chosen edits change the output
    common = ["--adapter", str(tmp_path / "a"), "--model", str(tiny_model_dir)]
    main(["generate", *common, "--prompt", "reverse the word abc", "--max-new-tokens", "4", "--skills", "sort,upper"])
    assert capsys.readouterr().out.strip() == expected[0]
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "reverse the word abc", "response": "cba", "skill": "reverse"}) + "\n")
    main(["eval", *common, "--data", str(data), "--gates=-1,0,2", "--output", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text())["per_skill"]["reverse"]["n"] == 1
    with pytest.raises(SystemExit, match="unknown skill 'shout'; this adapter's skills: reverse, sort, upper"):
        main(["eval", *common, "--data", str(data), "--skills", "shout"])
    with pytest.raises(SystemExit, match=r"gates has shape \(1, 2\)"):
        main(["generate", *common, "--prompt", "x", "--gates", "1,0"])
    with pytest.raises(SystemExit, match="need --adapter|give --adapter"):
        main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--skills", "sort"])
