"""Scoring: packed label log-likelihood vs a naive per-candidate forward, forced preferences,
response NLL, exact match plumbing, and the paired tests."""

import math

import pytest
import torch
from torch import nn

import csreft.evaluation.scoring as evaluation
from conftest import CharTokenizer, randomize_edits, tiny_llama
from csreft import CSReftConfig, CSReftModel, get_csreft_model
from csreft.data import encode_example, pad_batch
from csreft.evaluation.scoring import (
    candidate_logprobs, evaluate_suite, exact_match_accuracy, response_nll, score_choices,
)
from csreft.evaluation.stats import mcnemar, paired_bootstrap, paired_over_seeds
from csreft.evaluation.suites import Suite, builtin_suite


RECORDS = [
    {"prompt": "Is it good?", "response": "the answer is yes", "skill": "a",
     "choices": ["the answer is yes", "the answer is no", "the answer is maybe"]},
    {"prompt": "pick one", "response": "cat", "skill": "b", "choices": ["cat", "dog"]},
    {"prompt": "a somewhat longer prompt", "response": "a", "skill": "b", "choices": ["a", "ab", "abc", "b"]},
    {"prompt": "x", "response": "same start", "skill": "a", "choices": ["same start", "same stop"]},
]


def csreft_tiny():
    model = get_csreft_model(tiny_llama(), CSReftConfig(layers=[1, 2], rank=2, num_subspaces=3, positions="f3+l3"))
    randomize_edits(model, scale=0.5)
    return model


@torch.no_grad()
def naive_logprobs(model, tok, records):
    """One full forward per (record, choice); sum of log-probs over the labelled tokens."""
    out = []
    for r in records:
        row = []
        for choice in r["choices"]:
            batch = pad_batch([encode_example(tok, r["prompt"], choice)], tok.pad_token_id)
            labels = batch.pop("labels")
            if not isinstance(model, CSReftModel):
                batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
            logp = model(**batch).logits[0, :-1].float().log_softmax(-1)
            targets = labels[0, 1:]
            keep = targets != -100
            row.append(float(logp[keep].gather(1, targets[keep, None]).sum()))
        out.append(row)
    return out


@pytest.mark.parametrize("wrapped", [False, True])
def test_packed_scoring_equals_naive_per_candidate_forward(wrapped):
    tok = CharTokenizer()
    model = csreft_tiny() if wrapped else tiny_llama()
    expected = naive_logprobs(model, tok, RECORDS)
    for packed in (True, False):
        got = candidate_logprobs(model, tok, RECORDS, batch_size=3, packed=packed)
        for g, e in zip(got, expected):
            assert g == pytest.approx(e, abs=1e-3)
    choices = score_choices(model, tok, RECORDS, batch_size=2)
    assert choices == [max(range(len(e)), key=e.__getitem__) for e in expected]


def test_edits_change_the_scores():
    tok = CharTokenizer()
    plain = candidate_logprobs(tiny_llama(), tok, RECORDS)
    edited = candidate_logprobs(csreft_tiny(), tok, RECORDS)
    assert max(abs(a - b) for r, s in zip(edited, plain) for a, b in zip(r, s)) > 1e-3


@pytest.mark.parametrize("family", ["gpt2", "neox"])
def test_packed_equals_unpacked_on_other_families(family):
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    if family == "gpt2":
        base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128)).eval()
    else:
        base = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                intermediate_size=64, vocab_size=128)).eval()
    tok = CharTokenizer()
    packed = candidate_logprobs(base, tok, RECORDS, packed=True)
    for p, e in zip(packed, naive_logprobs(base, tok, RECORDS)):
        assert p == pytest.approx(e, abs=1e-3)


def test_one_forward_per_example_and_head_only_at_response_positions():
    tok = CharTokenizer()
    model = csreft_tiny()
    rows, head_rows = [], []
    h1 = model.base_model.model.embed_tokens.register_forward_hook(lambda m, a, o: rows.append(a[0].shape))
    h2 = model.base_model.lm_head.register_forward_hook(lambda m, a, o: head_rows.append(a[0].shape[0]))
    candidate_logprobs(model, tok, RECORDS, batch_size=8)
    h1.remove(), h2.remove()
    assert len(rows) == 1 and rows[0][0] == len(RECORDS)  # one forward, one row per example
    needed = sum(len(encode_example(tok, r["prompt"], r["choices"][0])["input_ids"])
                 - encode_example(tok, r["prompt"])["prompt_length"] for r in RECORDS)
    assert head_rows[0] < rows[0][0] * rows[0][1] and head_rows[0] >= needed


def biased_head(model, chars, strength=30.0):
    """Replace the LM head by one whose bias strongly favours the ids of `chars`."""
    old = model.lm_head
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        for c in chars:
            head.bias[3 + ord(c) % 100] = strength
    model.lm_head = head
    return model


