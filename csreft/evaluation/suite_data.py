"""`csreft data`: build the classification and commonsense data folders from public Hub datasets.

The real-data suites (csreft.evaluation.suites) read `<DIR>/classification/<task>/{train,test}.json` and
`<DIR>/commonsense/<task>/{train,test}.json`. This module writes that layout from the public
datasets through `datasets.load_dataset`, with the prompts, label words and record fields of
the shared data folder the project's numbers were measured on:

    classification: {"instruction", "input": "", "output": "the correct answer is <label>",
                     "answer": "<label>", "skill": "<task>"}
    commonsense:    {"instruction", "input": "", "output": "the correct answer is <label>",
                     "answer": "<label>"}   (LLM-Adapters' templates)

Each built suite folder gets a SOURCES.json: dataset, config, split, revision asked and the
commit it resolved to, row counts. Writes are atomic (a temporary folder renamed into place).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ANSWER_PREFIX = "the correct answer is "
SUITE_NAMES = ("classification", "commonsense")
EXTRA_HINT = "pip install 'csreft[data]'"
# AG News: its official 7,600-article test set, indices shuffled by random.Random(0); the
# first 6,000 are train, the other 1,600 test (the same 15/19 when the split has another size)
AGNEWS_SEED, AGNEWS_TRAIN, AGNEWS_TOTAL = 0, 6000, 7600
PARQUET_BRANCH = "refs/convert/parquet"  # the Hub's own Parquet export of a script dataset


class DataBuildError(RuntimeError):
    """A dataset could not be loaded or converted, or the output is in the way."""


# -- converters: one Hub row -> one record of the shared format --------------------------------
def _record(instruction: str, label: str, skill: str | None = None) -> dict:
    rec = {"instruction": instruction, "input": "", "output": ANSWER_PREFIX + label, "answer": label}
    if skill is not None:
        rec["skill"] = skill
    return rec


def _label(labels: list[str], value, where: str, offset: int = 0) -> str:
    """labels[value - offset], or a clear error for a label outside the task's range."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value - offset < len(labels):
        raise DataBuildError(f"{where}: label {value!r} is not one of "
                             f"{list(range(offset, offset + len(labels)))}")
    return labels[value - offset]


def _classification(task: str, question: str, field: str, labels: list[str]) -> Callable:
    def make(text: str, label: str) -> dict:
        return _record(f"{question}\n\n{field}: {text}\n\nAnswer format: {'/'.join(labels)}", label, task)
    return make


SST2_LABELS = ["negative", "positive"]  # SetFit/sst2 label 0 / 1
AGNEWS_LABELS = ["world", "sports", "business", "technology"]  # sh0416/ag_news label 1..4
# CogComp/trec coarse_label 0..5 = ABBR, ENTY, DESC, HUM, LOC, NUM
TREC_HUB_ORDER = ["abbreviation", "entity", "description", "person", "location", "number"]
TREC_LABELS = ["description", "entity", "abbreviation", "person", "location", "number"]  # answer format order

_sst2 = _classification("sst2", "Is the sentiment of this movie review positive or negative?", "Review",
                        ["positive", "negative"])
_agnews = _classification("agnews", "What is the topic of this news article?", "Article", AGNEWS_LABELS)
_trec = _classification("trec", "What kind of answer does this question ask for?", "Question", TREC_LABELS)


def convert_sst2(row: dict, where: str = "sst2") -> dict:
    """SetFit/sst2 {text, label (0 negative, 1 positive)}."""
    return _sst2(row["text"], _label(SST2_LABELS, row["label"], where))


def convert_agnews(row: dict, where: str = "agnews") -> dict:
    """sh0416/ag_news {label (1..4), title, description}: the article is "<title>. <description>"
    with the CSV's backslashes (escaped line breaks) in the description read as spaces."""
    text = f"{row['title']}. {row['description'].replace(chr(92), ' ')}".strip()
    return _agnews(text, _label(AGNEWS_LABELS, row["label"], where, offset=1))


def convert_trec(row: dict, where: str = "trec") -> dict:
    """CogComp/trec {text, coarse_label (0..5 = ABBR ENTY DESC HUM LOC NUM), fine_label}."""
    return _trec(row["text"], _label(TREC_HUB_ORDER, row["coarse_label"], where))


def convert_boolq(row: dict, where: str = "boolq") -> dict:
    """google/boolq {question (no question mark), answer (bool), passage}."""
    if not isinstance(row["answer"], bool):
        raise DataBuildError(f"{where}: answer {row['answer']!r} is not true/false")
    question = row["question"] if row["question"].endswith("?") else row["question"] + "?"
    return _record(f"Please answer the following question with true or false, question: {question}"
                   "\n\nAnswer format: true/false", "true" if row["answer"] else "false")


def convert_piqa(row: dict, where: str = "piqa") -> dict:
    """ybisk/piqa {goal, sol1, sol2, label (0/1)}."""
    label = _label(["solution1", "solution2"], row["label"], where)
    return _record(f"Please choose the correct solution to the question: {row['goal']}\n\n"
                   f"Solution1: {row['sol1']}\n\nSolution2: {row['sol2']}\n\n"
                   "Answer format: solution1/solution2", label)


