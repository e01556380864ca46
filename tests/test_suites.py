"""Evaluation suites: determinism, answer checkers, held-out composition, shared-data loaders."""

import json
import re
from collections import Counter

import pytest

from csreft.evaluation.suites import (
    BUILTIN_SKILLS, CLASSIFICATION_TASKS, COMMONSENSE_TASKS, Suite, SuiteUnavailable, builtin_suite,
    check_answer, classification_suite, commonsense_suite, get_suite,
)


def small(seed=0):
    return builtin_suite(seed=seed, train_per_skill=40, test_per_skill=20, composed=30)


def test_builtin_is_deterministic_per_seed_and_differs_across_seeds():
    a, b, c = small(0), small(0), small(1)
    assert (a.train, a.test, a.composed) == (b.train, b.test, b.composed)
    assert a.train != c.train and a.test != c.test and a.composed != c.composed
    assert a.info["seed"] == 0 and c.info["seed"] == 1


def test_builtin_sizes_skills_and_fields():
    s = small()
    assert s.skills == BUILTIN_SKILLS and len(s.skills) >= 6 and s.scoring == "exact"
    assert Counter(r["skill"] for r in s.train) == {k: 40 for k in BUILTIN_SKILLS}
    assert Counter(r["skill"] for r in s.test) == {k: 20 for k in BUILTIN_SKILLS}
    assert Counter(r["skill"] for r in s.composed) == {"reverse+upper": 10, "sentiment+upper": 10, "sort+reverse": 10}
    for r in s.train + s.test + s.composed:
        assert r["prompt"] and r["response"] == r["answer"]
        assert all(k in s.skills for k in r.get("skills", [r["skill"]]))
    for r in s.composed:
        assert len(s.skill_index(r)) == 2
    sentiment = [r for r in s.test if r["skill"] == "sentiment"]
    assert all(r["response"] in r["choices"] for r in sentiment)
    assert {r["response"] for r in sentiment} == {"positive", "negative"}


def test_train_test_composed_prompts_are_disjoint():
    s = builtin_suite()  # default sizes
    train = {r["prompt"] for r in s.train}
    assert not train & {r["prompt"] for r in s.test}
    assert not train & {r["prompt"] for r in s.composed}
    inputs = {(r["skill"], r["input"]) for r in s.train}
    for r in s.composed:  # composed inputs were never trained on by either component skill
        assert all((k, r["input"]) not in inputs for k in r["skills"])


def test_skills_share_inputs_so_mixing_them_up_is_checkable():
    s = builtin_suite()
    records = s.train + s.test
    by_skill = {k: {r["input"] for r in records if r["skill"] == k} for k in s.skills}
    assert by_skill["add"] & by_skill["sort"] & by_skill["count"]
    assert by_skill["upper"] & by_skill["sentiment"] and by_skill["upper"] & by_skill["reverse"]
    assert by_skill["count"] & by_skill["sentiment"]
    # the same input under two skills has two different answers, and neither passes the other
    seen = {}
    for r in records:
        other = seen.setdefault(r["input"], r)
        if other["skill"] != r["skill"] and other["answer"] != r["answer"]:
            assert not s.check(r, other["answer"]) and not s.check(other, r["answer"])


def test_every_checker_accepts_the_reference_and_rejects_another_answer():
    s = small()
    for split in ("train", "test", "composed"):
        records = s.split(split)
        for i, r in enumerate(records):
            assert s.check(r, r["answer"]) and s.check(r, f"  {r['answer']}. ")
            wrong = next(o["answer"] for o in records[i + 1:] + records[:i]
                         if o["skill"] == r["skill"] and o["answer"].lower() != r["answer"].lower())
            assert not s.check(r, wrong), (r, wrong)
            assert not s.check(r, "") and not s.check(r, r["answer"] + " and more")


@pytest.mark.parametrize("kind, reference, good, bad", [
    ("exact", "THE FOOD WAS GREAT", ["THE FOOD  WAS GREAT", '"THE FOOD WAS GREAT"'],
     ["the food was great", "The Food Was Great"]),
    ("exact", "elppa", ["elppa", "elppa."], ["ELPPA", "apple", "elpa"]),
    ("caseless", "positive", ["Positive", "POSITIVE.", " positive"], ["negative", "positive!", "very positive"]),
    ("numbers", "2 3 8", ["2 3 8", "2, 3, 8", "2,3,8."], ["8 3 2", "2 3", "2 3 8 9", "2 3 eight", ""]),
    ("numbers", "13", ["13", "13."], ["12", "1 3", "thirteen"]),
    ("label", "the correct answer is positive",
     ["the correct answer is positive", "Positive", "The correct answer is positive."],
     ["the correct answer is negative", "negative", "the correct answer is"]),
])
def test_check_kinds(kind, reference, good, bad):
    assert all(check_answer(kind, reference, g) for g in good)
    assert not any(check_answer(kind, reference, b) for b in bad)


