"""The comparison runner end to end on a tiny model: every number in the report comes from the run."""

import dataclasses
import json
import re
import statistics
from pathlib import Path

import pytest

from csreft.comparison.options import CompareOptions
from csreft.comparison.runner import compare, training_stream
from csreft.cli import main
from csreft.comparison.report import _slug


def test_training_stream_is_seeded_and_cycles():
    recs = [{"i": i} for i in range(5)]
    a, b = training_stream(recs, 12, seed=0), training_stream(recs, 12, seed=0)
    assert a == b and len(a) == 12 and training_stream(recs, 12, seed=1) != a
    assert sorted(r["i"] for r in a[:5]) == list(range(5))  # each pass is a permutation


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("compare")
    opts = CompareOptions(suite="builtin", seeds=2, max_steps=2, batch_size=4, specialist_batch_size=1, lr=1e-2, rank=2,
                          layers=[1, 2], positions="f2+l2", router_hidden=16, train_per_skill=4,
                          test_per_skill=2, composed=6, eval_batch_size=8, model=str(tiny_model_dir),
                          output_dir=str(out), max_length=64)
    return compare(opts), out


def test_report_files_and_methods(report):
    r, out = report
    assert set(r["methods"]) == {"base", "loreft", "specialists", "csreft", "csreft_supervised", "lora", "lora_edits"}
    assert json.loads((out / "report.json").read_text())["suite"] == "builtin"
    md = (out / "report.md").read_text()
    assert "| csreft_supervised |" in md and "Interference" in md and "sign-flip" in md and "Routing" in md
    for method in ("csreft", "csreft_supervised"):
        for seed in (0, 1):
            assert (out / f"gates-{method}-seed{seed}.png").stat().st_size > 1000


def test_every_report_table_renders(report):
    """A Markdown table renders only when its delimiter row has as many cells as its header and rows."""
    lines = (report[1] / "report.md").read_text().splitlines()
    tables = [i for i, line in enumerate(lines) if re.fullmatch(r"(\|---)+\|", line)]
    assert len(tables) >= 4
    for i in tables:
        width = lines[i].count("|") - 1
        rows = [lines[i - 1]] + [line for line in lines[i + 1:] if line.startswith("|")][:1]
        assert all(row.count("|") - 1 == width for row in rows), (lines[i - 1], lines[i])


