"""Data loading and training: formats, masking, errors, learning, resume, DDP, NaN handling."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import tiny_tokenizer
from csreft.cli import main
from csreft.data import DataError, SupervisedDataset, load_records
from csreft.training.recipe import build, fit
from csreft.training.trainer import NonFiniteLossError

SKILLS = {"reverse": lambda w: w[::-1], "double": lambda w: w + w, "first": lambda w: w[0]}
WORDS = ["abc", "dog", "cat", "sun", "map", "pen", "cup", "hat", "box", "fig", "jam", "kit"]


def skill_records():
    return [{"prompt": f"{skill} the word {w}", "response": fn(w), "skill": skill}
            for skill, fn in SKILLS.items() for w in WORDS]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def options(tmp_path, model_dir, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "train.jsonl", skill_records())
    opts = dict(model=str(model_dir), data=str(data), output_dir=str(tmp_path / "out"), layers=[1, 2],
                rank=2, num_subspaces=3, positions="f3+l3", batch_size=6, lr=1e-2, max_steps=12,
                logging_steps=2, seed=0, max_length=64)
    opts.update(overrides)
    return opts


def test_each_format_loads_and_prompt_is_masked(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "Add", "input": "2 and 3", "output": "5"}]))
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "Hi", "response": "Hello", "skill": "greet"}])
    write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "system", "content": "Be terse."},
                                                      {"role": "user", "content": "Hi"},
                                                      {"role": "assistant", "content": "Yo"}]}])
    a, b, c = (load_records(str(tmp_path / n))[0] for n in ("a.json", "b.jsonl", "c.jsonl"))
    assert a == {"prompt": "Add\n\n2 and 3", "response": "5", "skill": None, "system": None}
    assert b["skill"] == "greet" and c["system"] == "Be terse." and c["response"] == "Yo"
    tok = tiny_tokenizer()
    ds = SupervisedDataset([a, b, c], tok, max_length=128, skills=["greet"])
    for e, rec in zip(ds.examples, (a, b, c)):
        n = e["prompt_length"]
        assert e["labels"][:n] == [-100] * n
        assert e["labels"][n:] == e["input_ids"][n:] and len(e["labels"]) > n
        assert tok.decode(e["input_ids"][e["prompt_start"]:]).startswith(rec["prompt"])
        assert tok.decode(e["labels"][n:]).startswith(rec["response"])
    assert [e["skill_label"] for e in ds.examples] == [-1, 0, -1]
    assert ds.examples[2]["prompt_start"] != ds.examples[1]["prompt_start"]  # custom system prompt


def test_truncation_policy_is_counted():
    tok = tiny_tokenizer()
    recs = [{"prompt": "abc", "response": "x" * 200}, {"prompt": "abc " * 100, "response": "y"},
            {"prompt": "abc", "response": "z"}]
    ds = SupervisedDataset(recs, tok, max_length=40)
    assert (ds.truncated, ds.dropped, len(ds)) == (1, 1, 2)
    assert max(len(e["input_ids"]) for e in ds.examples) <= 40


@pytest.mark.parametrize(
    "content,message",
    [
        ('[{"instruction": "x"}]', "record 1: field 'output' is missing"),
        ('[{"prompt": "x", "response": "ok"}, {"prompt": "y", "response": 3}]', "record 2: field 'response' must be a string"),
        ('[{"prompt": "x", "response": "  "}]', "record 1: field 'response' is empty"),
        ('[{"question": "x"}]', "record 1: unknown record format"),
        ('[{"messages": [{"role": "user", "content": "x"}]}]', "record 1: field 'messages'"),
        ('[{"prompt": "x", "response": "y", "skill": 5}]', "field 'skill' must be a string"),
        ('{"prompt": 1', "invalid JSON at line 1"),
    ],
)
def test_bad_records_name_file_record_and_field(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError, match=f"bad.json.*{message}"):
        load_records(str(path))


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{oops\n')
    with pytest.raises(DataError, match="bad.jsonl: line 2: invalid JSON"):
        load_records(str(path))


def test_training_lowers_loss_and_leaves_base_untouched(tmp_path, tiny_model_dir):
    run = build(options(tmp_path, tiny_model_dir, max_steps=30, lr=2e-2, positions="all"))
    base_before = {k: v.clone() for k, v in run.model.base_model.state_dict().items()}
    summary = fit(run)
    assert summary["steps"] == 30
    assert summary["final_loss"] < summary["first_loss"] - 0.15, summary  # a random tiny model starts near ln(320) = 5.77
    for k, v in run.model.base_model.state_dict().items():
        assert torch.equal(v, base_before[k]), k
    out = Path(summary["adapter"])
    assert sorted(p.name for p in out.iterdir()) == ["csreft_config.json", "csreft_model.safetensors"]
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    logged = [r for r in log if "loss" in r]
    assert len(logged) == 15 and {"task_loss", "gate_entropy", "gate_active_frac", "gate_mean_2"} <= set(logged[0])
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["tokens_per_second"] > 0


class CrashAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill")


def test_kill_and_resume_gives_the_same_adapter(tmp_path, tiny_model_dir):
    common = dict(max_steps=9, save_steps=3, save_total_limit=5)
    fit(build(options(tmp_path / "a", tiny_model_dir, **common)))
    with pytest.raises(KeyboardInterrupt):
        fit(build(options(tmp_path / "b", tiny_model_dir, **common), callbacks=[CrashAt(5)]))
    out_b = tmp_path / "b" / "out"
    assert sorted(p.name for p in out_b.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-3"]
    assert not (out_b / "adapter").exists()
    assert {"csreft_model.safetensors", "optimizer.pt", "scheduler.pt"} <= {p.name for p in (out_b / "checkpoint-3").iterdir()}
    fit(build(options(tmp_path / "b", tiny_model_dir, resume="latest", **common)))
    a = load_file(tmp_path / "a" / "out" / "adapter" / "csreft_model.safetensors")
    b = load_file(out_b / "adapter" / "csreft_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6, k


class PoisonAt(TrainerCallback):
    def __init__(self, model, step):
        self.model, self.step = model, step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                self.model.router.mlp[0].weight.fill_(float("nan"))


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, tiny_model_dir):
    run = build(options(tmp_path, tiny_model_dir, max_steps=8, save_steps=2))
    run.trainer.add_callback(PoisonAt(run.model, 2))
    with pytest.raises(NonFiniteLossError, match="step 3.*checkpoint-2"):
        fit(run)
    ckpt = load_file(tmp_path / "out" / "checkpoint-2" / "csreft_model.safetensors")
    assert all(torch.isfinite(t).all() for t in ckpt.values())


def test_skill_routing_moves_gates_to_each_skill(tmp_path, tiny_model_dir):
    run = build(options(tmp_path, tiny_model_dir, skill_routing=True, max_steps=40, lr=2e-2,
                        routing_loss_weight=2.0, router_hidden=32))
    fit(run)
    tok, model = run.tokenizer, run.model
    from csreft.data import pad_batch

    batch = pad_batch(run.train_set.examples, tok.pad_token_id)
    gates = model.route(batch["input_ids"], batch["attention_mask"], batch["prompt_starts"], batch["prompt_lengths"])
    labels = torch.tensor([e["skill_label"] for e in run.train_set.examples])
    for s in range(3):
        mean = gates[labels == s].mean(0)
        others = torch.cat([mean[:s], mean[s + 1:]])
        assert mean[s] > others.max() + 0.2, (s, mean)


def test_cli_train_and_generate_through_adapter(tmp_path, tiny_model_dir, capsys):
    opts = options(tmp_path, tiny_model_dir, max_steps=4)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {opts['model']}\ndata: {opts['data']}\nrank: 2\nnum_subspaces: 3\nlr: 0.01\n"
                   f"max_length: 64\nbatch_size: 6\nlogging_steps: 2\n")
    main(["train", "--config", str(cfg), "--output-dir", opts["output_dir"], "--max-steps", "4",
          "--layers", "1,2", "--positions", "f3+l3"])
    out = capsys.readouterr().out
    assert "training done: 4 steps" in out and "adapter saved to" in out
    meta = json.loads((Path(opts["output_dir"]) / "adapter" / "csreft_config.json").read_text())
    assert meta["csreft_config"]["layers"] == [1, 2] and meta["metadata"]["skills"] == sorted(SKILLS)
    command = meta["metadata"]["training"]["command"]  # for the model card: a command that reruns it
    assert command.startswith("csreft train ") and "--layers 1,2" in command and "--max-steps 4" in command
    main(["generate", "--adapter", str(Path(opts["output_dir"]) / "adapter"), "--prompt", "reverse the word abc",
          "--max-new-tokens", "4"])
    assert capsys.readouterr().out.strip() != ""
    with pytest.raises(SystemExit, match="--resume latest: no checkpoint"):
        main(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "empty"), "--resume"])


def test_two_process_training_keeps_ranks_identical(tmp_path, tiny_model_dir):
    opts = options(tmp_path, tiny_model_dir, max_steps=4, batch_size=3)
    (tmp_path / "opts.json").write_text(json.dumps(opts))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           str(Path(__file__).parent / "ddp_worker.py"), str(tmp_path / "opts.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (load_file(tmp_path / "out" / f"rank{r}.safetensors") for r in (0, 1))
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["examples_seen"] == 4 * 3 * 2


def test_cli_eval_nll_per_skill(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "t.jsonl", skill_records()[:6] + skill_records()[-6:])
    main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--method", "nll",
          "--output", str(tmp_path / "r.json")])
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result["per_skill"]) == {"reverse", "first"} and result["response_nll"] > 0
    assert "NLL/token" in capsys.readouterr().out
    # the overall figure is the token-weighted NLL over all records at once
    from csreft import load_base
    from csreft.data import load_records
    from csreft.evaluation.scoring import response_nll

    model, tok = load_base(str(tiny_model_dir))
    assert result["response_nll"] == pytest.approx(response_nll(model, tok, load_records(str(data)))["nll"], rel=1e-6)
