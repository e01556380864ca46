"""Instruction-tuning evaluation: AlpacaEval outputs and resume, the pairwise judge, response
NLL, data preparation and the paper's configuration (tiny models; SmolLM2 where marked slow)."""

import json
import math
from pathlib import Path

import pytest
import torch

import csreft.generation
from conftest import tiny_llama, tiny_tokenizer
from csreft import CSReftConfig, get_csreft_model, load_base
from csreft.cli import command_parser, main
from csreft.cli.config_file import read_options_file as _read_options_file
from csreft.cli.info import config_from_options


def read_options_file(path):
    return _read_options_file(path, command_parser("train"))

from csreft.evaluation.scoring import response_nll
from csreft.training.options import TRAINING_FIELDS
from csreft.evaluation.instruct import (
    data_root, generate_outputs, judge_pairwise, load_instructions, sidecar_paths,
    split_alpaca_eval, ultrafeedback_best, win_rate,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
KEYS = {"instruction", "output", "generator", "dataset"}


def instruction_file(path, n=7):
    records = [{"instruction": f"count the letters {i}", "output": "abc " * (i + 1),
                "generator": "reference", "dataset": "even" if i % 2 == 0 else "odd"} for i in range(n)]
    path.write_text(json.dumps(records))
    return path


@pytest.fixture
def tiny_pair(tiny_model_dir):
    return load_base(str(tiny_model_dir))


def test_outputs_have_the_alpaca_eval_format(tmp_path, tiny_pair):
    model, tok = tiny_pair
    records = load_instructions(str(instruction_file(tmp_path / "in.json")), offset=1, limit=5)
    assert [r["index"] for r in records] == [1, 2, 3, 4, 5]
    rows = generate_outputs(model, tok, records, tmp_path / "out.json", "tiny", batch_size=2,
                            max_new_tokens=3, log=lambda *a: None)
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved == rows and len(saved) == 5
    for row, rec in zip(saved, records):
        assert set(row) == KEYS and all(isinstance(v, str) for v in row.values())
        assert (row["instruction"], row["dataset"], row["generator"]) == (rec["instruction"], rec["dataset"], "tiny")
    meta = json.loads(sidecar_paths(tmp_path / "out.json")[1].read_text())
    assert meta["complete"] and meta["decoding"]["max_new_tokens"] == 3 and meta["decoding"]["do_sample"] is False


def test_interrupted_generation_resumes_without_duplicates_or_gaps(tmp_path, tiny_pair, monkeypatch):
    model, tok = tiny_pair
    records = load_instructions(str(instruction_file(tmp_path / "in.json")))
    kwargs = dict(batch_size=2, max_new_tokens=4, log=lambda *a: None)
    expected = generate_outputs(model, tok, records, tmp_path / "whole.json", "tiny", **kwargs)

    real, calls = csreft.generation.generate_texts, []

    def crash_on_third_batch(*args, **kw):
        calls.append(len(args[2]))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(csreft.generation, "generate_texts", crash_on_third_batch)
    out = tmp_path / "out.json"
    with pytest.raises(KeyboardInterrupt):
        generate_outputs(model, tok, records, out, "tiny", **kwargs)
    partial = json.loads(out.read_text())
    assert [r["instruction"] for r in partial] == [r["instruction"] for r in records[:4]]
    progress = sidecar_paths(out)[0]
    with progress.open("a") as f:  # a line cut short by the interruption
        f.write('{"index": 4, "instruction": "count the le')
    calls.clear()
    rows = generate_outputs(model, tok, records, out, "tiny", **kwargs)
    assert calls == [2, 1]  # only instructions 4..6 were generated again
    assert rows == expected == json.loads(out.read_text())
    lines = [json.loads(x) for x in progress.read_text().splitlines()]
    assert sorted(x["index"] for x in lines) == list(range(7))
    with pytest.raises(ValueError, match="other settings"):
        generate_outputs(model, tok, records, out, "tiny", batch_size=2, max_new_tokens=5, log=lambda *a: None)


def test_generate_eval_command(tmp_path, tiny_model_dir, capsys):
    src = instruction_file(tmp_path / "in.json")
    out = tmp_path / "o" / "out.json"
    args = ["generate-eval", "--instructions", str(src), "--output", str(out), "--model", str(tiny_model_dir),
            "--max-new-tokens", "2", "--offset", "2", "--limit", "3", "--generator", "g"]
    main(args)
    rows = json.loads(out.read_text())
    assert [r["instruction"] for r in rows] == [f"count the letters {i}" for i in (2, 3, 4)]
    with pytest.raises(SystemExit, match="other settings"):
        main(args[:-2] + ["--generator", "other"])


def test_win_rate_and_standard_error():
    r = win_rate([1.0, 0.0, 0.5, 1.0])
    assert (r["wins"], r["ties"], r["losses"], r["win_rate"]) == (2, 1, 1, 62.5)
    sd = math.sqrt(sum((s - 0.625) ** 2 for s in [1.0, 0.0, 0.5, 1.0]) / 3)
    assert r["standard_error"] == pytest.approx(100 * sd / 2, abs=0.01)


def test_judge_is_order_symmetric():
    tok, model = tiny_tokenizer(), tiny_llama(seed=3, vocab=len(tiny_tokenizer()))
    a = [{"instruction": f"reverse the word {w}", "output": w[::-1], "dataset": d, "generator": "a"}
         for w, d in [("abc", "x"), ("word", "x"), ("letters", "y"), ("count", "y"), ("upper", "y")]]
    b = [dict(r, output=r["output"].upper() + " 0123", generator="b") for r in a]
    ab = judge_pairwise(model, tok, a, b, margin=0.002, batch_size=3)
    ba = judge_pairwise(model, tok, b, a, margin=0.002, batch_size=3)
    for x, y in zip(ab["annotations"], ba["annotations"]):
        assert x["preference"] == pytest.approx(1 - y["preference"], abs=1e-4)
    assert ab["overall"]["win_rate"] == pytest.approx(100 - ba["overall"]["win_rate"])
    assert (ab["overall"]["wins"], ab["overall"]["ties"]) == (ba["overall"]["losses"], ba["overall"]["ties"])
    for name in ("x", "y"):
        assert ab["per_dataset"][name]["win_rate"] == pytest.approx(100 - ba["per_dataset"][name]["win_rate"])
    assert ab["overall"]["n"] == 5 and set(ab["per_dataset"]) == {"x", "y"}


def test_judge_needs_every_instruction_in_the_reference():
    tok, model = tiny_tokenizer(), tiny_llama(vocab=len(tiny_tokenizer()))
    with pytest.raises(ValueError, match="not in the reference"):
        judge_pairwise(model, tok, [{"instruction": "x", "output": "y"}], [{"instruction": "z", "output": "y"}])


@pytest.mark.slow
def test_smollm2_judge_prefers_a_good_answer_to_a_garbled_one(smollm2):
    model, tok = smollm2
    good = [{"instruction": q, "output": a, "dataset": "facts"} for q, a in [
        ("What is the capital of France?", "The capital of France is Paris."),
        ("Name three primary colours.", "Red, yellow and blue are the three primary colours."),
        ("How many days are there in a week?", "There are seven days in a week."),
        ("Translate 'thank you' into French.", "'Thank you' in French is 'merci'."),
    ]]
    garbled = [dict(g, output="zx qv blorp 7 kk ;; !! wmf trr") for g in good]
    report = judge_pairwise(model, tok, good, garbled, margin=0.01)
    print("\nSmolLM2 judge, good vs garbled:", [a["preference"] for a in report["annotations"]],
          f"position bias {report['position_bias']}")
    assert all(a["preference"] > 0.5 for a in report["annotations"])
    assert report["overall"]["win_rate"] == 100.0
    assert judge_pairwise(model, tok, garbled, good, margin=0.01)["overall"]["win_rate"] == 0.0


def test_response_nll_is_token_weighted_and_identity_edits_change_nothing(tiny_pair):
    model, tok = tiny_pair
    records = [{"prompt": f"reverse the word {w}", "response": w[::-1] * (i + 1)}
               for i, w in enumerate(["abc", "letters", "word"])]
    base = response_nll(model, tok, records, batch_size=2)
    from csreft.data import encode_example

    total = count = 0.0
    with torch.no_grad():
        for r in records:
            e = encode_example(tok, r["prompt"], r["response"])
            logits = model(torch.tensor([e["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(e["labels"][1:])
            keep = labels != -100
            total += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            count += int(keep.sum())
    assert base["tokens"] == count and base["nll"] == pytest.approx(total / count, abs=1e-4)
    assert base["perplexity"] == pytest.approx(math.exp(base["nll"]), rel=1e-3)
    fresh = get_csreft_model(model, CSReftConfig(layers=[1, 2], rank=2, num_subspaces=2, positions="f3+l3"))
    assert response_nll(fresh, tok, records, batch_size=3)["nll"] == pytest.approx(base["nll"], abs=1e-4)
    fresh.remove_hooks()


def test_alpaca_eval_split_is_fixed_and_disjoint(tmp_path, monkeypatch):
    src = instruction_file(tmp_path / "src.json", n=20)
    one = split_alpaca_eval(tmp_path / "a", str(src), train_size=15, seed=0)
    two = split_alpaca_eval(tmp_path / "b", str(src), train_size=15, seed=0)
    assert one == {**two, "source": one["source"]}
    assert sorted(one["train_indices"] + one["heldout_indices"]) == list(range(20))
    train = json.loads((tmp_path / "a" / "train.json").read_text())
    heldout = json.loads((tmp_path / "a" / "heldout.json").read_text())
    assert (len(train), len(heldout)) == (15, 5) and set(heldout[0]) == KEYS
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in heldout}
    monkeypatch.setenv("CSREFT_DATA", str(tmp_path / "data"))
    assert data_root() == tmp_path / "data"
    with pytest.raises(FileNotFoundError, match="CSREFT_DATA"):
        split_alpaca_eval(tmp_path / "c")


def test_ultrafeedback_record_keeps_the_best_rated_completion():
    def completion(text, fine, overall, ratings=None):
        c = {"response": text, "fine-grained_score": fine, "overall_score": overall}
        if ratings:
            c["annotations"] = {k: {"Rating": v} for k, v in ratings.items()}
        return c

    record = {"source": "evol_instruct", "instruction": "Explain gravity.", "completions": [
        completion("short", 3.0, 9.0), completion(" best by ratings ", 4.5, 6.0), completion("", 5.0, 10.0)]}
    assert ultrafeedback_best(record) == {"prompt": "Explain gravity.", "response": "best by ratings",
                                          "source": "evol_instruct"}
    assert ultrafeedback_best(record, score="overall_score")["response"] == "short"
    no_scores = {"instruction": "Q", "completions": [
        completion("a", None, None, {"helpfulness": "2", "honesty": "N/A"}),
        completion("b", None, None, {"helpfulness": "5", "honesty": "4"})]}
    assert ultrafeedback_best(no_scores)["response"] == "b"
    assert ultrafeedback_best({"instruction": "Q", "completions": []}) is None


def test_paper_config_parameter_count_for_llama2_7b(capsys, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    opts = read_options_file(str(CONFIGS / "paper-llama2-7b.yaml"))
    config = config_from_options(opts)
    assert (config.num_subspaces, config.rank, config.layers, config.positions) == (4, 4, [3, 9, 18, 24], "f7+l7")
    assert config.use_router and config.router_hidden is None and opts["model"] == "meta-llama/Llama-2-7b-hf"
    shape = dict(opts["base_shape"])
    with torch.device("meta"):  # no weights
        model = get_csreft_model(AutoModelForCausalLM.from_config(AutoConfig.for_model(shape.pop("model_type"), **shape)),
                                 config)
    c = model.trainable_parameters()
    with capsys.disabled():  # shown with pytest -s
        print(f"\nLlama-2-7B, paper config: edits {c['edits']:,} ({100 * c['edits'] / c['base']:.4f}%), "
              f"router {c['router']:,} ({100 * c['router'] / c['base']:.4f}%), total {c['total']:,} "
              f"({c['percent']:.4f}%) of {c['base']:,}")
    assert (c["edits"], c["router"], c["base"]) == (524_352, 8_398_852, 6_738_415_616)

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(AutoConfig, "from_pretrained", offline)
    main(["info", "--config", str(CONFIGS / "paper-llama2-7b.yaml")])
    out = capsys.readouterr().out
    assert "524,352" in out and "8,398,852" in out and "0.0078%" in out and "0.1324%" in out
    assert "base model: meta-llama/Llama-2-7b-hf" in out  # the file's model, not the default


def test_train_reads_the_recipes_and_ignores_base_shape(monkeypatch):
    import csreft.training.recipe

    seen = []
    monkeypatch.setattr(csreft.training.recipe, "run", lambda opts: seen.append(opts))
    main(["train", "--config", str(CONFIGS / "paper-llama2-7b.yaml")])
    main(["train", "--config", str(CONFIGS / "smollm2-alpaca-cpu.yaml"), "--num-subspaces", "1", "--rank", "16",
          "--no-use-router"])
    paper, cpu = seen
    assert "base_shape" not in paper and paper["bf16"] and paper["gradient_checkpointing"]
    assert (cpu["num_subspaces"], cpu["rank"], cpu["use_router"]) == (1, 16, False)
    for opts in seen:
        config_from_options(opts)
        assert set(opts) <= set(TRAINING_FIELDS) | set(CSReftConfig.__dataclass_fields__)


def test_judge_and_nll_commands_write_reports(tmp_path, tiny_model_dir):
    src = instruction_file(tmp_path / "ref.json", n=4)
    records = json.loads(src.read_text())
    records[1]["output"] = ""  # AlpacaEval has empty references: skipped and counted by the NLL
    src.write_text(json.dumps(records))
    outputs = tmp_path / "out.json"
    outputs.write_text(json.dumps([dict(r, output="abc", generator="sys") for r in records]))
    main(["judge", "--outputs", str(outputs), "--reference", str(src), "--judge-model", str(tiny_model_dir),
          "--report", str(tmp_path / "judge.json")])
    report = json.loads((tmp_path / "judge.json").read_text())
    assert report["overall"]["n"] == 4 and set(report["per_dataset"]) == {"even", "odd"}
    assert report["generator"] == "sys" and len(report["annotations"]) == 4
    main(["response-nll", "--data", str(src), "--model", str(tiny_model_dir), "--report", str(tmp_path / "nll.json")])
    nll = json.loads((tmp_path / "nll.json").read_text())
    assert nll["without_reference"] == 1 and nll["examples"] == 3 and nll["nll"] > 0


def test_every_command_that_loads_an_adapter_takes_a_hub_repo_and_refuses_batch_size_0(
        tmp_path, tiny_model_dir, monkeypatch, capsys):
    """One loading path for every command: `org/name` goes through csreft.hub.resolve_adapter
    (stubbed here to a local folder) in generate, eval, generate-eval and response-nll alike."""
    import csreft.hub
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_csreft_model(base, CSReftConfig(layers=[1], rank=2, num_subspaces=1, use_router=False))
    model.save_pretrained(tmp_path / "adapter")  # its base_model names tiny_model_dir
    local = csreft.hub.resolve_adapter
    asked = []
    monkeypatch.setattr(csreft.hub, "resolve_adapter", lambda name, *a, **k: asked.append(name) or local(
        tmp_path / "adapter" if name == "org/name" else name, *a, **k))
    src = instruction_file(tmp_path / "in.json", n=2)
    main(["generate", "--adapter", "org/name", "--prompt", "hi", "--max-new-tokens", "2"])
    main(["generate-eval", "--adapter", "org/name", "--instructions", str(src), "--output", str(tmp_path / "o.json"),
          "--max-new-tokens", "2"])
    main(["response-nll", "--adapter", "org/name", "--data", str(src)])
    assert asked.count("org/name") == 6  # each command: the base's name, then the adapter itself
    for command in (["generate", "--prompt", "hi"], ["generate-eval", "--output", "x.json"], ["eval", "--data", "x"],
                    ["response-nll", "--data", "x"], ["judge", "--outputs", "a", "--reference", "b"]):
        with pytest.raises(SystemExit) as exit_:
            main([*command, "--batch-size", "0"])
        assert exit_.value.code == 2 and "0 is not valid: an integer >= 1" in capsys.readouterr().err
