"""Prompt encoding details and the command line, on the tiny model where possible."""


import pytest

from conftest import CharTokenizer, tiny_llama
from csreft import CSReftConfig, get_csreft_model
from csreft.cli import main
from csreft.data import encode_example, pad_batch


def test_plain_format_without_chat_template_masks_the_prompt():
    tok = CharTokenizer(template=False)
    e = encode_example(tok, "ab", "xyz")
    prefix_len = len("~### Instruction:\n")
    assert e["prompt_start"] == prefix_len
    assert e["prompt_length"] == prefix_len + 2 + len("\n\n### Response:\n")
    assert e["labels"][: e["prompt_length"]] == [-100] * e["prompt_length"]
    assert e["labels"][e["prompt_length"]:] == e["input_ids"][e["prompt_length"]:]
    batch = pad_batch([e, encode_example(tok, "abcd", "z")], pad_id=2)
    assert batch["labels"].shape == batch["input_ids"].shape
    assert batch["attention_mask"][0].sum() == len(e["input_ids"])


def test_cli_info_prints_parameter_table(tmp_path, capsys, monkeypatch):
    model_dir = tmp_path / "tiny"
    tiny_llama().save_pretrained(model_dir)
    cfg = tmp_path / "opts.yaml"
    cfg.write_text("rank: 2\nnum_subspaces: 3\nlayers: [1, 2]\n")
    main(["info", "--model", str(model_dir), "--config", str(cfg), "--router-hidden", "16"])
    out = capsys.readouterr().out
    model = get_csreft_model(tiny_llama(), CSReftConfig(layers=[1, 2], rank=2, num_subspaces=3, router_hidden=16))
    counts = model.trainable_parameters()
    assert f"{counts['edits']:,}" in out and f"{counts['router']:,}" in out and f"{counts['total']:,}" in out
    assert '"router_hidden": 16' in out


def test_cli_rejects_bad_options_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit, match="num_subspaces=0"):
        main(["info", "--model", "unused", "--num-subspaces", "0"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("rank: [1,\n")
    with pytest.raises(SystemExit, match="(?s)bad.yaml.*line 2"):
        main(["info", "--config", str(bad)])