@pytest.mark.parametrize("wrapped", [False, True])
@pytest.mark.parametrize("favour, expected", [("dog", 1), ("ct", 0)])
def test_label_scoring_picks_the_label_the_model_prefers(wrapped, favour, expected):
    tok = CharTokenizer()
    base = biased_head(tiny_llama(), favour)
    model = base
    if wrapped:
        model = get_csreft_model(base, CSReftConfig(layers=[1], rank=2, num_subspaces=2))
        randomize_edits(model, scale=0.2)
    records = [{"prompt": p, "response": "the answer is cat", "skill": "s",
                "choices": ["the answer is cat", "the answer is dog"]} for p in ("which pet?", "say it")]
    assert score_choices(model, tok, records) == [expected, expected]


def test_ties_go_to_the_first_choice(monkeypatch):
    monkeypatch.setattr(evaluation, "candidate_logprobs", lambda *a, **k: [[-1.0, -1.0], [-2.0, -1.0, -1.0]])
    assert score_choices(None, None, []) == [0, 1]


def test_logits_at_matches_full_logits_and_refuses_labels():
    tok = CharTokenizer()
    model = csreft_tiny()
    batch = pad_batch([encode_example(tok, "abc", "xy"), encode_example(tok, "a longer one", "z")], tok.pad_token_id)
    labels = batch.pop("labels")
    at = labels != -100
    with torch.no_grad():
        full = model(**batch).logits
        part = model(**batch, logits_at=at).logits
    torch.testing.assert_close(part, full[at])
    with pytest.raises(ValueError, match="logits_at and labels"):
        model(**batch, labels=labels, logits_at=at)


def test_response_nll_is_the_token_weighted_loss():
    tok = CharTokenizer()
    model = csreft_tiny()
    records = [{"prompt": "abc", "response": "xy"}, {"prompt": "a longer prompt", "response": "a longer reply"}]
    total, count = 0.0, 0
    with torch.no_grad():
        for r in records:
            batch = pad_batch([encode_example(tok, r["prompt"], r["response"])], tok.pad_token_id)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            count += n
    result = response_nll(model, tok, records, batch_size=2)
    assert result["nll"] == pytest.approx(total / count, rel=1e-4) and result["tokens"] == count
    # max_length as in training: the long record's response is cut, a prompt that fills it is dropped
    short = len(encode_example(tok, "abc", "xy")["input_ids"])
    cut = response_nll(model, tok, records, batch_size=2, max_length=short)
    assert (cut["examples"], cut["truncated"], cut["dropped"]) == (1, 0, 1)
    assert cut["tokens"] == short - len(encode_example(tok, "abc")["input_ids"])
    room = len(encode_example(tok, "a longer prompt")["input_ids"]) + 2
    cut = response_nll(model, tok, records, batch_size=2, max_length=room)
    assert (cut["examples"], cut["truncated"], cut["dropped"]) == (2, 1, 0)


def test_exact_match_and_evaluate_suite_use_the_suite_checker(monkeypatch):
    suite = builtin_suite(train_per_skill=1, test_per_skill=2, composed=3)
    answers = {r["prompt"]: r["answer"] for r in suite.test + suite.composed}
    monkeypatch.setattr(evaluation, "generate_texts",
                        lambda model, tok, prompts, **kw: [answers[p].lower() for p in prompts])
    result = evaluate_suite(None, CharTokenizer(), suite, split="test")
    assert result["method"] == "exact" and result["n"] == 12 and len(result["correct"]) == 12
    # lower-cased answers pass every skill except upper (case-sensitive) and reverse of nothing
    assert result["per_skill"]["upper"]["accuracy"] == 0.0
    assert result["per_skill"]["add"] == {"n": 2, "correct": 2, "accuracy": 1.0}
    per = [v["accuracy"] for v in result["per_skill"].values()]
    assert result["accuracy"] == pytest.approx(sum(per) / len(per))
    assert result["micro_accuracy"] == pytest.approx(sum(result["correct"]) / 12)
    composed = evaluate_suite(None, CharTokenizer(), suite, split="composed")
    assert set(composed["per_skill"]) == {"reverse+upper", "sentiment+upper", "sort+reverse"}
    assert composed["per_skill"]["sort+reverse"]["accuracy"] == 1.0
    assert composed["per_skill"]["reverse+upper"]["accuracy"] == 0.0
    out = exact_match_accuracy(None, CharTokenizer(), suite.test, suite.check)
    assert out["accuracy"] == result["micro_accuracy"] and out["outputs"][0] == answers[suite.test[0]["prompt"]].lower()


def test_evaluate_suite_runs_generation_and_label_scoring_on_a_tiny_model():
    tok = CharTokenizer()
    model = csreft_tiny()
    suite = builtin_suite(train_per_skill=1, test_per_skill=1, composed=0)
    result = evaluate_suite(model, tok, suite, max_new_tokens=3)
    assert result["n"] == 6 and set(result["per_skill"]) == set(suite.skills) and result["seconds"] > 0
    assert all(isinstance(p, str) for p in result["predictions"])
    labelled = builtin_suite(train_per_skill=0, test_per_skill=4, composed=0)
    sentiment = Suite("s", ["sentiment"], [], [r for r in labelled.test if r["skill"] == "sentiment"])
    result = evaluate_suite(model, tok, sentiment, method="label", with_nll=True)
    assert all(p in ("positive", "negative") for p in result["predictions"])
    assert result["response_nll"] > 0
    with pytest.raises(ValueError, match="no 'choices'"):
        evaluate_suite(model, tok, labelled, method="label")


