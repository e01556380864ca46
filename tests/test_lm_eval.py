"""The `csreft` lm-evaluation-harness model on the tiny model, offline, with a local-JSON task:
scores equal a direct CSReftModel forward, differ from the base, and do not depend on the batch."""

import json
import math

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'csreft[lmeval]'")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import csreft.integrations.lm_eval  # noqa: E402,F401  (registers the model)
from conftest import randomize_edits  # noqa: E402
from csreft import CSReftConfig, CSReftModel, get_csreft_model, load_base  # noqa: E402
from csreft.data import encode_example  # noqa: E402

DOCS = [{"prompt": f"reverse the word {w}", "choices": [w[::-1], w, w.upper()], "label": 0}
        for w in ("abc", "dog", "cat", "sun", "map", "pen")]
TASK = """task: csreft_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("lmeval")
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (root / "tasks").mkdir()
    (root / "tasks" / "csreft_tiny.yaml").write_text(TASK.format(data=root / "docs.jsonl"))
    base, tok = load_base(str(tiny_model_dir))
    model = get_csreft_model(base, CSReftConfig(layers=[1, 2], rank=2, num_subspaces=3, positions="f3+l3"))
    randomize_edits(model, scale=2.0)
    model.save_pretrained(root / "adapter")
    return root, TaskManager(include_path=str(root / "tasks"))


def scores(setup, model="csreft", batch_size=1, chat=False, **args):
    root, tasks = setup
    model_args = ",".join(f"{k}={v}" for k, v in args.items())
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["csreft_tiny"], task_manager=tasks,
                                  batch_size=batch_size, log_samples=True, apply_chat_template=chat,
                                  device="cpu", verbosity="ERROR")
    samples = sorted(out["samples"]["csreft_tiny"], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples], samples


def direct(tiny_model_dir, adapter, contexts_and_continuations, starts):
    """Sum of the continuation's log-probabilities from one CSReftModel forward per pair."""
    base, tok = load_base(str(tiny_model_dir))
    model = CSReftModel.from_pretrained(base, adapter)
    out = []
    for (ctx, cont), start in zip(contexts_and_continuations, starts):
        ids = torch.tensor([ctx + cont])[:, :-1]
        logits = model(ids, prompt_starts=[start], prompt_lengths=[len(ctx)]).logits.log_softmax(-1)
        out.append(sum(logits[0, len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
    return out


@pytest.mark.parametrize("chat", [False, True])
def test_scores_equal_a_direct_forward_and_differ_from_the_base(setup, tiny_model_dir, chat):
    root, _ = setup
    args = dict(pretrained=tiny_model_dir, adapter=root / "adapter")
    got, samples = scores(setup, chat=chat, **args)
    lm = csreft.integrations.lm_eval.CSReftLM(**args)
    pairs, starts = [], []
    for s in samples:
        for args_ in s["arguments"]:
            pair = lm._encode_pair(args_[0], args_[1])
            pairs.append(pair)
            starts.append(encode_example(lm.tokenizer, DOCS[s["doc_id"]]["prompt"])["prompt_start"] if chat else 0)
    want = direct(tiny_model_dir, root / "adapter", pairs, starts)
    flat = [x for row in got for x in row]
    assert flat == pytest.approx(want, abs=1e-5)
    if chat:  # the prompt starts after the template's prefix, as in training; 0 would score otherwise
        assert min(starts) > 0
        assert max(abs(a - b) for a, b in zip(flat, direct(tiny_model_dir, root / "adapter", pairs, [0] * len(pairs)))) > 1e-3
    base, _ = scores(setup, model="hf", pretrained=tiny_model_dir)
    if not chat:
        assert max(abs(a - b) for a, b in zip(flat, (x for row in base for x in row))) > 0.1


def test_batch_size_does_not_change_scores(setup, tiny_model_dir):
    root, _ = setup
    one, _ = scores(setup, batch_size=1, pretrained=tiny_model_dir, adapter=root / "adapter")
    four, _ = scores(setup, batch_size=4, pretrained=tiny_model_dir, adapter=root / "adapter")
    for a, b in zip(one, four):
        assert a == pytest.approx(b, abs=1e-5)
    assert all(math.isfinite(x) for row in one for x in row)


def test_empty_context_is_a_clear_error(setup, tiny_model_dir):
    from lm_eval.api.instance import Instance

    root, _ = setup
    lm = csreft.integrations.lm_eval.CSReftLM(pretrained=str(tiny_model_dir), adapter=str(root / "adapter"))
    request = Instance("loglikelihood", doc={}, arguments=("", " abc"), idx=0,
                       metadata=("csreft_tiny", 3, 1))
    with pytest.raises(ValueError, match="empty context"):
        lm.loglikelihood([request])


def test_generation_edits_the_prompt(setup, tiny_model_dir):
    from lm_eval.api.instance import Instance

    root, _ = setup
    lm = csreft.integrations.lm_eval.CSReftLM(pretrained=str(tiny_model_dir), adapter=str(root / "adapter"), batch_size=2)
    prompts = ["reverse the word abc", "count the letters of dog"]
    requests = [Instance("generate_until", doc={}, arguments=(p, {"until": ["\n\n"], "max_gen_toks": 5}), idx=i)
                for i, p in enumerate(prompts)]
    texts = lm.generate_until(requests)
    model = lm.model
    for prompt, text in zip(prompts, texts):
        ids = torch.tensor([lm.tok_encode(prompt)])
        out = model.generate(ids, torch.ones_like(ids), prompt_starts=[0], max_new_tokens=5, do_sample=False,
                             pad_token_id=lm.tokenizer.pad_token_id)
        assert text == lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n\n")[0]


def test_launcher_runs_lm_eval_cli_with_the_model_registered(setup, tiny_model_dir, tmp_path, capsys):
    from csreft.cli import main

    root, _ = setup
    args = ["run", "--model", "csreft", "--model_args", f"pretrained={tiny_model_dir},adapter={root / 'adapter'}",
            "--tasks", "csreft_tiny", "--include_path", str(root / "tasks"), "--device", "cpu", "--batch_size", "2"]
    csreft.integrations.lm_eval.main(args)
    out = capsys.readouterr().out
    assert "csreft_tiny" in out and "acc" in out
    main(["lm-eval", *args])  # the same through `csreft lm-eval`
    assert capsys.readouterr().out.count("csreft_tiny") == out.count("csreft_tiny")
    with pytest.raises(SystemExit):  # lm_eval's own help, not csreft's
        main(["lm-eval", "--help"])
    assert "Language Model Evaluation Harness" in capsys.readouterr().out
