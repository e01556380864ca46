"""Integration tests on the embedded default model, SmolLM2-135M-Instruct (offline)."""

import pytest
import torch

from conftest import randomize_edits
from csreft import CSReftConfig, CSReftModel, get_csreft_model
from csreft.data import encode_example, encode_prompt, pad_batch, template_parts
from csreft.generation import generate_texts

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "List two fruits.", "Say hi.", "Translate 'cat' to French."]


def test_default_model_answers_paris(smollm2):
    model, tokenizer = smollm2
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    answer = generate_texts(model, tokenizer, ["What is the capital of France?"], max_new_tokens=12)[0]
    assert "Paris" in answer


def test_prompt_start_is_the_users_content(smollm2):
    _, tokenizer = smollm2
    for text in ("Hello there", "\nstarts with a newline", "  two spaces"):
        ids, start = encode_prompt(tokenizer, text)
        assert start > 5  # after the default system prompt and the user header
        assert tokenizer.decode(ids[start:]).startswith(text)
        assert tokenizer.decode(ids[:start]).endswith("<|im_start|>user\n")
    # a custom system message moves the start; it is found, not hard-coded
    short, s1 = encode_prompt(tokenizer, "Hi", system="Be brief.")
    _, s2 = encode_prompt(tokenizer, "Hi")
    assert s1 != s2 and tokenizer.decode(short[s1:]).startswith("Hi")


def test_batched_generation_with_edits_equals_single(smollm2):
    base, tokenizer = smollm2
    cfg = CSReftConfig(layers=[3, 9, 18, 24], rank=4, num_subspaces=4, positions="f7+l7")
    model = get_csreft_model(base, cfg)
    try:
        randomize_edits(model, scale=0.02)
        parts = template_parts(tokenizer)
        examples = [encode_example(tokenizer, p, parts=parts) for p in PROMPTS]
        singles = []
        for e in examples:
            b = pad_batch([e], tokenizer.pad_token_id, side="left")
            out = model.generate(b["input_ids"], attention_mask=b["attention_mask"], prompt_starts=b["prompt_starts"],
                                 max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            singles.append(out[0, b["input_ids"].shape[1]:])
        b = pad_batch(examples, tokenizer.pad_token_id, side="left")
        out = model.generate(b["input_ids"], attention_mask=b["attention_mask"], prompt_starts=b["prompt_starts"],
                             max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             output_scores=True, return_dict_in_generate=True)
        width = b["input_ids"].shape[1]
        for i, single in enumerate(singles):
            batched = out.sequences[i, width:width + len(single)]
            for t, (x, y) in enumerate(zip(batched.tolist(), single.tolist())):
                if x != y:  # allowed only at a near-tie between the two tokens
                    scores = out.scores[t][i]
                    assert abs(scores[x] - scores[y]) < 1e-3, (i, t, x, y)
                    break
        base_texts = generate_texts(base, tokenizer, PROMPTS, max_new_tokens=16)
        edited_texts = [tokenizer.decode(s, skip_special_tokens=True).strip() for s in singles]
        assert base_texts != edited_texts  # the edits are really applied during generation
    finally:
        model.remove_hooks()


def test_save_load_round_trip_on_smollm2(smollm2, tmp_path):
    base, tokenizer = smollm2
    model = get_csreft_model(base, CSReftConfig(layers=[3, 9], rank=4, num_subspaces=2))
    try:
        randomize_edits(model, scale=0.02)
        b = pad_batch([encode_example(tokenizer, p) for p in PROMPTS[:2]], tokenizer.pad_token_id)
        with torch.no_grad():
            ref = model(**b).logits
        model.save_pretrained(tmp_path / "adapter")
    finally:
        model.remove_hooks()
    loaded = CSReftModel.from_pretrained(base, tmp_path / "adapter")
    try:
        with torch.no_grad():
            assert torch.equal(loaded(**b).logits, ref)
    finally:
        loaded.remove_hooks()