def _multiple_choice(question: str, choices: dict, key: str, where: str) -> dict:
    texts, keys = list(choices["text"]), list(choices["label"])
    if key not in keys:
        raise DataBuildError(f"{where}: answerKey {key!r} is not one of the choice labels {keys}")
    options = " ".join(f"Answer{i}: {t}" for i, t in enumerate(texts, 1))
    formats = "/".join(f"answer{i}" for i in range(1, len(texts) + 1))
    return _record(f"Please choose the correct answer to the question: {question}\n\n{options}\n\n"
                   f"Answer format: {formats}", f"answer{keys.index(key) + 1}")


def convert_arc(row: dict, where: str = "arc") -> dict:
    """allenai/ai2_arc {id, question, choices {text, label}, answerKey}: 3 to 5 answers."""
    return _multiple_choice(row["question"], row["choices"], row["answerKey"], where)


def convert_openbookqa(row: dict, where: str = "openbookqa") -> dict:
    """allenai/openbookqa (main) {id, question_stem, choices {text, label}, answerKey}."""
    return _multiple_choice(row["question_stem"], row["choices"], row["answerKey"], where)


def agnews_split(n: int) -> tuple[list[int], list[int]]:
    """(train, test) indices of an n-row AG News test split: random.Random(0).shuffle of
    range(n); the first 6,000 (of 7,600) are train, the rest test."""
    order = list(range(n))
    random.Random(AGNEWS_SEED).shuffle(order)
    n_train = n * AGNEWS_TRAIN // AGNEWS_TOTAL
    return order[:n_train], order[n_train:]


# -- what to build -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One task's Hub dataset. splits: output split -> Hub split (agnews: both from "test")."""

    suite: str
    task: str
    dataset: str
    config: str | None
    splits: dict
    convert: Callable
    revision: str = "main"
    expected: dict | None = None  # rows per output split in the shared folder
    note: str = ""


SOURCES = [
    Source("classification", "sst2", "SetFit/sst2", None, {"train": "train", "test": "test"}, convert_sst2,
           expected={"train": 6920, "test": 1821}, note="SST-2 sentence level (6,920 / 872 / 1,821)"),
    Source("classification", "agnews", "sh0416/ag_news", None, {"train": "test", "test": "test"},
           convert_agnews, expected={"train": 6000, "test": 1600},
           note="the official 7,600-article test set, indices shuffled by random.Random(0): first 6,000 "
                "train, the other 1,600 test (same fraction for another size); title and description "
                "are separate fields here, as the shared format needs \"<title>. <description>\""),
    Source("classification", "trec", "CogComp/trec", None, {"train": "train", "test": "test"}, convert_trec,
           revision=PARQUET_BRANCH, expected={"train": 5452, "test": 500},
           note="coarse labels; the Hub's Parquet export (the repository is a loading script)"),
    Source("commonsense", "boolq", "google/boolq", None, {"train": "train", "test": "validation"},
           convert_boolq, expected={"train": 9427, "test": 3270}, note="test = the validation split"),
    Source("commonsense", "piqa", "ybisk/piqa", None, {"test": "validation"}, convert_piqa,
           revision=PARQUET_BRANCH, expected={"test": 1838},
           note="test = the validation split (the test split has no labels), as LLM-Adapters; no train "
                "file; the Hub's Parquet export (the repository is a loading script)"),
    Source("commonsense", "arc_easy", "allenai/ai2_arc", "ARC-Easy", {"train": "train", "test": "test"},
           convert_arc, expected={"train": 2251, "test": 2376}),
    Source("commonsense", "arc_challenge", "allenai/ai2_arc", "ARC-Challenge",
           {"train": "train", "test": "test"}, convert_arc, expected={"train": 1119, "test": 1172}),
    Source("commonsense", "openbookqa", "allenai/openbookqa", "main", {"train": "train", "test": "test"},
           convert_openbookqa, expected={"train": 4957, "test": 500}),
]
# the shared folder's file formatting, so identical rows give byte-identical files
_JSON_STYLE = {"classification": {"indent": 0, "ensure_ascii": False},
               "commonsense": {"indent": 4, "ensure_ascii": True}}


def parse_revisions(values: list[str] | None) -> dict:
    """--revision values -> {dataset or "*": revision}. "REV" applies to every dataset,
    "org/name=REV" to one."""
    out = {}
    datasets = {s.dataset for s in SOURCES}
    for value in values or []:
        name, sep, rev = value.rpartition("=")
        if not sep:
            name, rev = "*", value
        if not rev or (name != "*" and name not in datasets):
            raise DataBuildError(f"--revision {value!r}: give REV (every dataset) or DATASET=REV with "
                                 f"DATASET one of {sorted(datasets)}")
        out[name] = rev
    return out


# -- loading -----------------------------------------------------------------------------------
def _datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError(f"csreft data needs the `datasets` package, an optional extra: {EXTRA_HINT}") from None
    return datasets


