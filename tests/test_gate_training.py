"""Training under each record's skills as gates (--train-gates skills), drop-ins (composable
training) and records with several skills (multi-hot routing targets)."""

import json

import pytest
import torch
import torch.nn.functional as F

from csreft import CSReftModel
from csreft.base_models import load_base
from csreft.data import Collator, DataError, normalize_record, pad_batch, skill_names
from csreft.router import routing_loss
from csreft.training.options import TrainingOptions
from csreft.training.recipe import build, fit
from test_train import options, write_jsonl


def examples(sets):
    return [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8], "prompt_length": 2, "prompt_start": 0,
             "skill_label": s[0] if s else -1, "skill_set": list(s)} for s in sets]


def test_gates_from_skills_are_multi_hot_and_dropins_touch_only_other_subspaces():
    sets = [[0], [1, 3], [2]] * 200
    plain = Collator(0, gates_from_skills=True, k=4)(examples(sets))["gates"]
    want = torch.zeros(len(sets), 4)
    for i, s in enumerate(sets):
        want[i, s] = 1
    assert torch.equal(plain, want)
    every = Collator(0, gates_from_skills=True, k=4, dropin=1.0, factors=(-1,))(examples(sets))["gates"]
    assert torch.equal(every, torch.where(want == 1, 1.0, -1.0))
    half = Collator(0, gates_from_skills=True, k=4, dropin=0.5, factors=(-1, 2), seed=3)
    got = half(examples(sets))["gates"]
    assert torch.equal(got[want == 1], want[want == 1])  # a record's own skills stay at 1
    others = got[want == 0]
    assert set(others.unique().tolist()) == {-1.0, 0.0, 2.0}
    assert 0.45 < (others != 0).float().mean() < 0.55
    again = Collator(0, gates_from_skills=True, k=4, dropin=0.5, factors=(-1, 2), seed=3)(examples(sets))["gates"]
    assert torch.equal(got, again)  # seeded
    with pytest.raises(ValueError, match="needs k and excludes with_skills"):
        Collator(0, with_skills=True, gates_from_skills=True, k=4)


def test_records_with_several_skills_give_multi_hot_routing_targets():
    batch = Collator(0, with_skills=True, k=4)(examples([[0], [1, 3], []]))
    assert batch["skill_labels"].tolist() == [[1, 0, 0, 0], [0, 1, 0, 1], [-1, -1, -1, -1]]
    assert batch["skill_ids"].tolist() == [0, 1, -1]
    assert Collator(0, with_skills=True, k=4)(examples([[0], [2]]))["skill_labels"].tolist() == [0, 2]
    probs = torch.tensor([[0.9, 0.2, 0.1, 0.3], [0.1, 0.7, 0.2, 0.6], [0.5, 0.5, 0.5, 0.5]])
    target = batch["skill_labels"]
    manual = F.binary_cross_entropy(probs[:2], target[:2], reduction="none").mean(-1).mean()
    assert torch.allclose(routing_loss(probs, target), manual)  # the unlabelled row is left out
    one_hot = routing_loss(probs[:2], torch.tensor([0, 2]))
    assert torch.allclose(one_hot, routing_loss(probs[:2], F.one_hot(torch.tensor([0, 2]), 4).float()))


def test_skills_field_is_checked_and_counted():
    rec = normalize_record({"prompt": "p", "response": "r", "skill": "b", "skills": ["a", "b"]}, "f.jsonl", 3)
    assert rec["skills"] == ["a", "b"] and skill_names([rec, {"skill": "c"}]) == ["a", "b", "c"]
    with pytest.raises(DataError, match=r"f.jsonl: record 3: field 'skills' must be a non-empty list"):
        normalize_record({"prompt": "p", "response": "r", "skills": "a,b"}, "f.jsonl", 3)
    with pytest.raises(DataError, match=r"field 'skill' 'c' is not among its 'skills' \['a', 'b'\]"):
        normalize_record({"prompt": "p", "response": "r", "skill": "c", "skills": ["a", "b"]}, "f.jsonl", 3)