def test_check_uses_the_record_kind_and_suite_scoring():
    label = Suite("x", ["a"], [], [], scoring="label")
    rec = {"prompt": "p", "response": "the correct answer is world", "skill": "a", "answer": "world"}
    assert label.check(rec, "the correct answer is world") and not label.check(rec, "the correct answer is sports")
    with pytest.raises(ValueError, match="unknown check kind"):
        check_answer("fuzzy", "a", "a")


def test_builtin_rejects_impossible_sizes_and_get_suite_dispatches():
    with pytest.raises(ValueError, match="reverse.*distinct prompts"):
        builtin_suite(train_per_skill=300, test_per_skill=50)
    assert get_suite("builtin", train_per_skill=2, test_per_skill=1, composed=3).name == "builtin"
    with pytest.raises(ValueError, match="unknown suite"):
        get_suite("nope")


# -- shared data folder ----------------------------------------------------------------------
def _require(subfolder):
    """The suite at small sizes, or a skip when the shared data folder is absent."""
    try:
        return get_suite(subfolder, train_per_skill=30, test_per_skill=20)
    except SuiteUnavailable as err:
        pytest.skip(f"shared data not available: {err}")


def test_missing_data_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CSREFT_DATA", str(tmp_path))
    for loader in (classification_suite, commonsense_suite):
        with pytest.raises(SuiteUnavailable, match=re.escape(str(tmp_path))):
            loader()
    with pytest.raises(SuiteUnavailable, match="nowhere"):
        classification_suite(data_dir=tmp_path / "nowhere")
    assert issubclass(SuiteUnavailable, RuntimeError)


def test_classification_suite_reads_seeded_subsets():
    s = _require("classification")
    assert s.skills == list(CLASSIFICATION_TASKS) and s.scoring == "label"
    assert Counter(r["skill"] for r in s.train) == {k: 30 for k in s.skills}
    assert Counter(r["skill"] for r in s.test) == {k: 20 for k in s.skills}
    for r in s.train + s.test:
        assert r["response"] == "the correct answer is " + r["answer"]
        assert r["choices"] == ["the correct answer is " + lab for lab in CLASSIFICATION_TASKS[r["skill"]]]
        assert s.check(r, r["response"]) and not s.check(r, next(c for c in r["choices"] if c != r["response"]))
    again = classification_suite(train_per_skill=30, test_per_skill=20)
    assert again.test == s.test
    bigger = classification_suite(train_per_skill=0, test_per_skill=40)
    assert not bigger.train and {r["id"] for r in s.test} < {r["id"] for r in bigger.test}
    assert classification_suite(train_per_skill=0, test_per_skill=20, seed=1).test != s.test
    assert s.info["sizes"]["sst2"] == {"train": 30, "test": 20} and "sst2" in s.info["sources"]


def test_commonsense_suite_splits_piqa_disjointly_and_reads_answer_formats():
    s = _require("commonsense")
    assert s.skills == list(COMMONSENSE_TASKS)
    assert Counter(r["skill"] for r in s.test) == {k: 20 for k in s.skills}
    split = s.info["piqa_split"]
    train_idx, test_idx = set(split["train_indices"]), set(split["test_indices"])
    assert not train_idx & test_idx and len(train_idx | test_idx) == 1838
    ids = lambda recs: {r["id"] for r in recs if r["skill"] == "piqa"}  # noqa: E731
    assert not ids(s.train) & ids(s.test)
    assert all(int(i.split("#")[1]) in test_idx for i in ids(s.test))
    full = commonsense_suite(train_per_skill=0, test_per_skill=None)
    arc = [r for r in full.test if r["skill"].startswith("arc")]
    assert {len(r["choices"]) for r in arc} == {3, 4, 5}
    for r in full.test:
        assert r["response"] in r["choices"] and r["choices"][0].startswith("the correct answer is ")
    assert Counter(r["skill"] for r in full.test)["piqa"] == len(test_idx)