def test_report_numbers_come_from_the_runs(report):
    r, out = report
    k = len(r["skills"])
    for name, m in r["methods"].items():
        assert len(m["per_seed_accuracy"]) == 2
        assert m["accuracy"]["mean"] == pytest.approx(statistics.mean(m["per_seed_accuracy"]))
        means = [m["per_skill"][s]["mean"] for s in r["skills"]]
        assert all(0.0 <= v <= 1.0 for v in means)
    # parameter budgets: LoReFT matches CS-ReFT's edits, LoRA is near CS-ReFT's total
    edits_per_layer = 2 * 64 * (2 * k) + 2 * k
    assert r["methods"]["loreft"]["trainable_parameters"] == 2 * edits_per_layer
    cs = r["methods"]["csreft"]["trainable_parameters"]
    assert cs == 2 * edits_per_layer + 64 * 16 + 16 + 16 * k + k
    lora = r["methods"]["lora"]["trainable_parameters"]
    assert abs(lora - cs) <= lora / r["methods"]["lora"]["lora_rank"]  # within one LoRA rank
    assert r["methods"]["base"]["trainable_parameters"] == 0
    # interference is specialist minus joint, per skill
    for method, v in r["interference"].items():
        for s, diff in v["per_skill"].items():
            expected = r["methods"]["specialists"]["per_skill"][s]["mean"] - r["methods"][method]["per_skill"][s]["mean"]
            assert diff == pytest.approx(expected)
    # gates: one row per skill, one column per subspace, values in [0, 1]
    gates = r["methods"]["csreft"]["gates"][0]
    assert len(gates) == k and all(len(row) == k and all(0 <= g <= 1 for g in row) for row in gates)
    # the joint runs saw max_steps x batch examples; specialists exactly their skill's share of them
    assert r["examples_seen_per_joint_run"] == 8
    per_seed = r["methods"]["specialists"]["examples_per_skill"]
    assert len(per_seed) == 2 and all(sum(counts.values()) == 8 for counts in per_seed)
    for t in r["paired_tests"]:  # records x seeds: each record counts once, its seeds averaged
        assert (t["n"], t["seeds"], t["test"]) == (r["sizes"]["test"], 2, "sign-flip") and 0.0 < t["p"] <= 1.0
        assert t["accuracy_difference"] == pytest.approx(sum(t["per_seed"]) / 2)
    runs = json.loads((out / "runs" / "csreft-seed0" / "log.jsonl").read_text().splitlines()[-1])
    assert runs["step"] == 2
    for method in ("loreft", "csreft", "lora"):  # the answer-token loss is logged for every joint method
        logged = [json.loads(line) for line in (out / "runs" / f"{method}-seed0" / "log.jsonl").read_text().splitlines()]
        assert any(0 < row.get("answer_loss", -1) < 50 for row in logged), method
    # specialist_batch_size=1: one optimizer step per example of the skill
    for skill, n in per_seed[1].items():
        if n:
            last = (out / "runs" / "specialists-seed1" / skill / "log.jsonl").read_text().splitlines()[-1]
            assert json.loads(last)["step"] == n
    assert "at batch size 1:" in (out / "report.md").read_text()
    # per-example results are kept, so other paired tests can be run later
    kept = json.loads((out / "runs" / "csreft-seed1" / "result.json").read_text())
    assert len(kept["correct"]) == r["sizes"]["test"]
    assert kept["accuracy"] == pytest.approx(r["methods"]["csreft"]["per_seed_accuracy"][1])
    assert len(json.loads((out / "runs" / "base-seed0" / "result.json").read_text())["correct"]) == r["sizes"]["test"]
    # the frozen base has no seed: scored once, its answers stand for every seed, its seconds counted once
    assert not (out / "runs" / "base-seed1").exists()
    assert r["methods"]["base"]["seeds"] == 2 and len(set(r["methods"]["base"]["per_seed_accuracy"])) == 1
    saved = [json.loads(p.read_text()) for p in (out / "runs").glob("*/result.json")]
    assert r["run_seconds"] == pytest.approx(sum(x["train_seconds"] + x["seconds"] for x in saved))


def test_cli_rejects_unknown_method(capsys):
    with pytest.raises(SystemExit, match="unknown method 'magic'"):
        main(["compare", "--methods", "base,magic"])


def test_validation_split_is_carved_from_train_and_disjoint_from_test():
    from csreft.comparison.runner import split_validation
    from csreft.evaluation.suites import get_suite

    suite = get_suite("builtin", train_per_skill=10, test_per_skill=4, composed=6)
    pool, val = split_validation(suite, 3)
    key = lambda r: r["prompt"]  # noqa: E731
    assert len(val) == 3 * len(suite.skills) and len(pool) + len(val) == len(suite.train)
    assert not {key(r) for r in pool} & {key(r) for r in val}
    assert not {key(r) for r in val} & {key(r) for r in suite.test}
    assert split_validation(suite, 3) == (pool, val)  # deterministic


def test_method_variants_parse_and_bad_ones_are_named():
    from csreft.comparison.methods import parse_methods

    methods = parse_methods("loreft,csreft[gating=hard,sparsity_weight=1e-2],lora[lr=3e-4]")
    assert [m.label for m in methods] == ["loreft", "csreft[gating=hard,sparsity_weight=0.01]", "lora[lr=0.0003]"]
    assert methods[1].overrides == {"gating": "hard", "sparsity_weight": 0.01} and methods[2].lr == 3e-4
    assert len(parse_methods("all")) == 7
    for bad, message in [("csreft[gatting=hard]", "'gatting' cannot be set"), ("csreft[gating=medium]", "gating='medium'"),
                         ("lora[rank=4]", "'rank' cannot be set for lora"), ("csreft[lr=0]", "lr=0"),
                         ("csreft,csreft", "given twice"), ("csreft[gating]", "not key=value")]:
        with pytest.raises(ValueError, match=message):
            parse_methods(bad)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("tuned")
    opts = CompareOptions(suite="builtin", seeds=1, max_steps=2, select_steps=1, batch_size=4, lr=None,
                          lr_grid_reft=(1e-3, 3e-2), lr_grid_lora=(1e-4, 1e-2), val_per_skill=1,
                          methods="base,loreft,csreft,csreft[router_input=head,balance_weight=1.0],lora,lora_edits",
                          rank=2, layers=[1, 2], positions="f2+l2", router_hidden=16, train_per_skill=4,
                          test_per_skill=2, composed=6, eval_batch_size=8, model=str(tiny_model_dir),
                          output_dir=str(out), max_length=64, quiet=True)
    return compare(opts), out, opts