def test_gate_options_name_the_problem():
    with pytest.raises(ValueError, match="--gate-dropin needs --train-gates skills"):
        TrainingOptions(gate_dropin=0.2)
    with pytest.raises(ValueError, match=r"--gate-dropin 1.5 is not valid: a number in \[0, 1\]"):
        TrainingOptions(train_gates="skills", gate_dropin=1.5)
    with pytest.raises(ValueError, match="--dropin-factors 'x' is not valid"):
        TrainingOptions(train_gates="skills", dropin_factors="x")
    with pytest.raises(ValueError, match="train a router afterwards"):
        TrainingOptions(train_gates="skills", skill_routing=True)
    with pytest.raises(ValueError, match="--train-gates 'oracle'"):
        TrainingOptions(train_gates="oracle")


def test_training_under_skill_gates_learns_each_skill_in_its_subspace(tmp_path, tiny_model_dir):
    run = build(options(tmp_path, tiny_model_dir, train_gates="skills", gate_dropin=0.3, max_steps=40, lr=3e-2,
                        positions="all"))
    router = {k: v.clone() for k, v in run.model.router.state_dict().items()}
    base = {k: v.clone() for k, v in run.model.base_model.state_dict().items()}
    fit(run)
    model = run.model.eval()
    assert all(torch.equal(v, router[k]) for k, v in model.router.state_dict().items())  # no router training
    assert not any(p.requires_grad for p in model.router.parameters())  # (DDP waits for no gradient of it)
    assert all(torch.equal(v, base[k]) for k, v in model.base_model.state_dict().items())
    meta = json.loads((tmp_path / "out" / "adapter" / "csreft_config.json").read_text())["metadata"]
    assert meta["train_gates"] == "skills" and meta["skills"] == ["double", "first", "reverse"]
    base_model, _ = load_base(str(tiny_model_dir))
    back = CSReftModel.from_pretrained(base_model, tmp_path / "out" / "adapter").eval()
    assert back.skill_names == ["double", "first", "reverse"]
    for skill in back.skill_names:
        rows = [e for e in run.train_set.examples if e["skill_label"] == back.skill_names.index(skill)]
        batch = pad_batch(rows, run.tokenizer.pad_token_id)
        with torch.no_grad():
            own = back(**batch, skills=skill).loss
            none = back(**batch, gates=[0.0, 0.0, 0.0]).loss
        assert own < none - 0.1, (skill, own, none)


def test_train_gates_needs_a_skill_on_every_record(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "a b", "response": "c", "skill": "x"},
                                                  {"prompt": "d e", "response": "f"}])
    with pytest.raises(ValueError, match=r"record 2 of .*mixed.jsonl has no 'skill' or 'skills'"):
        build(options(tmp_path, tiny_model_dir, data=str(data), train_gates="skills", num_subspaces=1))


def test_single_skill_lists_are_labelled_and_integer_targets_accepted():
    from csreft.checks import check_skill_labels
    from csreft.data import SupervisedDataset
    from conftest import tiny_tokenizer

    data = SupervisedDataset([{"prompt": "a b", "response": "c", "skills": ["y"]},
                              {"prompt": "d e", "response": "f", "skill": "x"}], tiny_tokenizer(), 64, ["x", "y"])
    assert [e["skill_label"] for e in data.examples] == [1, 0]
    targets = check_skill_labels(torch.tensor([[1, 0, 1], [0, 1, 0]]), 2, 3)
    assert targets.dtype == torch.float32 and targets.tolist() == [[1, 0, 1], [0, 1, 0]]
    assert check_skill_labels(torch.tensor([[2], [0]]), 2, 3).tolist() == [2, 0]  # (B, 1): indices
    with pytest.raises(ValueError, match="0 or 1 per subspace"):
        check_skill_labels(torch.tensor([[2.0, 0, 0], [0, 1, 0]]), 2, 3)