def _own_data(tmp_path, choices: bool):
    def rec(skill, w):
        r = {"prompt": f"{skill} the word {w}", "response": w[::-1] if skill == "reverse" else w.upper(), "skill": skill}
        if choices:
            r["choices"] = [r["response"], w]
        return r
    words = ["abc", "dog", "cat", "sun", "map", "pen", "cup", "hat"]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(rec(s, w)) + "\n" for s in ("reverse", "upper") for w in words[:6]))
    test = tmp_path / "test.json"
    test.write_text(json.dumps([rec(s, w) for s in ("reverse", "upper") for w in words[6:]]))
    return str(train), str(test)


def test_files_suite_reads_any_training_format_and_picks_scoring(tmp_path):
    from csreft.evaluation.suites import get_suite

    train, test = _own_data(tmp_path, choices=False)
    suite = get_suite("files", train=train, test=test, train_per_skill=4, test_per_skill=None)
    assert suite.skills == ["reverse", "upper"] and suite.scoring == "exact"
    assert len(suite.train) == 8 and len(suite.test) == 4 and suite.name.startswith("files:")
    assert get_suite("files", train=train, test=test, train_per_skill=4).train == suite.train  # seeded
    (tmp_path / "l").mkdir()
    labelled = get_suite("files", train=train, test=_own_data(tmp_path / "l", choices=True)[1])
    assert labelled.scoring == "label" and labelled.name != suite.name
    (tmp_path / "noskill.jsonl").write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    with pytest.raises(ValueError, match="no 'skill' field"):
        get_suite("files", train=str(tmp_path / "noskill.jsonl"), test=test)


def test_compare_on_own_data(tmp_path, tiny_model_dir):
    from csreft.comparison.options import CompareOptions
    from csreft.comparison.runner import compare

    train, test = _own_data(tmp_path, choices=True)
    report = compare(CompareOptions(train=train, test=test, methods=("base", "csreft"), seeds=1, max_steps=2,
                                    batch_size=4, lr=1e-2, rank=2, layers=[1, 2], positions="f2+l2",
                                    router_hidden=16, val_per_skill=1, eval_batch_size=8, model=str(tiny_model_dir),
                                    output_dir=str(tmp_path / "out"), max_length=64, quiet=True))
    assert report["suite"].startswith("files:") and report["skills"] == ["reverse", "upper"]
    assert report["suite_info"]["sources"] == {"train": train, "test": test}


def test_paraphrase_suite_holds_out_phrasings_and_keeps_texts_and_answers():
    from csreft.evaluation.paraphrase import PHRASINGS
    from csreft.evaluation.suites import paraphrase_suite

    _require("classification")
    s = paraphrase_suite(train_per_skill=30, test_per_skill=20)
    plain = classification_suite(train_per_skill=30, test_per_skill=20)
    assert s.skills == plain.skills and s.scoring == "label"
    for task, (seen, unseen) in PHRASINGS.items():
        assert len(seen) + len(unseen) >= 6 and not set(seen) & set(unseen)
        assert any(p.startswith("{text}") or p.split("{text}")[0].count("\n") == 0 for p in unseen)
        assert any(p.split("{text}")[1].count("?") for p in unseen)  # a question after the text
    by_id = {r["id"]: r for r in plain.train + plain.test}
    for r in s.train + s.test:
        src = by_id[r["id"]]
        assert (r["response"], r["answer"], r["choices"]) == (src["response"], src["answer"], src["choices"])
        task = r["skill"]
        used = PHRASINGS[task][0] if r["group"] == "seen" else PHRASINGS[task][1]
        assert any(r["prompt"] == p.format(text=_text(src), slash="/".join(_labels(src)),
                                           comma=", ".join(_labels(src))) for p in used)
    assert {r["group"] for r in s.train} == {"seen"}
    assert Counter((r["skill"], r["group"]) for r in s.test) == {(t, g): 20 for t in s.skills for g in ("seen", "unseen")}
    assert len({r["phrasing"] for r in s.train if r["skill"] == "sst2"}) == 5
    assert {r["phrasing"] for r in s.test if r["group"] == "unseen"} == {5, 6, 7}
    only = paraphrase_suite(train_per_skill=0, test_per_skill=20, test_phrasings="unseen")
    assert only.name == "paraphrase-unseen" and {r["group"] for r in only.test} == {"unseen"}
    with pytest.raises(ValueError, match="test_phrasings='some': expected both, unseen or seen"):
        paraphrase_suite(test_phrasings="some")


def _text(record):
    from csreft.evaluation.paraphrase import source_text

    return source_text(record["skill"], record["prompt"])


def _labels(record):
    return [c.rsplit(" ", 1)[-1] for c in record["choices"]]
