"""Multi-skill evaluation suites: a generated one with exactly checkable answers, and two read
from the shared data folder (text classification, commonsense reasoning).

A record is a plain dict:

    {"prompt": str, "response": str, "skill": str,
     "answer": str,          # what the checker compares against (default: the response)
     "check": str,           # checker kind: "exact", "caseless", "numbers" or "label"
     "choices": [str, ...],  # label tasks: candidate responses, one equals "response"
     ...}                    # provenance ("id", "input", "skills" of a composed record)

Suites are deterministic functions of their seed and sizes. The data files are read in place
and never copied; without them the real-data suites raise SuiteUnavailable.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

from .grid import grid_suite
from .suite_base import (  # noqa: F401  (Suite, the checkers and SuiteUnavailable are imported from here)
    CHECK_KINDS,
    Suite,
    SuiteUnavailable,
    _fmt,
    _number_lists,
    _sentences,
    _WORDS,
    check_answer,
)

# -- the generated suite ---------------------------------------------------------------------
# Three kinds of input, each shared by several skills that differ only in what they ask:
#   words     -> reverse, upper
#   sentences -> upper, count (words), sentiment
#   numbers   -> add, sort, count (numbers)
BUILTIN_SKILLS = ["add", "sort", "count", "reverse", "upper", "sentiment"]

_PROMPTS = {
    "add": "Add the numbers: {x}",
    "sort": "Sort the numbers: {x}",
    "count_numbers": "Count the numbers: {x}",
    "count_words": "Count the words: {x}",
    "reverse": "Reverse the word: {x}",
    "upper": "Upper-case: {x}",
    "sentiment": "Sentiment: {x}",
}
COMPOSED = {  # name -> (component skills, prompt, input kind)
    "reverse+upper": (("reverse", "upper"), "Reverse the word, then upper-case it: {x}", "word"),
    "sentiment+upper": (("sentiment", "upper"), "Sentiment, in upper case: {x}", "sentence"),
    "sort+reverse": (("sort", "reverse"), "Sort the numbers, then reverse them: {x}", "numbers"),
}



def _skill_items(skill: str) -> list[tuple[str, str, str, str]]:
    """All (prompt, answer, check kind, input) of one skill, in a fixed order."""
    nums, sents = _number_lists(), _sentences()
    if skill == "add":
        return [(_PROMPTS["add"].format(x=_fmt(x)), str(sum(x)), "numbers", _fmt(x)) for x in nums]
    if skill == "sort":
        return [(_PROMPTS["sort"].format(x=_fmt(x)), _fmt(sorted(x)), "numbers", _fmt(x)) for x in nums]
    if skill == "count":
        # alternate lists and sentences so any prefix of a shuffle holds both kinds
        a = [(_PROMPTS["count_numbers"].format(x=_fmt(x)), str(len(x)), "numbers", _fmt(x)) for x in nums]
        b = [(_PROMPTS["count_words"].format(x=s), str(len(s.split())), "numbers", s) for s, _ in sents]
        return [item for pair in zip(a, b) for item in pair]
    if skill == "reverse":
        return [(_PROMPTS["reverse"].format(x=w), w[::-1], "exact", w) for w in _WORDS]
    if skill == "upper":
        return [(_PROMPTS["upper"].format(x=x), x.upper(), "exact", x)
                for x in _WORDS + [s for s, _ in sents]]
    if skill == "sentiment":
        return [(_PROMPTS["sentiment"].format(x=s), label, "caseless", s) for s, label in sents]
    raise ValueError(f"unknown builtin skill {skill!r}; expected one of {BUILTIN_SKILLS}")


def _composed_items(name: str) -> list[tuple[str, str, str, str]]:
    skills, prompt, kind = COMPOSED[name]
    if kind == "word":
        return [(prompt.format(x=w), w[::-1].upper(), "exact", w) for w in _WORDS]
    if kind == "sentence":
        return [(prompt.format(x=s), label.upper(), "exact", s) for s, label in _sentences()]
    return [(prompt.format(x=_fmt(x)), _fmt(sorted(x, reverse=True)), "numbers", _fmt(x)) for x in _number_lists()]


def _record(prompt, answer, kind, x, skill, **extra) -> dict:
    rec = {"prompt": prompt, "response": answer, "skill": skill, "answer": answer, "check": kind, "input": x}
    if skill == "sentiment":
        rec["choices"] = ["positive", "negative"]
    rec.update(extra)
    return rec


def builtin_suite(seed: int = 0, train_per_skill: int = 100, test_per_skill: int = 50,
                  composed: int = 60) -> Suite:
    """Generated suite of 6 skills with exactly checkable, few-token answers.

    Skills share inputs (the same word reversed or upper-cased; the same sentence upper-cased,
    counted or judged; the same digit list added, sorted or counted), so an edit that mixes
    skills up gives a wrong, checkable answer. Per skill, a seeded shuffle of all its prompts
    gives train (first train_per_skill) and test (next test_per_skill): disjoint prompts.
    composed: held-out two-skill prompts, split evenly over COMPOSED, whose inputs are not in
    the training records of either component skill. Same seed and sizes -> same suite.
    """
    if min(train_per_skill, test_per_skill, composed) < 0:
        raise ValueError("sizes must be >= 0")
    train, test, used_inputs = [], [], {}
    for skill in BUILTIN_SKILLS:
        items = _skill_items(skill)
        need = train_per_skill + test_per_skill
        if need > len(items):
            raise ValueError(f"skill {skill!r} has {len(items)} distinct prompts; asked for {need} "
                             f"(train_per_skill + test_per_skill)")
        random.Random(f"{seed}:builtin:{skill}").shuffle(items)
        train += [_record(*it, skill) for it in items[:train_per_skill]]
        test += [_record(*it, skill) for it in items[train_per_skill:need]]
        used_inputs[skill] = {it[3] for it in items[:train_per_skill]}
    names = list(COMPOSED)
    counts = [composed // len(names) + (i < composed % len(names)) for i in range(len(names))]
    held_out = []
    for name, n in zip(names, counts):
        skills = COMPOSED[name][0]
        items = [it for it in _composed_items(name) if not any(it[3] in used_inputs[s] for s in skills)]
        if n > len(items):
            raise ValueError(f"composed task {name!r} has {len(items)} inputs unseen in training; asked for {n}")
        random.Random(f"{seed}:builtin:{name}").shuffle(items)
        held_out += [_record(*it, name, skills=list(skills)) for it in items[:n]]
    train_prompts = {r["prompt"] for r in train}
    assert not train_prompts & {r["prompt"] for r in test + held_out}
    info = {
        "seed": seed,
        "sizes": {"train_per_skill": train_per_skill, "test_per_skill": test_per_skill,
                  "composed": dict(zip(names, counts))},
        "split": "per skill, a seeded shuffle of all its distinct prompts: train first, test next "
                 "(disjoint prompts); composed inputs are unseen by both component skills' train",
        "composed_skills": {name: list(COMPOSED[name][0]) for name in names},
    }
    return Suite("builtin", list(BUILTIN_SKILLS), train, test, held_out, "exact", info)


# -- the shared data folder ------------------------------------------------------------------
CLASSIFICATION_TASKS = {
    "sst2": ["positive", "negative"],
    "agnews": ["world", "sports", "business", "technology"],
    "trec": ["description", "entity", "abbreviation", "person", "location", "number"],
}
COMMONSENSE_TASKS = {
    "boolq": ["true", "false"],
    "piqa": ["solution1", "solution2"],
    "arc_easy": ["answer1", "answer2", "answer3", "answer4"],
    "arc_challenge": ["answer1", "answer2", "answer3", "answer4"],
    "openbookqa": ["answer1", "answer2", "answer3", "answer4"],
}
_FORMAT_LINE = re.compile(r"Answer format:\s*([^\n]+?)\s*$")


def data_dir_candidates(data_dir=None) -> list[Path]:
    """Where the shared data folder is looked for, in order: data_dir; else $CSREFT_DATA;
    else ../shared/data next to the project root; else ../shared/data from the current directory."""
    if data_dir is not None:
        return [Path(data_dir)]
    if os.environ.get("CSREFT_DATA"):
        return [Path(os.environ["CSREFT_DATA"])]
    project_root = Path(__file__).resolve().parents[2]  # csreft/evaluation/suites.py
    return [project_root.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]


def find_data_dir(subfolder: str, files: list[str], data_dir=None) -> Path:
    """The first candidate folder holding every `subfolder/file`; SuiteUnavailable otherwise."""
    looked = data_dir_candidates(data_dir)
    for root in looked:
        if all((root / subfolder / f).is_file() for f in files):
            return root
    where = ", ".join(str(p) for p in looked)
    raise SuiteUnavailable(
        f"the {subfolder} data is not available: looked for {subfolder}/{{{', '.join(files)}}} in "
        f"{where}; build it with `csreft data --output DIR` (pip install 'csreft[data]') and set "
        f"CSREFT_DATA=DIR (or pass data_dir=DIR)"
    )


def _read(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _labels_of(raw: dict, default: list[str]) -> list[str]:
    """This record's answer labels, from its "Answer format: a/b/..." line, else the task's."""
    found = _FORMAT_LINE.search(raw["instruction"])
    labels = found.group(1).split("/") if found else list(default)
    if raw["answer"] not in labels:
        labels.append(raw["answer"])
    return labels


def _convert(raw: dict, task: str, labels: list[str], source: str) -> dict:
    """A data-folder record {instruction, input, output, answer} as a suite record."""
    prompt = raw["instruction"] + (f"\n\n{raw['input']}" if raw.get("input") else "")
    output, answer = raw["output"], raw["answer"]
    prefix = output[: -len(answer)] if output.endswith(answer) else "the correct answer is "
    return {
        "prompt": prompt, "response": output, "skill": task, "answer": answer, "check": "label",
        "choices": [prefix + label for label in _labels_of(raw, labels)], "id": source,
    }


def _subset(records: list, n: int | None, seed_key: str) -> list[int]:
    """Indices of a seeded subset of size n (all if None); a bigger n extends a smaller one."""
    order = list(range(len(records)))
    random.Random(seed_key).shuffle(order)
    return order if n is None else order[: min(n, len(order))]


def _file_suite(name, tasks, subfolder, train_per_skill, test_per_skill, seed, data_dir,
                piqa_test_fraction=0.5) -> Suite:
    """Suite from data-folder tasks; piqa (no train file) gets a seeded disjoint split."""
    files = [f"{t}/{s}.json" for t in tasks for s in ("train", "test") if not (t == "piqa" and s == "train")]
    root = find_data_dir(subfolder, files, data_dir)
    train, test, sizes, sources, notes = [], [], {}, {}, {}
    for task, labels in tasks.items():
        folder = root / subfolder / task
        if task == "piqa":
            pool = _read(folder / "test.json")
            order = list(range(len(pool)))
            random.Random(f"{seed}:piqa-split").shuffle(order)
            n_test = round(len(pool) * piqa_test_fraction)
            test_idx, train_idx = sorted(order[:n_test]), sorted(order[n_test:])
            parts = {"train": ([pool[i] for i in train_idx], train_idx, "test.json"),
                     "test": ([pool[i] for i in test_idx], test_idx, "test.json")}
            notes["piqa_split"] = {
                "source": str(folder / "test.json"), "seed": seed, "test_fraction": piqa_test_fraction,
                "train_indices": train_idx, "test_indices": test_idx,
                "how": f"random.Random('{seed}:piqa-split').shuffle of the file's indices; the "
                       "first test_fraction are the held-out test part, the rest the train part",
            }
        else:
            parts = {}
            for split in ("train", "test"):
                recs = _read(folder / f"{split}.json")
                parts[split] = (recs, list(range(len(recs))), f"{split}.json")
        sizes[task], sources[task] = {}, {}
        for split, n, out in (("train", train_per_skill, train), ("test", test_per_skill, test)):
            recs, file_idx, fname = parts[split]
            chosen = _subset(recs, n, f"{seed}:{name}:{task}:{split}")
            out += [_convert(recs[i], task, labels, f"{task}/{fname}#{file_idx[i]}") for i in chosen]
            sizes[task][split] = len(chosen)
            sources[task][split] = str(folder / fname)
    info = {
        "seed": seed, "data_dir": str(root), "sizes": sizes, "sources": sources,
        "requested": {"train_per_skill": train_per_skill, "test_per_skill": test_per_skill},
        "split": "each file's indices shuffled by random.Random(f'{seed}:<suite>:<task>:<split>'); "
                 "the first n are taken (a larger n extends a smaller one)",
        **notes,
    }
    provenance = root / subfolder / "SOURCES.json"  # written by `csreft data`
    if provenance.is_file():
        info["provenance"] = json.loads(provenance.read_text(encoding="utf-8"))
    return Suite(name, list(tasks), train, test, [], "label", info)


def classification_suite(train_per_skill: int | None = 500, test_per_skill: int | None = 200,
                         seed: int = 0, data_dir=None) -> Suite:
    """sst2 / agnews / trec from <data>/classification: seeded subsets of the train and test
    files (None = all). Prompt = instruction (+ input), response = "the correct answer is
    <label>", choices = that prefix with each label of the task; scoring "label"."""
    return _file_suite("classification", CLASSIFICATION_TASKS, "classification",
                       train_per_skill, test_per_skill, seed, data_dir)


