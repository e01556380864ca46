"""The composition grid suite: cells, held-out inputs, styles and the three scores."""

import itertools
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csreft.evaluation.grid import (
    STYLES, TASKS, grid_cells, grid_scores, grid_suite, peel, styled, summarise,
)
from csreft.evaluation.suites import get_suite


def test_cells_partition_the_grid_and_every_task_is_tested():
    for seed in range(4):
        cells = grid_cells(seed)
        every = cells["seen"] + cells["validation"] + cells["test"]
        assert sorted(every) == sorted(itertools.product(TASKS, STYLES))  # each cell exactly once
        assert {t for t, _ in cells["test"]} == set(TASKS)
        for style in STYLES:
            assert [sum(s == style for _, s in cells[g]) for g in ("seen", "validation", "test")] == [2, 1, 2]
    assert grid_cells(0) == grid_cells(0) and grid_cells(0) != grid_cells(1)


def test_suite_sizes_skills_and_splits():
    s = grid_suite(seed=0, train_per_skill=20, test_per_skill=6, composed=16, validation=8)
    assert s.name == "grid" and s.skills == list(TASKS) + list(STYLES) and s.split("validation") is s.validation
    assert Counter(r["skill"] for r in s.train) == {k: 20 for k in s.skills}
    assert Counter(r["skill"] for r in s.test) == {k: 6 for k in s.skills}
    test_cells = {f"{t}+{st}" for t, st in grid_cells(0)["test"]}
    val_cells = {f"{t}+{st}" for t, st in grid_cells(0)["validation"]}
    assert Counter(r["cell"] for r in s.composed) == {c: 2 for c in test_cells}
    assert Counter(r["cell"] for r in s.validation) == {c: 2 for c in val_cells}
    seen = {f"{t}+{st}" for t, st in grid_cells(0)["seen"]}
    assert {r["cell"] for r in s.train + s.test if r["style"]} == seen
    for r in s.train + s.test + s.composed + s.validation:
        assert r["response"] == r["answer"] == styled(r["style"], r["plain"])
        assert r["skills"] == [r["task"]] + ([r["style"]] if r["style"] else [])
        assert all(k in s.skills for k in r["skills"])
        if r["style"]:
            assert r["prompt"].splitlines()[-1].startswith(("Reply", "End", "Start"))
    assert grid_suite(seed=0, train_per_skill=20, test_per_skill=6, composed=16, validation=8).train == s.train


def test_no_held_out_input_is_trained_under_any_cell():
    s = grid_suite(seed=3)
    trained = {(r["task"], r["input"]) for r in s.train}
    for r in s.test + s.composed + s.validation:
        assert (r["task"], r["input"]) not in trained
    held = [(r["task"], r["input"]) for r in s.test + s.composed + s.validation]
    assert len(held) == len(set(held))  # and no held-out input twice
    assert not {r["prompt"] for r in s.train} & {r["prompt"] for r in s.composed + s.validation}


def test_answers_are_right():
    s = grid_suite(seed=1, train_per_skill=30, test_per_skill=0, composed=0, validation=0)
    want = {"add": lambda x: str(sum(int(v) for v in x.split(" + "))),
            "sort": lambda x: " ".join(sorted(x.split(), key=int)),
            "max": lambda x: str(max(int(v) for v in x.split())),
            "last": lambda x: x.split()[-1]}
    for r in s.train:
        if r["task"] == "sentiment":
            assert r["plain"] in ("positive", "negative")
        else:
            assert r["plain"] == want[r["task"]](r["input"])


@settings(max_examples=200, deadline=None)
@given(plain=st.text(alphabet="abcxyz0129 +", min_size=1, max_size=12).map(str.strip).filter(bool),
       styles=st.permutations(list(STYLES)).flatmap(lambda p: st.integers(0, len(p)).map(lambda n: p[:n])))
def test_peel_undoes_any_stack_of_styles(plain, styles):
    text = plain
    for style in styles:
        text = styled(style, text)
    core, found = peel(text)
    assert core == " ".join(plain.split()) and found == set(styles)


def test_scores_tell_task_from_style():
    s = grid_suite(seed=0, train_per_skill=1, test_per_skill=0, composed=8, validation=0)
    rec = next(r for r in s.composed if r["style"] == "json" and r["task"] != "sentiment")
    other = "bullet"
    wrong = str(int(rec["plain"].split()[0]) + 1)
    assert grid_scores(rec, rec["answer"]) == {"exact": True, "task": True, "style": True}
    assert grid_scores(rec, rec["plain"]) == {"exact": False, "task": True, "style": False}
    assert grid_scores(rec, styled(other, rec["plain"])) == {"exact": False, "task": True, "style": False}
    assert grid_scores(rec, styled("json", wrong)) == {"exact": False, "task": False, "style": True}
    assert grid_scores(rec, styled(other, styled("json", rec["plain"])))["style"] is False  # one style too many
    plain = grid_suite(seed=0, train_per_skill=0, test_per_skill=1, composed=0, validation=0).test[0]
    assert grid_scores(plain, plain["plain"]) == {"exact": True, "task": True, "style": True}
    assert grid_scores(plain, styled("prefix", plain["plain"])) == {"exact": False, "task": True, "style": False}


def test_summarise_rates_per_cell():
    s = grid_suite(seed=0, train_per_skill=0, test_per_skill=0, composed=8, validation=0)
    outputs = [r["answer"] if i % 2 == 0 else r["plain"] for i, r in enumerate(s.composed)]
    got = summarise(s.composed, outputs)
    assert got["all"] == {"exact": 0.5, "task": 1.0, "style": 0.5, "n": 8}
    assert sum(c["n"] for c in got["cells"].values()) == 8
    with pytest.raises(ValueError, match="8 records but 7 outputs"):
        summarise(s.composed, outputs[:-1])


def test_bad_sizes_name_the_problem():
    with pytest.raises(ValueError, match=r"composed=-1 is not valid"):
        grid_suite(composed=-1)
    with pytest.raises(ValueError, match=r"task 'add' has 2401 distinct inputs; these sizes need"):
        grid_suite(train_per_skill=2000)
    with pytest.raises(ValueError, match="unknown style"):
        styled("italic", "x")


def test_get_suite_builds_the_grid():
    assert get_suite("grid", train_per_skill=4, test_per_skill=2, composed=8).composed == \
        grid_suite(train_per_skill=4, test_per_skill=2, composed=8).composed


def test_compare_runs_on_the_grid_with_multi_skill_records(tmp_path, tiny_model_dir):
    from csreft.comparison.options import CompareOptions
    from csreft.comparison.runner import compare

    opts = CompareOptions(suite="grid", seeds=1, max_steps=2, batch_size=4, lr=1e-2, rank=2, layers=[1, 2],
                          positions="f2+l2", router_hidden=16, train_per_skill=4, test_per_skill=2, composed=8,
                          methods="base,csreft_supervised", eval_batch_size=8, model=str(tiny_model_dir),
                          output_dir=str(tmp_path / "grid"), max_length=128, quiet=True)
    r = compare(opts)
    sup = r["methods"]["csreft_supervised"]
    assert r["suite"] == "grid" and set(sup["per_skill"]) == set(TASKS) | set(STYLES)
    assert sup["composed_accuracy"] is not None and r["sizes"]["composed"] == 8
