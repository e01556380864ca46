"""Flags from the option dataclasses: what is given is what is recorded, lists, booleans,
--config files merged under the flags, and one clear error per bad value."""

from __future__ import annotations

import pytest

from csreft.cli import build_parser, main
from csreft.cli.common import options_with_file
from csreft.cli.options import given
from csreft.cli.train import train_options
from csreft.comparison.options import CompareOptions
from csreft.training.options import TrainingOptions, split_options


def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_only_the_flags_given_are_options_and_both_spellings_work():
    assert given(parse("train")) == {}
    args = parse("train", "--max-steps", "3", "--max_length", "64", "--layers", "1,2", "--lr", "1e-3")
    assert given(args) == {"max_steps": 3, "max_length": 64, "layers": [1, 2], "lr": 1e-3}


@pytest.mark.parametrize("argv, value", [(["--bf16"], True), (["--bf16", "false"], False), (["--no-bf16"], False),
                                         (["--use-router", "no"], False), (["--no-use-router"], False),
                                         (["--use-router"], True)])
def test_booleans_take_a_flag_a_value_or_no(argv, value):
    opts = given(parse("train", *argv))
    assert list(opts.values()) == [value]


def test_an_optional_field_takes_none_on_the_command_line():
    assert given(parse("train", "--router-hidden", "none")) == {"router_hidden": None}
    assert given(parse("train", "--router-hidden", "64")) == {"router_hidden": 64}
    assert "router_hidden" not in given(parse("train"))  # not given: the default (128) applies


@pytest.mark.parametrize("argv", [["--layers", "3,x"], ["--max-steps", "many"], ["--gating", "sometimes"],
                                  ["--bf16", "maybe"], ["--train", "edits"]])
def test_a_bad_flag_value_is_one_argparse_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse("train", *argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("csreft train: error: argument") and argv[1] in err


def test_a_config_file_fills_what_the_flags_leave_out(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_steps: 5\nlr: 2e-3\nlayers: [3, 9]\nbf16: yes\n")
    opts = options_with_file(parse("train", "--config", str(path), "--max-steps", "7"), train_options())
    assert opts == {"max_steps": 7, "lr": 2e-3, "layers": [3, 9], "bf16": True}
    training, config = split_options(opts)
    assert (training.max_steps, training.bf16, config) == (7, True, {"layers": [3, 9]})


def test_compare_takes_a_config_file_too(tmp_path, monkeypatch, capsys):
    import csreft.comparison.runner as runner

    seen = []
    monkeypatch.setattr(runner, "compare", lambda opts: seen.append(opts) or {})
    monkeypatch.setattr("csreft.comparison.report.summary_lines", lambda report: [])
    path = tmp_path / "cmp.json"
    path.write_text('{"methods": "base,csreft[gating=hard]", "seeds": 2, "lr-grid-reft": [1e-3, 3e-3]}')
    main(["compare", "--config", str(path), "--seeds", "1", "--output-dir", str(tmp_path / "out")])
    main(["demo", "--max-minutes", "2"])
    cmp, demo = seen
    assert (cmp.methods, cmp.seeds, cmp.lr_grid_reft, cmp.suite) == ("base,csreft[gating=hard]", 1, (1e-3, 3e-3),
                                                                     "builtin")
    assert (demo.methods, demo.max_minutes, demo.lr, demo.seeds) == ("base,loreft,csreft", 2.0, 3e-3, 1)
    path.write_text('{"method": "base"}')
    with pytest.raises(SystemExit, match=r"cmp.json, line 1: unknown option 'method'; did you mean 'methods'\?"):
        main(["compare", "--config", str(path)])


@pytest.mark.parametrize("kwargs, message", [
    ({"methods": "csreft[rank=0]"}, "rank=0 is not valid"), ({"methods": "nope"}, "unknown method 'nope'"),
    ({"seeds": 0}, "--seeds 0 is not valid: an integer >= 1"), ({"lr_grid_lora": []}, "--lr-grid-lora"),
    ({"eval_split": "train"}, "--eval-split 'train' is not valid: one of test, validation"),
    ({"max_minutes": -1.0}, "--max-minutes -1.0 is not valid"), ({"layers": "3,x"}, "invalid literal")])
def test_compare_options_check_themselves(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        CompareOptions(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "--batch-size 0 is not valid: an integer >= 1"),
    ({"lr": float("nan")}, "--lr nan is not valid"), ({"train": "edits"}, "--train 'edits'"),
    ({"scheduler": "sometimes"}, "--scheduler 'sometimes' is not valid"),
    ({"resume": "latest", "overwrite": True}, "contradict")])
def test_training_options_check_themselves(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainingOptions(**kwargs)


def test_an_unknown_option_name_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown training option\(s\) \['max_step'\]; known: .*max_steps"):
        split_options({"max_step": 3})
