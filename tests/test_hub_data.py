"""`csreft data`: Hub rows -> the shared data folder's records, offline.

Fake rows have the Hub datasets' field names and label encodings; the expected records are
written out by hand in the shared folder's format (the first ones are copied from its files).
"""

import json
import re
import sys

import pytest

from csreft.evaluation import suite_data as hub_data
from csreft.cli import main
from csreft.evaluation.suites import SuiteUnavailable, classification_suite, commonsense_suite

datasets = pytest.importorskip("datasets", reason="the `data` extra (datasets) is not installed")

AG_FORMAT = "\n\nAnswer format: world/sports/business/technology"
TREC_FORMAT = "\n\nAnswer format: description/entity/abbreviation/person/location/number"


def cls(question, field, text, fmt, label, skill):
    return {"instruction": f"{question}\n\n{field}: {text}{fmt}", "input": "",
            "output": f"the correct answer is {label}", "answer": label, "skill": skill}


# -- converters ----------------------------------------------------------------------------------
def test_sst2_rows_become_the_shared_records():
    row = {"text": "no movement , no yuks , not much of anything .", "label": 0, "label_text": "negative"}
    assert hub_data.convert_sst2(row) == {
        "instruction": "Is the sentiment of this movie review positive or negative?\n\nReview: no movement , no "
                       "yuks , not much of anything .\n\nAnswer format: positive/negative",
        "input": "", "output": "the correct answer is negative", "answer": "negative", "skill": "sst2"}
    assert hub_data.convert_sst2({"text": "a gem .", "label": 1})["answer"] == "positive"


def test_agnews_joins_title_and_description_as_the_shared_files_do():
    # sh0416/ag_news rows: label 1..4, the CSV's title and description (backslash = line break)
    row = {"label": 3, "title": "Sprint to Buy Nextel in \\$36 Billion Deal",
           "description": " NEW YORK (Reuters) - Sprint Corp. said it would buy Nextel for about \\$36 billion."}
    assert hub_data.convert_agnews(row) == cls(
        "What is the topic of this news article?", "Article",
        "Sprint to Buy Nextel in \\$36 Billion Deal.  NEW YORK (Reuters) - Sprint Corp. said it would buy "
        "Nextel for about  $36 billion.", AG_FORMAT, "business", "agnews")
    trailing = hub_data.convert_agnews({"label": 4, "title": "Best Software overhauls Act ", "description": "News\\"})
    assert trailing["instruction"] == ("What is the topic of this news article?\n\nArticle: Best Software "
                                       "overhauls Act . News" + AG_FORMAT)
    assert [hub_data.convert_agnews({"label": k, "title": "t", "description": "d"})["answer"]
            for k in (1, 2, 3, 4)] == ["world", "sports", "business", "technology"]


def test_trec_coarse_labels_map_from_the_hub_order():
    # CogComp/trec coarse_label: 0 ABBR, 1 ENTY, 2 DESC, 3 HUM, 4 LOC, 5 NUM
    row = {"text": "How far is it from Denver to Aspen ?", "coarse_label": 5, "fine_label": 40}
    assert hub_data.convert_trec(row) == cls("What kind of answer does this question ask for?", "Question",
                                             "How far is it from Denver to Aspen ?", TREC_FORMAT, "number", "trec")
    got = [hub_data.convert_trec({"text": "q ?", "coarse_label": k})["answer"] for k in range(6)]
    assert got == ["abbreviation", "entity", "description", "person", "location", "number"]