def test_learning_rates_are_chosen_on_validation_per_method(tuned):
    r, out, _ = tuned
    variant = "csreft[router_input=head,balance_weight=1.0]"
    assert set(r["methods"]) == {"base", "loreft", "csreft", variant, "lora", "lora_edits"}
    for name, m in r["methods"].items():
        if name == "base":
            assert m["lr"] is None and m["lr_selection"] is None
            continue
        sel = m["lr_selection"]
        grid = (1e-4, 1e-2) if name.startswith("lora") else (1e-3, 3e-2)
        assert [float(x) for x in sel["validation_accuracy"]] == list(grid) and sel["steps"] == 1
        best = max(sel["validation_accuracy"].items(), key=lambda kv: (kv[1], -float(kv[0])))
        assert m["lr"] == sel["lr"] == float(best[0])
        assert m["validation_accuracy"] == best[1]
        for lr in grid:  # every grid value was trained and scored on the validation records
            res = json.loads((out / "selection" / f"{_slug(name)}-lr{lr:g}" / "result.json").read_text())
            assert res["key"]["split"] == "validation" and len(res["correct"]) == len(r["skills"])
    assert r["methods"][variant]["routing_nmi"]["mean"] is not None
    assert "| lr |" in (out / "report.md").read_text().replace(" lr | val", " lr |")


def test_lora_at_two_budgets(tuned):
    r, _, _ = tuned
    m = r["methods"]
    cs_total, cs_edits = m["csreft"]["trainable_parameters"], m["csreft"]["edit_parameters"]
    for name, target in (("lora", cs_total), ("lora_edits", cs_edits)):
        rank = m[name]["lora_rank"]
        assert abs(m[name]["trainable_parameters"] - target) <= m[name]["trainable_parameters"] / rank
    assert m["lora_edits"]["trainable_parameters"] < m["lora"]["trainable_parameters"]
    pairs = {(t["a"], t["b"]) for t in r["paired_tests"]}
    for ref in ("loreft", "lora", "lora_edits", "base"):
        assert ("csreft", ref) in pairs and ("csreft[router_input=head,balance_weight=1.0]", ref) in pairs
    assert ("csreft[router_input=head,balance_weight=1.0]", "csreft") in pairs


def test_identical_runs_are_reused_not_retrained(tuned, monkeypatch, capsys):
    r, out, opts = tuned
    import csreft.comparison.runner as cmp

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(cmp, "_train", no_training)
    again = compare(dataclasses.replace(opts, quiet=False))
    assert again["methods"]["csreft"]["per_seed_accuracy"] == r["methods"]["csreft"]["per_seed_accuracy"]
    assert again["methods"]["lora"]["lr"] == r["methods"]["lora"]["lr"]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[csreft] ")]
    runs = [line for line in lines if "seed 0" in line or line.startswith("[csreft] selecting lr")]
    assert len(runs) == 6 + 10  # one line per run: 6 final runs, 10 selection runs, none announced as training
    assert all("reusing the finished run in " + str(out) in line and "min left" not in line for line in runs)


