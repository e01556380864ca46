"""The `csreft` model of lm-evaluation-harness: a base model plus a CS-ReFT adapter.

    csreft lm-eval run --model csreft \\
        --model_args pretrained=HuggingFaceTB/SmolLM2-135M-Instruct,adapter=runs/x/adapter \\
        --tasks hellaswag [--apply_chat_template] [--batch_size 8]

(lm_eval's command line has no plugin hook for models; this launcher registers `csreft`, then
runs lm_eval's own CLI with the same arguments; `python -m csreft.integrations.lm_eval` does the
same. In Python, `import csreft.integrations.lm_eval` is enough
for `lm_eval.simple_evaluate(model="csreft", ...)`.)

Why not plain HFLM around the hooked model: HFLM calls the model with the token ids alone, no
attention mask and no context length, so the edits would not know where the prompt is. Here
every log-likelihood request edits its context (the prompt: from the start of the user's content
to the end of the context) and every generation request its prompt, as csreft.evaluation.scoring and
csreft.generation do. With --apply_chat_template the prompt starts after the template's prefix
(as in training); without, at the first token of the context. `adapter` is a local folder or a
Hub repo id (`adapter_revision=` for a revision); `pretrained` is anything csreft.load_base takes.
"""

from __future__ import annotations

import os
import sys

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..model import CSReftModel


@register_model("csreft")
class CSReftLM(HFLM):
    def __init__(self, pretrained=None, adapter: str | None = None, adapter_revision: str | None = None,
                 dtype: str | None = None, **kwargs):
        if not adapter:
            raise ValueError("csreft: give the adapter in model_args, e.g. pretrained=BASE,adapter=DIR")
        from ..base_models import DEFAULT_MODEL, load_base

        if isinstance(pretrained, (str, os.PathLike)) or pretrained is None:
            kind = None if dtype in (None, "auto") else getattr(torch, str(dtype))
            base, tokenizer = load_base(str(pretrained or DEFAULT_MODEL), dtype=kind)
            kwargs.setdefault("tokenizer", tokenizer)
        else:
            base = pretrained
        kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
        super().__init__(pretrained=base, **kwargs)
        self._model = CSReftModel.from_pretrained(self._model, str(adapter), revision=adapter_revision).eval()
        self._spans: dict[tuple[int, ...], tuple[int, int]] | None = None
        self._prefix_ids: list[int] | None = None

    # -- where the prompt starts -----------------------------------------------------------
    def _content_start(self, context_ids: list[int]) -> int:
        """Index of the user's content in a context's tokens: after the chat template's
        prefix when the context starts with it (--apply_chat_template), else 0."""
        if self._prefix_ids is None:
            self._prefix_ids = []
            if getattr(self.tokenizer, "chat_template", None):
                from ..data import template_parts

                prefix = template_parts(self.tokenizer)[0]
                self._prefix_ids = self.tok_encode(prefix) if prefix else []
        n = len(self._prefix_ids)
        return n if n and context_ids[:n] == self._prefix_ids and len(context_ids) > n else 0

    # -- log-likelihood: each row's context is its prompt ----------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        for request in requests:
            if not request.args[0]:
                raise ValueError(
                    f"csreft: an lm-eval request with an empty context (task {request.task_name!r}, doc "
                    f"{request.doc_id}): the edits apply to the prompt, and this request has none")
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise ValueError("csreft: rolling log-likelihood (perplexity tasks) scores text without a prompt, "
                         "and the edits apply to prompts only; use the base model (--model hf) for those")

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        spans = {}
        for _, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1):][:-1]  # the row lm-eval builds
            cut = len(context) + len(continuation) - 1 - len(whole)  # tokens cut on the left
            end = max(len(context) - cut, 1)
            spans[tuple(whole)] = (min(max(self._content_start(context) - cut, 0), end - 1), end)
        self._spans = spans
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._spans = None

    def _row_span(self, row: list[int], lengths: list[int]) -> tuple[int, int] | None:
        for n in lengths:  # right-padded: the row's own tokens, then padding
            if n <= len(row) and tuple(row[:n]) in self._spans and not any(row[n:]):
                return self._spans[tuple(row[:n])]
        return None

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if self._spans is None or attn_mask is not None:
            return super()._model_call(inps, attn_mask, labels)
        lengths = sorted({len(k) for k in self._spans}, reverse=True)
        starts, ends = [], []
        for row in inps.tolist():
            span = self._row_span(row, lengths)
            # not one of the requests: lm-eval's batch-size probe, whose results are dropped
            start, end = span if span is not None else (0, len(row))
            starts.append(start)
            ends.append(end)
        with torch.no_grad():
            return self.model(inps, prompt_starts=starts, prompt_lengths=ends).logits

    # -- generation: the prompt is the left-padded context -------------------------------------
    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        mask = generation_kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(context)
            generation_kwargs["attention_mask"] = mask
        starts = []
        for row, m in zip(context.tolist(), mask.tolist()):
            real = [t for t, keep in zip(row, m) if keep]
            if not real:
                raise ValueError("csreft: a generation request with an empty context: the edits need a prompt")
            starts.append(self._content_start(real))
        generation_kwargs["prompt_starts"] = starts
        return super()._model_generate(context, max_length, stop, **generation_kwargs)


def main(argv: list[str] | None = None) -> None:
    """lm_eval's command line with the `csreft` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