def resolve_commit(dataset: str, revision: str) -> str | None:
    """The commit a revision (branch, tag or hash) of a Hub dataset points to; None when the
    Hub cannot be asked (offline: load_dataset may still find its cache)."""
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.utils import RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:
        return None
    try:
        return HfApi().dataset_info(dataset, revision=revision).sha
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise DataBuildError(f"{dataset}: revision {revision!r} not found on the Hub ({type(err).__name__})")
    except Exception:  # offline or unreachable: load_dataset tries its cache
        return None


def _load_split(dataset: str, config: str | None, split: str, revision: str) -> list[dict]:
    datasets = _datasets()
    try:
        rows = datasets.load_dataset(dataset, config, split=split, revision=revision)
    except Exception as err:
        hint = ""
        if "scripts are no longer supported" in str(err):
            hint = f"; try --revision {dataset}={PARQUET_BRANCH} (the Hub's Parquet export)"
        raise DataBuildError(f"could not load {dataset}{f' ({config})' if config else ''} split {split!r} "
                             f"at revision {revision!r}: {type(err).__name__}: {err}{hint}") from err
    return [dict(r) for r in rows]


def build_suite(suite: str, folder: Path, revisions: dict | None = None, log=print) -> dict:
    """Write <folder>/<task>/{train,test}.json and <folder>/SOURCES.json for one suite; return
    the SOURCES content."""
    revisions = revisions or {}
    sources, pinned = {}, {}
    for src in [s for s in SOURCES if s.suite == suite]:
        revision = revisions.get(src.dataset, revisions.get("*", src.revision))
        key = (src.dataset, revision)
        if key not in pinned:  # one commit per dataset, for every config and split
            pinned[key] = resolve_commit(src.dataset, revision)
        commit = pinned[key]
        cache, splits = {}, {}
        for out_split, hub_split in src.splits.items():
            if hub_split not in cache:
                cache[hub_split] = _load_split(src.dataset, src.config, hub_split, commit or revision)
            rows = cache[hub_split]
            indices = list(range(len(rows)))
            if src.task == "agnews":
                indices = agnews_split(len(rows))[0 if out_split == "train" else 1]
            where = f"{src.dataset} {hub_split}"
            records = [src.convert(rows[i], f"{where} row {i}") for i in indices]
            (folder / src.task).mkdir(parents=True, exist_ok=True)
            (folder / src.task / f"{out_split}.json").write_text(
                json.dumps(records, **_JSON_STYLE[suite]), encoding="utf-8")
            splits[out_split] = {"from_split": hub_split, "rows": len(records)}
            if src.expected and src.expected.get(out_split) != len(records):
                splits[out_split]["rows_in_shared_folder"] = src.expected[out_split]
                log(f"warning: {src.task} {out_split}: {len(records)} records, the shared folder has "
                    f"{src.expected[out_split]}")
        sources[src.task] = {"dataset": src.dataset, "config": src.config, "revision": revision,
                             "commit": commit, "splits": splits, **({"note": src.note} if src.note else {})}
        if src.task == "agnews":
            sources[src.task]["split_rule"] = (
                f"random.Random({AGNEWS_SEED}).shuffle(list(range(n))) of the n-row test split; train = the "
                f"first n * {AGNEWS_TRAIN} // {AGNEWS_TOTAL}, test = the rest")
        shown = f"@{commit[:10]}" if commit else f"@{revision} (commit not resolved)"
        log(f"{suite}/{src.task}: {src.dataset}{f' ({src.config})' if src.config else ''}{shown}: "
            + ", ".join(f"{k} {v['rows']}" for k, v in splits.items()))
    info = {"suite": suite, "built_by": "csreft data", "datasets_version": _datasets().__version__,
            "tasks": sources}
    (folder / "SOURCES.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return info


def build_data(output, suite: str = "all", revisions: dict | None = None, overwrite: bool = False,
               log=print) -> dict:
    """Build <output>/classification and/or <output>/commonsense. Every suite is built in a
    temporary folder next to its destination and renamed into place only when all are done;
    an existing suite folder is replaced only with overwrite=True."""
    suites = list(SUITE_NAMES) if suite == "all" else [suite]
    if any(s not in SUITE_NAMES for s in suites):
        raise DataBuildError(f"unknown suite {suite!r}; expected classification, commonsense or all")
    _datasets()  # the missing extra is reported before anything is written
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise DataBuildError(f"{output} exists and is not a folder")
    taken = [output / s for s in suites if (output / s).exists()]
    if taken and not overwrite:
        raise DataBuildError(f"{', '.join(map(str, taken))} already exists; pass --overwrite to replace it")
    output.mkdir(parents=True, exist_ok=True)
    built, infos = {}, {}
    try:
        for s in suites:
            built[s] = Path(tempfile.mkdtemp(prefix=f".{s}.building-", dir=output))
            infos[s] = build_suite(s, built[s], revisions, log)
        for s, tmp in built.items():
            final = output / s
            old = None
            if final.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{s}.old-", dir=output))
                os.replace(final, old / s)
            os.replace(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        for tmp in built.values():
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return infos