def test_commonsense_rows_follow_the_llm_adapters_templates():
    boolq = {"question": "does ethanol take more energy make that produces", "answer": False, "passage": "..."}
    assert hub_data.convert_boolq(boolq) == {
        "instruction": "Please answer the following question with true or false, question: does ethanol take "
                       "more energy make that produces?\n\nAnswer format: true/false",
        "input": "", "output": "the correct answer is false", "answer": "false"}
    piqa = {"goal": "dresser", "sol1": "replace drawer with bobby pin ", "sol2": "finish, woodgrain with  bobby pin ",
            "label": 1}
    assert hub_data.convert_piqa(piqa) == {
        "instruction": "Please choose the correct solution to the question: dresser\n\nSolution1: replace drawer "
                       "with bobby pin \n\nSolution2: finish, woodgrain with  bobby pin \n\nAnswer format: "
                       "solution1/solution2",
        "input": "", "output": "the correct answer is solution2", "answer": "solution2"}
    arc = {"id": "Mercury_7220990", "question": "Which factor will most likely cause a person to develop a fever?",
           "choices": {"text": ["a leg muscle relaxing after exercise", "a bacterial population in the bloodstream",
                                "several viral particles on the skin", "carbohydrates being digested in the stomach"],
                       "label": ["A", "B", "C", "D"]}, "answerKey": "B"}
    assert hub_data.convert_arc(arc) == {
        "instruction": "Please choose the correct answer to the question: Which factor will most likely cause a "
                       "person to develop a fever?\n\nAnswer1: a leg muscle relaxing after exercise Answer2: a "
                       "bacterial population in the bloodstream Answer3: several viral particles on the skin "
                       "Answer4: carbohydrates being digested in the stomach\n\nAnswer format: "
                       "answer1/answer2/answer3/answer4",
        "input": "", "output": "the correct answer is answer2", "answer": "answer2"}
    three = {"question": "Q?", "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]}, "answerKey": "3"}
    assert hub_data.convert_arc(three)["instruction"].endswith("Answer1: x Answer2: y Answer3: z\n\n"
                                                               "Answer format: answer1/answer2/answer3")
    assert hub_data.convert_arc(three)["answer"] == "answer3"
    obqa = {"id": "7-980", "question_stem": "The sun is responsible for",
            "choices": {"text": ["puppies learning new tricks", "children growing up and getting old",
                                 "flowers wilting in a vase", "plants sprouting, blooming and wilting"],
                        "label": ["A", "B", "C", "D"]}, "answerKey": "D"}
    assert hub_data.convert_openbookqa(obqa)["instruction"] == (
        "Please choose the correct answer to the question: The sun is responsible for\n\nAnswer1: puppies learning "
        "new tricks Answer2: children growing up and getting old Answer3: flowers wilting in a vase Answer4: plants "
        "sprouting, blooming and wilting\n\nAnswer format: answer1/answer2/answer3/answer4")
    assert hub_data.convert_openbookqa(obqa)["answer"] == "answer4"


def test_bad_labels_are_clear_errors():
    with pytest.raises(hub_data.DataBuildError, match=r"row 7: label 0 is not one of \[1, 2, 3, 4\]"):
        hub_data.convert_agnews({"label": 0, "title": "t", "description": "d"}, "sh0416/ag_news test row 7")
    with pytest.raises(hub_data.DataBuildError, match="answerKey 'E'"):
        hub_data.convert_arc({"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "E"})
    with pytest.raises(hub_data.DataBuildError, match="not true/false"):
        hub_data.convert_boolq({"question": "q", "answer": "yes"})


def test_agnews_split_rule():
    train, test = hub_data.agnews_split(7600)
    assert (len(train), len(test)) == (6000, 1600)
    assert sorted(train + test) == list(range(7600))
    # the shared folder's first train article is row 7181 of the official test set, then 145, 7444
    assert train[:3] == [7181, 145, 7444]
    small_train, small_test = hub_data.agnews_split(19)
    assert (len(small_train), len(small_test)) == (15, 4)


# -- the command ---------------------------------------------------------------------------------
def _ag(i):
    return {"label": i % 4 + 1, "title": f"Title {i}", "description": f"Story {i}\\continues."}


FAKE = {  # (dataset, config, split) -> rows shaped like the Hub's
    ("SetFit/sst2", None, "train"): [{"text": f"good film {i} .", "label": i % 2, "label_text": "?"} for i in range(4)],
    ("SetFit/sst2", None, "test"): [{"text": "bad film .", "label": 0, "label_text": "negative"}],
    ("sh0416/ag_news", None, "test"): [_ag(i) for i in range(19)],
    ("CogComp/trec", None, "train"): [{"text": f"Who is {i} ?", "coarse_label": i % 6, "fine_label": 0}
                                      for i in range(6)],
    ("CogComp/trec", None, "test"): [{"text": "What is it ?", "coarse_label": 1, "fine_label": 0}],
    ("google/boolq", None, "train"): [{"question": "is it", "answer": True, "passage": "p"}],
    ("google/boolq", None, "validation"): [{"question": "is it not", "answer": False, "passage": "p"}] * 2,
    ("ybisk/piqa", None, "validation"): [{"goal": f"g{i}", "sol1": "a", "sol2": "b", "label": i % 2}
                                         for i in range(4)],
    **{("allenai/ai2_arc", c, s): [{"id": "x", "question": f"{c} {s}?", "answerKey": "A",
                                    "choices": {"text": ["p", "q", "r"], "label": ["A", "B", "C"]}}]
       for c in ("ARC-Easy", "ARC-Challenge") for s in ("train", "test")},
    **{("allenai/openbookqa", "main", s): [{"id": "y", "question_stem": f"stem {s}", "answerKey": "C",
                                            "choices": {"text": ["1", "2", "3", "4"], "label": list("ABCD")}}]
       for s in ("train", "test")},
}


@pytest.fixture
def fake_hub(monkeypatch):
    """load_dataset returns FAKE rows as a datasets.Dataset; every revision resolves to a
    commit named after it. Returns the list of load_dataset calls."""
    calls = []

    def load_dataset(path, name=None, split=None, revision=None, **kwargs):
        calls.append((path, name, split, revision))
        return datasets.Dataset.from_list(FAKE[(path, name, split)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(hub_data, "resolve_commit", lambda dataset, revision: f"sha-{dataset}-{revision}")
    return calls


def test_command_builds_the_folders_the_suites_read(tmp_path, fake_hub, capsys, monkeypatch):
    out = tmp_path / "data"
    main(["data", "--output", str(out)])
    assert "CSREFT_DATA=" in capsys.readouterr().out
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.json")) == sorted(
        [f"classification/{t}/{s}.json" for t in ("sst2", "agnews", "trec") for s in ("train", "test")]
        + [f"commonsense/{t}/{s}.json" for t in ("boolq", "arc_easy", "arc_challenge", "openbookqa")
           for s in ("train", "test")]
        + ["commonsense/piqa/test.json", "classification/SOURCES.json", "commonsense/SOURCES.json"])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary folders left

    sst2_test = json.loads((out / "classification/sst2/test.json").read_text())
    assert sst2_test == [cls("Is the sentiment of this movie review positive or negative?", "Review", "bad film .",
                             "\n\nAnswer format: positive/negative", "negative", "sst2")]
    train_idx, test_idx = hub_data.agnews_split(19)
    ag_train = json.loads((out / "classification/agnews/train.json").read_text())
    assert ag_train[0] == cls("What is the topic of this news article?", "Article",
                              f"Title {train_idx[0]}. Story {train_idx[0]} continues.", AG_FORMAT,
                              ["world", "sports", "business", "technology"][train_idx[0] % 4], "agnews")
    assert len(ag_train) == 15 and len(json.loads((out / "classification/agnews/test.json").read_text())) == 4
    assert json.loads((out / "commonsense/boolq/test.json").read_text())[0]["instruction"] == (
        "Please answer the following question with true or false, question: is it not?\n\nAnswer format: true/false")
    assert not (out / "commonsense/piqa/train.json").exists()

    monkeypatch.setenv("CSREFT_DATA", str(out))
    suite = classification_suite(train_per_skill=None, test_per_skill=None)
    assert suite.info["data_dir"] == str(out) and suite.skills == ["sst2", "agnews", "trec"]
    assert {r["skill"] for r in suite.test} == {"sst2", "agnews", "trec"} and len(suite.train) == 4 + 15 + 6
    rec = next(r for r in suite.test if r["skill"] == "sst2")
    assert rec["prompt"] == sst2_test[0]["instruction"] and rec["response"] == "the correct answer is negative"
    assert rec["choices"] == ["the correct answer is positive", "the correct answer is negative"]
    prov = suite.info["provenance"]
    assert prov["tasks"]["agnews"]["dataset"] == "sh0416/ag_news"
    assert prov["tasks"]["agnews"]["split_rule"].startswith("random.Random(0).shuffle")
    assert prov["tasks"]["agnews"]["splits"]["train"] == {"from_split": "test", "rows": 15,
                                                          "rows_in_shared_folder": 6000}
    common = commonsense_suite(train_per_skill=None, test_per_skill=None, data_dir=out)
    assert len([r for r in common.train + common.test if r["skill"] == "piqa"]) == 4
    arc = next(r for r in common.test if r["skill"] == "arc_easy")
    assert arc["choices"] == [f"the correct answer is answer{i}" for i in (1, 2, 3)]
    assert common.info["provenance"]["tasks"]["piqa"]["splits"] == {"test": {
        "from_split": "validation", "rows": 4, "rows_in_shared_folder": 1838}}


def test_sources_json_records_datasets_configs_splits_and_commits(tmp_path, fake_hub):
    hub_data.build_data(tmp_path, "commonsense", hub_data.parse_revisions(["allenai/ai2_arc=v1.0"]), log=lambda _: 0)
    sources = json.loads((tmp_path / "commonsense/SOURCES.json").read_text())
    assert sources["suite"] == "commonsense" and sources["datasets_version"] == datasets.__version__
    tasks = sources["tasks"]
    assert list(tasks) == ["boolq", "piqa", "arc_easy", "arc_challenge", "openbookqa"]
    assert {k: tasks["arc_challenge"][k] for k in ("dataset", "config", "revision", "commit")} == {
        "dataset": "allenai/ai2_arc", "config": "ARC-Challenge", "revision": "v1.0",
        "commit": "sha-allenai/ai2_arc-v1.0"}
    assert tasks["boolq"]["revision"] == "main" and tasks["boolq"]["splits"]["test"]["from_split"] == "validation"
    assert tasks["piqa"]["revision"] == "refs/convert/parquet"
    assert tasks["openbookqa"]["config"] == "main"
    # the data is read at the resolved commit, one per dataset
    assert ("allenai/ai2_arc", "ARC-Easy", "train", "sha-allenai/ai2_arc-v1.0") in fake_hub
    assert ("google/boolq", None, "validation", "sha-google/boolq-main") in fake_hub
    assert not (tmp_path / "classification").exists()


def test_revision_option_parsing():
    assert hub_data.parse_revisions(None) == {}
    assert hub_data.parse_revisions(["v2", "google/boolq=abc"]) == {"*": "v2", "google/boolq": "abc"}
    with pytest.raises(hub_data.DataBuildError, match="DATASET=REV"):
        hub_data.parse_revisions(["nobody/none=abc"])


def test_existing_output_needs_overwrite_and_failures_leave_it_untouched(tmp_path, fake_hub, monkeypatch):
    main(["data", "--output", str(tmp_path), "--suite", "classification"])
    marker = tmp_path / "classification" / "mine.txt"
    marker.write_text("keep")
    with pytest.raises(SystemExit, match=r"classification already exists; pass --overwrite"):
        main(["data", "--output", str(tmp_path), "--suite", "classification"])
    assert marker.exists()

    def broken(path, name=None, split=None, revision=None, **kwargs):
        raise ConnectionError("no route to the Hub")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(SystemExit, match=r"could not load SetFit/sst2 split 'train' .*no route to the Hub"):
        main(["data", "--output", str(tmp_path), "--suite", "classification", "--overwrite"])
    assert marker.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, split=None, revision=None, **kw:
                        datasets.Dataset.from_list(FAKE[(path, name, split)]))
    main(["data", "--output", str(tmp_path), "--suite", "classification", "--overwrite"])
    assert not marker.exists() and (tmp_path / "classification/trec/test.json").is_file()


def test_missing_datasets_extra_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(SystemExit) as err:
        main(["data", "--output", str(tmp_path / "out")])
    assert re.search(r"needs the `datasets` package.*pip install 'csreft\[data\]'", str(err.value))
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_absent_data_folder_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("CSREFT_DATA", str(tmp_path))
    for loader in (classification_suite, commonsense_suite):
        with pytest.raises(SuiteUnavailable, match=r"csreft data --output DIR.*CSREFT_DATA=DIR"):
            loader()
