"""Checks of what a caller hands CSReftModel.forward: a ValueError that names the problem,
instead of a silent clamp, a NaN loss or an ignored keyword."""

from __future__ import annotations

import difflib
import inspect
import typing

import torch

# keyword arguments every transformers causal LM takes, some through decorators that rename
# them (past_key_values -> cache), so not always visible in the forward's signature
COMMON_KWARGS = frozenset({
    "position_ids", "past_key_values", "cache", "cache_position", "use_cache", "inputs_embeds", "token_type_ids",
    "output_attentions", "output_hidden_states", "return_dict", "logits_to_keep", "num_items_in_batch",
})
_accepted: dict[type, frozenset] = {}


def accepted_kwargs(base_model) -> frozenset:
    """Keyword arguments the base model's forward accepts: its named parameters, the keys of
    its typed **kwargs (transformers' TransformersKwargs), and COMMON_KWARGS."""
    cls = type(base_model)
    if cls not in _accepted:
        names = set(COMMON_KWARGS)
        for param in inspect.signature(cls.forward).parameters.values():
            if param.kind is param.VAR_KEYWORD:
                names |= _typed_dict_keys(param.annotation)
            elif param.name != "self":
                names.add(param.name)
        _accepted[cls] = frozenset(names)
    return _accepted[cls]


def _typed_dict_keys(annotation) -> set:
    for arg in (*typing.get_args(annotation), annotation):
        keys = getattr(arg, "__annotations__", None)
        if isinstance(keys, dict) and hasattr(arg, "__total__"):
            return set(keys)
    try:
        from transformers.utils.generic import TransformersKwargs
    except ImportError:
        return set()
    return set(TransformersKwargs.__annotations__)


def check_forward_inputs(base_model, input_ids, attention_mask, labels, kwargs: dict) -> None:
    """Shapes of input_ids / attention_mask / labels, a loss that can exist, known keywords."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a (batch, length) tensor, got {_shape(input_ids)}")
    batch, length = input_ids.shape
    if batch == 0 or length == 0:
        raise ValueError(f"input_ids has shape {(batch, length)}: an empty batch; give at least one token of one row")
    if input_ids.is_floating_point():
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    embeddings = base_model.get_input_embeddings()
    vocab = getattr(embeddings, "num_embeddings", None)
    low, high = (int(x) for x in torch.aminmax(input_ids))
    if low < 0 or (vocab is not None and high >= vocab):
        raise ValueError(f"input_ids holds token id {low if low < 0 else high}, outside the base model's "
                         f"vocabulary 0..{vocab - 1 if vocab else '?'}: a tokenizer of another model?")
    if attention_mask is not None:
        shape = tuple(attention_mask.shape)
        if not (shape == (batch, length) or (len(shape) == 4 and shape[0] == batch and shape[-2:] == (length, length))):
            raise ValueError(f"attention_mask has shape {shape}, input_ids {(batch, length)}: expected "
                             f"{(batch, length)} (or a 4D mask ({batch}, 1, {length}, {length}))")
    if labels is not None:
        if tuple(labels.shape) != (batch, length):
            raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {(batch, length)} like input_ids")
        if not bool((labels[:, 1:] != -100).any()):
            raise ValueError("labels are all -100 (after the first position): no token to compute a loss "
                             "on, the loss would be NaN; label at least one response token")
    unknown = sorted(set(kwargs) - accepted_kwargs(base_model))
    if unknown:
        close = difflib.get_close_matches(unknown[0], [*accepted_kwargs(base_model), "prompt_starts",
                                                       "prompt_lengths", "skill_labels", "attention_mask"], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown keyword argument(s) {unknown} for forward (neither CSReftModel's nor "
                         f"{type(base_model).__name__}'s){hint}")


def check_padding(attention_mask: torch.Tensor, first: torch.Tensor, n_real: torch.Tensor) -> None:
    """Each row is padding, then its n_real tokens from `first` on, then padding (left or right
    padding): prompt positions are counted from the first real token, so a gap inside a row
    would shift them."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    inside = (positions >= first[:, None]) & (positions < (first + n_real)[:, None])
    bad = (inside != attention_mask.bool()).any(1)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(f"attention_mask row {b} has padding between its tokens ({attention_mask[b].tolist()}); "
                         "pad on the left or on the right only")


def check_skill_labels(skill_labels, batch: int, k: int) -> torch.Tensor:
    """Skill labels: one integer per row in [-1, k) (-1: unlabelled), or (batch, k) 0/1 targets
    for rows with several skills (a row of -1: unlabelled)."""
    t = torch.as_tensor(skill_labels)
    if t.dim() == 2 and t.dtype != torch.bool and (t.is_floating_point() or t.shape[1] > 1):  # (B, 1): indices
        t = t.float()
        if tuple(t.shape) != (batch, k):
            raise ValueError(f"skill_labels as targets must have shape ({batch}, {k}), got {_shape(t)}")
        rows_ok = ((t == 0) | (t == 1)).all(-1) | (t == -1).all(-1)
        if not bool(rows_ok.all()):
            raise ValueError("skill_labels targets must be 0 or 1 per subspace (a row of -1: unlabelled)")
        return t
    if t.is_floating_point() or t.dtype == torch.bool or t.reshape(-1).shape != (batch,):
        raise ValueError(f"skill_labels must be {batch} integers (one per row), or ({batch}, {k}) 0/1 targets, "
                         f"got {_shape(t)} {t.dtype}")
    t = t.reshape(-1)
    if bool(((t < -1) | (t >= k)).any()):
        raise ValueError(f"skill_labels holds {t.tolist()}: each must be a subspace index 0..{k - 1}, or -1 "
                         "for an unlabelled row")
    return t


def check_logits_at(logits_at, shape) -> None:
    if not isinstance(logits_at, torch.Tensor) or tuple(logits_at.shape) != tuple(shape) or logits_at.dtype != torch.bool:
        raise ValueError(f"logits_at must be a bool tensor of shape {tuple(shape)} like input_ids, got "
                         f"{_shape(logits_at)}{'' if not isinstance(logits_at, torch.Tensor) else ' ' + str(logits_at.dtype)}")


def check_spans(starts, ends, n_real) -> None:
    """Prompt spans [start, end) counted in each unpadded row: 0 <= start < end <= row length."""
    bad = (starts < 0) | (ends > n_real) | (starts >= ends)
    if not bool(bad.any()):
        return
    b = int(bad.nonzero()[0, 0])
    start, end, n = int(starts[b]), int(ends[b]), int(n_real[b])
    if start < 0:
        raise ValueError(f"example {b}: prompt start {start} is negative; check prompt_starts")
    if end > n:
        raise ValueError(f"example {b}: the prompt span ends at {end}, past the sequence end ({n} tokens); "
                         "check prompt_lengths")
    raise ValueError(f"example {b}: the prompt span is empty (start {start} >= end {end} in the unpadded "
                     "sequence); check prompt_starts and prompt_lengths")


def check_batch_size(batch_size) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is not valid: an integer >= 1")


def _shape(value) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