def paraphrase_suite(train_per_skill: int | None = 500, test_per_skill: int | None = 200,
                     seed: int = 0, data_dir=None, test_phrasings: str = "both") -> Suite:
    """The classification tasks with 8 instructions per task (csreft.evaluation.paraphrase):
    training records use 5 of them, in turn; each test text is asked with one of the 3 held-out
    instructions (group "unseen") and, with test_phrasings="both", also with one of the 5
    training instructions (group "seen"), so that a run measures both on the same texts. Some
    instructions on each side put the text first and the question last."""
    from .paraphrase import PHRASINGS, rephrase, source_text

    if test_phrasings not in ("both", "unseen", "seen"):
        raise ValueError(f"test_phrasings={test_phrasings!r}: expected both, unseen or seen")
    base = classification_suite(train_per_skill, test_per_skill, seed, data_dir)
    def phrased(record, phrasing, group, n):
        task = record["skill"]
        names = [c.rsplit(" ", 1)[-1] for c in record["choices"]]
        return {**record, "prompt": rephrase(task, source_text(task, record["prompt"]), names, phrasing),
                "group": group, "phrasing": n}

    train, test = [], []
    for task in base.skills:
        seen, unseen = PHRASINGS[task]
        rows = [r for r in base.train if r["skill"] == task]
        train += [phrased(r, seen[i % len(seen)], "seen", i % len(seen)) for i, r in enumerate(rows)]
        for i, r in enumerate(r for r in base.test if r["skill"] == task):
            if test_phrasings in ("both", "unseen"):
                j = i % len(unseen)
                test.append(phrased(r, unseen[j], "unseen", len(seen) + j))
            if test_phrasings in ("both", "seen"):
                test.append(phrased(r, seen[i % len(seen)], "seen", i % len(seen)))
    info = {**base.info, "phrasings": {t: {"train": list(p[0]), "test": list(p[1])} for t, p in PHRASINGS.items()},
            "test_phrasings": test_phrasings,
            "how": "training record i of a task uses training phrasing i mod 5; test text i uses held-out "
                   "phrasing i mod 3 (group unseen) and training phrasing i mod 5 (group seen)"}
    name = "paraphrase" if test_phrasings == "both" else f"paraphrase-{test_phrasings}"
    return Suite(name, base.skills, train, test, [], "label", info)