def test_mcnemar():
    assert mcnemar([1, 0, 1], [1, 0, 1]) == 1.0
    assert mcnemar([True] * 10, [False] * 10) == pytest.approx(2 / 2**10)
    a = [1] * 10 + [0] * 2 + [1] * 5
    b = [0] * 10 + [1] * 2 + [1] * 5
    assert mcnemar(a, b) == pytest.approx(2 * (1 + 12 + 66) / 2**12)  # n01=10, n10=2
    assert mcnemar(a, b) == mcnemar(b, a)
    a = [1] * 40 + [0] * 20
    b = [0] * 40 + [1] * 20
    assert mcnemar(a, b) == pytest.approx(math.erfc(math.sqrt(19**2 / 60 / 2)))  # chi-square, n = 60
    assert abs(mcnemar(a, b, exact=True) - mcnemar(a, b)) < 0.01
    with pytest.raises(ValueError, match="equal"):
        mcnemar([1, 0], [1])


def test_paired_bootstrap():
    assert paired_bootstrap([1, 0, 1], [1, 0, 1], n=200) == (0.0, 0.0, 0.0)
    assert paired_bootstrap([1] * 5, [0] * 5, n=200) == (1.0, 1.0, 1.0)
    g = torch.Generator().manual_seed(3)
    a = (torch.rand(200, generator=g) < 0.7).tolist()
    b = (torch.rand(200, generator=g) < 0.5).tolist()
    mean, lo, hi = paired_bootstrap(a, b, n=2000, seed=1)
    assert mean == pytest.approx((sum(a) - sum(b)) / 200)
    assert lo < mean < hi and hi - lo < 0.3
    assert paired_bootstrap(a, b, n=2000, seed=1) == (mean, lo, hi)
    assert paired_bootstrap(a, b, n=2000, seed=2) != (mean, lo, hi)


def test_paired_over_seeds_counts_each_record_once():
    a = [1] * 10 + [0] * 2 + [1] * 5
    b = [0] * 10 + [1] * 2 + [1] * 5
    one = paired_over_seeds([a], [b])
    assert (one["n"], one["seeds"], one["test"]) == (17, 1, "mcnemar") and one["p"] == mcnemar(a, b)
    assert [one["accuracy_difference"], *one["ci95"]] == list(paired_bootstrap(a, b))
    # three seeds that agree on every record hold no more evidence than one: the same CI (pooling
    # them as 51 independent records would narrow it), and the sign-flip p is McNemar's exact p
    three = paired_over_seeds([a] * 3, [b] * 3)
    assert three["ci95"] == one["ci95"] and three["per_seed"] == [8 / 17] * 3
    assert three["test"] == "sign-flip" and three["p"] == pytest.approx(2 * (1 + 12 + 66) / 2**12, abs=0.015)
    # seeds that disagree: a record's difference is its mean over the seeds
    mixed = paired_over_seeds([[1, 1, 0, None], [1, 0, 0, 1]], [[0, 1, 0, 1], [0, 1, 1, 1]])
    assert mixed["n"] == 3 and mixed["accuracy_difference"] == pytest.approx((1 + -0.5 + -0.5) / 3)
    assert mixed["per_seed"] == pytest.approx([1 / 3, -1 / 3])
    assert paired_over_seeds([[1, 0]] * 2, [[1, 0]] * 2)["p"] == 1.0  # no difference at all
    with pytest.raises(ValueError, match="same records"):
        paired_over_seeds([[1, 0], [1]], [[1, 0], [1, 0]])
    with pytest.raises(ValueError, match="equal, nonzero"):
        paired_over_seeds([[1]], [[1], [0]])
    with pytest.raises(ValueError, match="no record"):
        paired_over_seeds([[None]], [[1]])


@pytest.mark.slow
def test_packed_scoring_matches_unpacked_on_smollm2(smollm2):
    model, tok = smollm2
    suite = builtin_suite(train_per_skill=0, test_per_skill=6, composed=0)
    records = [r for r in suite.test if r.get("choices")] + [
        {"prompt": "Which is a fruit?\n\nAnswer format: answer1/answer2/answer3", "skill": "x",
         "response": "the correct answer is answer2",
         "choices": [f"the correct answer is answer{i}" for i in (1, 2, 3)]},
    ]
    packed = candidate_logprobs(model, tok, records, packed=True)
    plain = candidate_logprobs(model, tok, records, packed=False)
    for p, q in zip(packed, plain):
        assert p == pytest.approx(q, abs=2e-3)