def test_only_lines_that_train_carry_an_estimate(capsys):
    from csreft.comparison.runner import Stages

    stages = Stages(30, quiet=False)
    stages.begin("loreft, seed 0", "training 10 steps", 10, None)
    stages.ran(10, 60.0)  # 6 s a step
    stages.begin("csreft, seed 0", "training", 10, Path("runs/csreft-seed0"))
    stages.say("csreft: lr 0.003")
    stages.begin("lora, seed 0", "training 10 steps", 10, None)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:3] == ["[csreft] csreft, seed 0: reusing the finished run in runs/csreft-seed0", "[csreft] csreft: lr 0.003"]
    assert lines[3] == "[csreft] lora, seed 0: training 10 steps; about 1.0 min, all runs 1 min left"


def test_runs_without_a_router_do_not_depend_on_router_defaults():
    from csreft.comparison.runner import _canonical

    loreft = {"method": "loreft", "lr": 1e-3, "config": {"use_router": False, "rank": 8, "router_input": "mean",
                                                         "balance_weight": 0.0}}
    changed = {**loreft, "config": {**loreft["config"], "router_input": "head", "balance_weight": 2.0}}
    assert _canonical(loreft) == _canonical(changed)
    assert _canonical({**changed, "lr": 3e-3}) != _canonical(loreft)
    routed = {**loreft, "config": {**loreft["config"], "use_router": True}}
    assert _canonical(routed) != _canonical({**routed, "config": {**routed["config"], "balance_weight": 2.0}})


def test_runs_saved_before_a_config_field_existed_are_reused():
    """A key saved before placement / edit_generated existed ran as their defaults do."""
    from csreft import CSReftConfig
    from csreft.comparison.runner import _canonical

    now = {"method": "csreft", "lr": 1e-3, "config": CSReftConfig(num_subspaces=3).to_dict()}
    before = {**now, "config": {k: v for k, v in now["config"].items() if k not in ("placement", "edit_generated")}}
    assert _canonical(before) == _canonical(now)
    assert _canonical(before) != _canonical({**now, "config": {**now["config"], "edit_generated": True}})