def commonsense_suite(train_per_skill: int | None = 500, test_per_skill: int | None = 200,
                      seed: int = 0, data_dir=None, piqa_test_fraction: float = 0.5) -> Suite:
    """boolq / piqa / arc_easy / arc_challenge / openbookqa from <data>/commonsense.

    piqa has only a test file: a seeded shuffle splits it into a train part and a disjoint
    held-out test part (piqa_test_fraction of it), both recorded in info["piqa_split"].
    Each record's choices come from its "Answer format:" line (arc has 3 to 5 answers).
    """
    if not 0.0 < piqa_test_fraction < 1.0:
        raise ValueError(f"piqa_test_fraction={piqa_test_fraction}: must be in (0, 1)")
    return _file_suite("commonsense", COMMONSENSE_TASKS, "commonsense", train_per_skill,
                       test_per_skill, seed, data_dir, piqa_test_fraction)


def files_suite(train: str, test: str, train_per_skill: int | None = None, test_per_skill: int | None = None,
                seed: int = 0, **_ignored) -> Suite:
    """A suite from a user's own files (any format `csreft train` reads), every record with a
    `skill`. Scoring: "label" when every test record has `choices`, else "exact" (greedy output
    against `answer`, else the response). Seeded per-skill subsets as in the other suites; the
    suite's name carries a digest of the records, so runs on other data are never reused."""
    import hashlib

    from ..data import load_records

    if not train or not test:
        raise ValueError("your own data needs both --train FILE and --test FILE")
    parts = {}
    for split, path, n in (("train", train, train_per_skill), ("test", test, test_per_skill)):
        records = load_records(path)
        missing = [i + 1 for i, r in enumerate(records) if not r.get("skill")]
        if missing:
            raise ValueError(f"{path}: record(s) {missing[:5]} have no 'skill' field; compare needs the "
                             "skill of every record")
        chosen = []
        for skill in sorted({r["skill"] for r in records}):
            of_skill = [r for r in records if r["skill"] == skill]
            chosen += [of_skill[i] for i in _subset(of_skill, n, f"{seed}:files:{skill}:{split}")]
        parts[split] = chosen
    skills = sorted({r["skill"] for r in parts["train"]})
    unknown = sorted({r["skill"] for r in parts["test"]} - set(skills))
    if unknown:
        raise ValueError(f"{test}: skill(s) {unknown} have no training records in {train}")
    scoring = "label" if all("choices" in r for r in parts["test"]) else "exact"
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
    info = {"seed": seed, "sources": {"train": str(train), "test": str(test)}, "digest": digest,
            "sizes": {s: {split: sum(r["skill"] == s for r in parts[split]) for split in parts} for s in skills}}
    return Suite(f"files:{digest}", skills, parts["train"], parts["test"], [], scoring, info)


SUITES = {"builtin": builtin_suite, "classification": classification_suite, "paraphrase": paraphrase_suite,
          "commonsense": commonsense_suite, "files": files_suite, "grid": grid_suite}


def get_suite(name: str, **kwargs) -> Suite:
    """builtin_suite / classification_suite / paraphrase_suite / commonsense_suite / files_suite /
    grid_suite (csreft.evaluation.grid) by name, with their keywords."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; expected one of {sorted(SUITES)}")
    return SUITES[name](**kwargs)