def test_demo_says_what_runs_and_ends_with_a_reading(tmp_path, tiny_model_dir, capsys):
    import torch

    threads = torch.get_num_threads()
    main(["demo", "--model", str(tiny_model_dir), "--max-minutes", "0.2", "--layers", "1,2", "--rank", "2",
          "--router-hidden", "16", "--train-per-skill", "6", "--test-per-skill", "2", "--val-per-skill", "1",
          "--composed", "6", "--max-length", "64", "--output-dir", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    assert re.search(r"--max-minutes 0.2: \d+ steps per run \(a step took [\d.]+ s on \d+ threads?", out)
    assert "[csreft] loreft, seed 0: training" in out and "[csreft] csreft, seed 0: training" in out
    assert re.search(r"\[csreft\] base, seed 0: scoring the frozen base on \d+ test records\n", out)
    assert "Reading: CS-ReFT (csreft) is" in out and "routing NMI" in out
    assert "{'loss'" not in out and '"csreft_config"' not in out  # no raw log dictionaries or JSON dumps
    assert f"full report: {tmp_path / 'demo' / 'report.md'}" in out
    assert torch.get_num_threads() == threads  # the calibration's choice ends with the comparison


@pytest.mark.parametrize("one_thread_s, expected_threads", [(1.0, 1), (2.8, 2), (6.0, 2)])
def test_step_calibration_trains_on_the_faster_thread_count(monkeypatch, tiny, one_thread_s, expected_threads):
    """On a CPU another job shares, one thread can beat torch's two; the steps follow one thread
    where it is 10% faster (2.8 s against 3.0 s is noise: torch's count stays)."""
    import torch

    import csreft.comparison.runner as cmp
    from csreft.config import CSReftConfig
    from csreft.evaluation.suites import builtin_suite
    from conftest import tiny_tokenizer

    tok = tiny_tokenizer()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cmp, "_step_seconds", lambda *a: one_thread_s if torch.get_num_threads() == 1 else 3.0)
    before = torch.get_num_threads()
    opts = CompareOptions(batch_size=2, max_length=64)
    cfg = CSReftConfig(layers=[1, 2], rank=2, num_subspaces=6, positions="f2+l2", router_hidden=16)
    try:
        torch.set_num_threads(2)
        steps, per_step = cmp._calibrate_steps(tiny, tok, builtin_suite(train_per_skill=2, test_per_skill=1),
                                               cfg, opts, budget_s=120.0, n_train_runs=2)
        assert per_step == {2: 3.0, 1: one_thread_s}
        assert torch.get_num_threads() == expected_threads and steps == int(60 / per_step[expected_threads])
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's own choice is kept
        torch.set_num_threads(2)
        assert cmp._calibrate_steps(tiny, tok, builtin_suite(train_per_skill=2, test_per_skill=1),
                                    cfg, opts, 120.0, 2)[1] == {2: 3.0} and torch.get_num_threads() == 2
        # compare gives torch its thread count back, also when the comparison fails
        monkeypatch.setattr(cmp, "_compare", lambda opts: torch.set_num_threads(1) or 1 / 0)
        with pytest.raises(ZeroDivisionError):
            cmp.compare(opts)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_report_only_uses_finished_runs_and_trains_nothing(tuned, monkeypatch, tmp_path):
    import shutil

    import csreft.comparison.runner as cmp

    r, out, opts = tuned
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    shutil.rmtree(partial / "runs" / "lora-seed0")  # as if the comparison was stopped before it
    monkeypatch.setattr(cmp, "_train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    again = compare(dataclasses.replace(opts, output_dir=str(partial), report_only=True))
    assert "lora" not in again["methods"] and again["methods"]["csreft"] == r["methods"]["csreft"]
    with pytest.raises(ValueError, match="no finished run"):
        compare(dataclasses.replace(opts, output_dir=str(tmp_path / "empty"), report_only=True))


def test_an_unfinished_report_says_which_seeds_it_holds(report, monkeypatch, tmp_path):
    import shutil

    import csreft.comparison.runner as cmp

    r, out = report
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    for run in (partial / "runs").glob("*-seed1"):  # stopped after seed 0 of a 2-seed comparison
        shutil.rmtree(run)
    monkeypatch.setattr(cmp, "_train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    again = compare(dataclasses.replace(CompareOptions(**r["options"]), output_dir=str(partial), report_only=True))
    assert again["seeds"] == [0] and again["seeds_planned"] == 2
    assert all(m["seeds"] == 1 for m in again["methods"].values())
    md = (partial / "report.md").read_text()
    assert "seeds [0] of 2 planned (unfinished)" in md and "rebuilt from finished runs" in md
    full = (out / "report.md").read_text()
    assert "seeds [0, 1];" in full and "wall time" in full
    shutil.copytree(out / "runs", partial / "runs", dirs_exist_ok=True)
    shutil.rmtree(partial / "runs" / "loreft-seed1")  # every method but one has both seeds
    compare(dataclasses.replace(CompareOptions(**r["options"]), output_dir=str(partial), report_only=True))
    n = len(again["methods"])
    assert f"seeds [0, 1] of 2 planned (unfinished: 1 of {n} methods have fewer);" in (partial / "report.md").read_text()
    expected = sum(m["train_seconds"] + m["eval_seconds"] for m in again["methods"].values())
    assert again["run_seconds"] == pytest.approx(expected)


def test_plateau_reads_the_last_quarter_of_a_curve():
    from csreft.comparison.report import gain_ci, mean_curve, plateau

    def curve(*acc, every=10):
        return [{"step": every * i, "accuracy": a} for i, a in enumerate(acc)]

    rising = plateau(curve(0.2, 0.4, 0.5, 0.6, 0.7))  # last quarter: 30 -> 40, +10 points
    assert not rising["plateaued"] and rising["gain_last_quarter"] == pytest.approx(0.1) and rising["step"] == 40
    flat = plateau(curve(0.2, 0.6, 0.7, 0.705, 0.70))
    assert flat["plateaued"] and flat["step"] == 20 and flat["best"] == 0.705 and flat["final"] == 0.70
    assert plateau(curve(0.5, 0.3, 0.2, 0.1, 0.1))["step"] == 0  # nothing later beats the start
    # the last quarter is of the planned steps: a run that ended at 39 of 40 reads from step 30
    short = curve(0.2, 0.4, 0.5, 0.8) + [{"step": 39, "accuracy": 0.85}]
    assert plateau(short)["gain_last_quarter"] == pytest.approx(0.35)  # from step 20 (3/4 of 39 = 29.25)
    assert plateau(short, planned=40)["gain_last_quarter"] == pytest.approx(0.05)  # from step 30
    # seeds' curves: mean at the common steps; the ends of one planned length, a step apart, together
    a = curve(0.2, 0.4, 0.6)
    b = curve(0.4, 0.6)[:2] + [{"step": 19, "accuracy": 0.8}]
    assert mean_curve([a, b]) == [{"step": s, "accuracy": pytest.approx(v)} for s, v in ((0, 0.3), (10, 0.5), (20, 0.7))]
    # ends far apart are not one planned length: only the steps every curve has
    assert [p["step"] for p in mean_curve([a, curve(0.4, 0.6, 0.8, 0.9)])] == [0, 10, 20]
    # a curve that ends before 3/4 of its planned steps says nothing of its last quarter
    early = plateau(curve(0.2, 0.4, 0.6), planned=480)
    assert early["gain_last_quarter"] is None and early["plateaued"] is None and early["final"] == 0.6
    assert plateau(curve(0.3))["gain_last_quarter"] is None


def test_the_gain_ci_is_in_the_curves_measure_and_resamples_records_not_seeds():
    from csreft.comparison.report import gain_ci

    def run(before: dict, after: dict) -> list[dict]:
        return [{"step": 0, "accuracy": 0.0}, {"step": 10, "accuracy": 0.0, "correct": before},
                {"step": 20, "accuracy": 0.0, "correct": after}]

    # skill x: 1 record, lost; skill y: 4 records, all gained: the skills' mean gains (-1 + 1) / 2 = 0
    # (the records' plain mean would say +0.6)
    lo, hi = gain_ci([run({"x": [1], "y": [0, 0, 0, 0]}, {"x": [0], "y": [1, 1, 1, 1]})], 10)
    assert lo < 0 < hi
    # the same 4 of 40 records gained in each of 3 seeds: as certain as in one seed, no narrower
    seed = run({"z": [0] * 40}, {"z": [1] * 4 + [0] * 36})
    assert gain_ci([seed] * 3, 10) == gain_ci([seed], 10)
    assert gain_ci([seed], 10)[0] > 0
    assert gain_ci([seed], 0) is None  # no answers kept at step 0 (as in runs saved before they were)
    assert gain_ci([seed, run({"z": [0] * 39}, {"z": [1] * 39})], 10) is None  # not the same records


def test_eval_every_must_be_positive_and_needs_validation():
    with pytest.raises(ValueError, match="--eval-every 0 is not valid"):
        CompareOptions(eval_every=0)
    with pytest.raises(ValueError, match="--eval-every needs validation records"):
        CompareOptions(eval_every=5, val_per_skill=0)


def test_learning_curves_are_scored_on_validation_and_end_at_the_run(tmp_path, tiny_model_dir):
    out = tmp_path / "curves"
    opts = CompareOptions(suite="builtin", seeds=1, max_steps=5, eval_every=2, batch_size=4, lr=3e-2,
                          eval_split="validation", val_per_skill=2, methods="base,loreft,csreft,lora",
                          rank=2, layers=[1, 2], positions="f2+l2", router_hidden=16, train_per_skill=6,
                          test_per_skill=1, composed=0, eval_batch_size=8, model=str(tiny_model_dir),
                          output_dir=str(out), max_length=64, quiet=True)
    r = compare(opts)
    for name in ("loreft", "csreft", "lora"):
        m = r["methods"][name]
        assert [p["step"] for p in m["curve"]] == [0, 2, 4, 5]
        # the last point is the trained model on the same validation records the run is scored on
        assert m["curve"][-1]["accuracy"] == pytest.approx(m["accuracy"]["mean"])
        assert m["plateau"]["final"] == m["curve"][-1]["accuracy"]
        # the gain's CI comes from the per-record answers, kept at every point, and brackets the gain
        lo, hi = m["plateau"]["gain_ci95"]
        assert lo <= m["plateau"]["gain_last_quarter"] <= hi and m["plateau"]["quarter_step"] == 2
        points = json.loads((out / "runs" / f"{name}-seed0" / "result.json").read_text())["curve"]
        for p in points:  # 6 skills x 2 validation records; the accuracy is the skills' mean
            assert sorted(p["correct"]) == sorted(r["skills"]) and {len(v) for v in p["correct"].values()} == {2}
            assert statistics.mean(sum(v) / 2 for v in p["correct"].values()) == pytest.approx(p["accuracy"])
    # LoReFT starts as the identity (W = R, b = 0): its step-0 point is the frozen base
    assert r["methods"]["loreft"]["curve"][0]["accuracy"] == pytest.approx(r["methods"]["base"]["accuracy"]["mean"])
    assert "curve" not in r["methods"]["base"]
    assert (out / "curves.png").stat().st_size > 1000
    assert "Learning curves" in (out / "report.md").read_text()
    saved = json.loads((out / "runs" / "loreft-seed0" / "result.json").read_text())
    assert saved["key"]["eval_every"] == 2 and len(saved["curve"]) == 4


def test_specialists_at_two_ranks_are_both_references(tmp_path, tiny_model_dir):
    from csreft.comparison.methods import parse_methods

    assert parse_methods("specialists[rank=2],loreft[rank=2]")[0].overrides == {"rank": 2}
    for bad, message in (("specialists[rank=0]", "rank=0 must be an integer >= 1"),
                         ("lora[rank=2]", "'rank' cannot be set for lora")):
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_methods(bad)
    opts = CompareOptions(suite="builtin", seeds=1, max_steps=2, batch_size=4, lr=1e-2,
                          methods="loreft,specialists,specialists[rank=2],csreft", rank=2, layers=[1, 2],
                          positions="f2+l2", router_hidden=16, train_per_skill=4, test_per_skill=2, composed=0,
                          eval_batch_size=8, model=str(tiny_model_dir), output_dir=str(tmp_path), max_length=64,
                          quiet=True)
    r = compare(opts)
    k = len(r["skills"])
    assert r["configs"]["specialists[rank=2]"]["rank"] == 2 and r["configs"]["loreft"]["rank"] == 2 * k
    per_layer = lambda rank: 2 * 64 * rank + rank  # R and W (rank x d each), b
    assert r["methods"]["specialists[rank=2]"]["trainable_parameters"] == k * 2 * per_layer(2)
    assert r["methods"]["specialists"]["trainable_parameters"] == k * 2 * per_layer(2 * k)
    by_ref = r["interference_by_reference"]
    assert set(by_ref) == {"specialists", "specialists[rank=2]"} and r["interference"] == by_ref["specialists"]
    for spec, table in by_ref.items():
        for skill, diff in table["csreft"]["per_skill"].items():
            want = r["methods"][spec]["per_skill"][skill]["mean"] - r["methods"]["csreft"]["per_skill"][skill]["mean"]
            assert diff == pytest.approx(want)
    pairs = {(t["a"], t["b"]) for t in r["paired_tests"]}
    assert {("csreft", "specialists[rank=2]"), ("loreft", "specialists[rank=2]"), ("csreft", "specialists")} <= pairs
    md = (tmp_path / "report.md").read_text()
    assert "Interference against specialists[rank=2] (one LoReFT of rank 2 per skill)" in md
    assert f"Interference against specialists (one LoReFT of rank {2 * k} per skill)" in md


def test_the_base_alone_is_scored_once_and_the_report_is_finished(tmp_path, tiny_model_dir, monkeypatch):
    import csreft.comparison.runner as cmp

    scored = []
    evaluate = cmp._evaluate
    monkeypatch.setattr(cmp, "_evaluate", lambda *a, **k: scored.append(1) or evaluate(*a, **k))
    out = tmp_path / "base"
    r = compare(CompareOptions(suite="builtin", seeds=3, methods="base", train_per_skill=2, test_per_skill=1,
                               composed=0, model=str(tiny_model_dir), output_dir=str(out), max_length=64, quiet=True))
    assert len(scored) == 1 and r["seeds"] == [0, 1, 2] and r["methods"]["base"]["seeds"] == 3
    assert "unfinished" not in (out / "report.md").read_text()
