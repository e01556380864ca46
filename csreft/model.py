"""CSReftModel: a frozen causal LM with routed subspace edits attached by forward hooks.

Per forward pass:
  1. positions: for each example b the prompt is tokens [start_b, end_b) of the padded row
     (left or right padding); each position group takes its first/last positions there;
  2. a pre-hook on the router's layer (default: the first edited one) reads that layer's input
     hidden states, summarises the prompt (see Router.summarise) and runs the router once:
     gates (B, k); always-on shared subspaces get gate 1. A router that reads a layer above
     the first edited one needs the unedited hidden states there: a first pass (no gradient
     through the base) runs the base up to that layer and stops;
  3. a forward hook on every edited layer gathers the hidden states at the group's positions
     (B, P, d), adds the gated edits, and scatters them back; other positions are untouched.
During generate(), edits apply to the prompt in the prefill pass only; decoding steps find no
active context and cost what the base model costs. With edit_generated, the response is edited
too: in a full-sequence pass its positions join the last position group, and each decoding
step adds that group's gated edit to the new token, so generating computes what training saw.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from . import compose
from .base_models import find_decoder_layers, model_identity
from .checks import check_forward_inputs, check_logits_at, check_padding, check_skill_labels, check_spans
from .config import CSReftConfig
from .edits import SubspaceEdits
from .gates import resolve_gates, subspace_names
from .integrity import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_files, atomic_directory, basis_form,
                        check_against, check_orthonormal, check_replaceable, is_training_form, read_adapter_config,
                        read_weights, write_file, write_weights)
from .router import Router, balance_loss, routing_loss, sparsity_loss
from .signatures import LibraryRouter, check_table, prompt_summary, prototypes, signatures_of, unstack

SIGNATURE_PREFIX = "signature."


@dataclass
class CSReftOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    gates: torch.Tensor | None = None  # (B, k) gates the edits used
    probs: torch.Tensor | None = None  # (B, k) router sigmoid outputs
    task_loss: torch.Tensor | None = None
    sparsity_loss: torch.Tensor | None = None
    routing_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None
    token_losses: torch.Tensor | None = None  # (N,) per labelled token, full_logits=False only


def edit_positions(segments, starts, ends, seq_len):
    """Positions of one group: idx (B, P) clamped into [0, seq_len), valid (B, P) bool.

    segments: [("f", n)] first n of [start, end); [("l", n)] last n; [("all", 0)] all of them.
    In a shared group ("f", n1), ("l", n2), last positions already among the first n1 are
    dropped, so every position is edited at most once per group.
    """
    starts, ends = starts[:, None], ends[:, None]
    idx, valid, first_n = [], [], 0
    for kind, n in segments:
        if kind == "l":
            i = ends - n + torch.arange(n, device=starts.device)
            v = i >= starts + first_n
        else:
            n = seq_len if kind == "all" else n
            i = starts + torch.arange(n, device=starts.device)
            v = i < ends
            first_n = n
        idx.append(i)
        valid.append(v)
    return torch.cat(idx, 1).clamp(0, seq_len - 1), torch.cat(valid, 1)


class _Context:
    """Positions and gates of the forward pass in flight, shared with the hooks."""

    def __init__(self, groups, starts, ends, seq_len, once=False, route_only=False):
        self.groups, self.starts, self.ends, self.seq_len = groups, starts, ends, seq_len
        self.once, self.route_only = once, route_only
        self.gates = self.probs = self.router_hidden = self.summary = None
        self.keep_hidden = self.summary_only = self.decoding = False
        self._on_device = {}

    def on(self, device, shared: int = 0):
        """(groups, edit gates) on `device`, the edit gates being the k routed gates then
        `shared` ones; copied at most once per device (device_map models)."""
        if device not in self._on_device:
            groups = [(i.to(device, non_blocking=True), v.to(device, non_blocking=True)) for i, v in self.groups]
            gates = self.gates.to(device, non_blocking=True)
            if shared:
                gates = torch.cat([gates, gates.new_ones(*gates.shape[:-1], shared)], -1)
            self._on_device[device] = (groups, gates)
        return self._on_device[device]


def numel(p: torch.Tensor) -> int:
    """Number of values of a parameter, whole even where ZeRO-3 has partitioned it (`ds_numel`;
    a DTensor's numel() is already the global one)."""
    return int(getattr(p, "ds_numel", p.numel()))


def _checkpointing(model: nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on, under either transformers name (the
    new one first: through a PEFT model's attribute forwarding the old one warns)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        value = getattr(model, name, None)
        if value is not None:
            return bool(value)
    return False


class _StopForward(Exception):
    """Raised by the router hook when only the gates are wanted (route())."""


def _hidden_from(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


class CSReftModel(nn.Module):
    """Frozen base causal LM + k routed subspace edits. Build it with get_csreft_model()."""

    def __init__(self, base_model: nn.Module, config: CSReftConfig) -> None:
        super().__init__()
        layers = find_decoder_layers(base_model)
        identity = model_identity(base_model)
        d = identity["hidden_size"]
        config.validate(hidden_size=d, num_layers=len(layers))
        self.base_model = base_model
        self.csreft_config = config
        for p in base_model.parameters():
            p.requires_grad_(False)

        def device_of(module):
            return next(module.parameters()).device

        self.edits = nn.ModuleDict()
        for layer in config.layers:
            groups = nn.ModuleList(
                SubspaceEdits(
                    d, config.rank, config.total_subspaces, config.intervention,
                    config.orthogonal_subspaces, config.dropout,
                )
                for _ in config.position_groups
            )
            self.edits[str(layer)] = groups.to(device_of(layers[layer]))
        # placement: per layer, a (groups, k + shared) 0/1 mask of the sites each subspace edits
        self._layer_index = {str(layer): i for i, layer in enumerate(config.layers)}
        self._site_mask: dict[str, torch.Tensor] = {}
        sites = config.placement_sites()
        if sites is not None:
            for layer in config.layers:
                mask = torch.ones(len(config.position_groups), config.total_subspaces)
                for i, (at_layers, at_groups) in enumerate(sites):
                    mask[:, i] = 0.0
                    if layer in at_layers:
                        mask[at_groups, i] = 1.0
                self._site_mask[str(layer)] = mask.to(device_of(layers[layer]))
        self.router = None
        router_layer = config.router_reads()
        if config.use_router and config.routing != "learned":
            self.router = LibraryRouter(config.routing, config.routing_temperature, config.top_k)
        elif config.use_router:
            try:
                self.router = Router(
                    d, config.router_width(d), config.num_subspaces, config.gating,
                    config.threshold, config.top_k, config.router_input, config.router_head,
                ).to(device_of(layers[router_layer]))
            except (RuntimeError, MemoryError) as err:  # e.g. router_hidden=10**12
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise ValueError(f"router_hidden={config.router_width(d)}: a router of that width cannot be "
                                 f"allocated ({first[:160]}); a few hundred is plenty") from None
        if isinstance(self.router, Router) and config.router_init == "kmeans-fixed":
            self.router.requires_grad_(False)  # set from the prompts' clusters before training, then kept
        # a router above the first edited layer reads it in a first, unedited pass
        self._route_first = config.use_router and router_layer > config.layers[0]
        self._ctx: _Context | None = None
        self._recompute_ctx: _Context | None = None
        self.skill_names: list[str] | None = None  # skill of each routed subspace (csreft.gates)
        self.default_gates: torch.Tensor | None = None  # set by csreft.gates.steering
        self.adapter_metadata: dict = {}  # the metadata of the adapter loaded (skills, training run)
        # per routed subspace, where its skill's prompts lie at signature_layer (csreft.signatures):
        # saved as `signature.*` tensors; routing="signatures" gates by them
        self.signature_table: dict[str, torch.Tensor] | None = None
        self.signature_info: dict | None = None
        self._hooks = [
            layers[router_layer if config.use_router else config.layers[0]].register_forward_pre_hook(
                self._route_hook, with_kwargs=True),
            base_model.register_forward_hook(self._end_of_forward_hook),
        ]
        for layer in config.layers:
            # a bound method (not a closure), so that a deep copy of the model edits with its own edits
            hook = functools.partial(self._edit_hook, str(layer))
            self._hooks.append(layers[layer].register_forward_hook(hook))

    # -- hooks ------------------------------------------------------------------------------
    def _current(self, hidden) -> _Context | None:
        """The context that applies to this layer call, if any.

        Outside forward() only a gradient-checkpointing recomputation (grad enabled) may
        still use the last training pass's context; any other call runs the plain base.
        """
        ctx = self._ctx or (self._recompute_ctx if torch.is_grad_enabled() else None)
        if ctx is not None and ctx.decoding:  # generate() with edit_generated, after the prefill
            return ctx
        return ctx if ctx is not None and hidden.shape[1] == ctx.seq_len else None

    def _route_hook(self, module, args, kwargs):
        hidden = _hidden_from(args, kwargs)
        ctx = self._current(hidden)
        if ctx is not None and ctx.summary_only:
            starts, ends = ctx.starts.to(hidden.device), ctx.ends.to(hidden.device)
            ctx.summary = (self.router.summarise(hidden, starts, ends) if ctx.summary_only == "router"
                           else prompt_summary(hidden, starts, ends))
            raise _StopForward
        if ctx is None or ctx.gates is not None:
            return None
        if self.router is None:
            ctx.gates = ctx.probs = hidden.new_ones(hidden.shape[0], self.csreft_config.num_subspaces)
        elif ctx.keep_hidden:
            ctx.router_hidden = hidden  # the first pass of forward(): routed outside, with gradient
        else:
            self._run_router(hidden, ctx)
        if ctx.route_only:
            raise _StopForward
        return None

    def _run_router(self, hidden, ctx) -> None:
        starts, ends = ctx.starts.to(hidden.device), ctx.ends.to(hidden.device)
        if isinstance(self.router, LibraryRouter):
            ctx.gates, ctx.probs = self.router(hidden, starts, ends, self.routing_table())
        else:
            ctx.gates, ctx.probs = self.router(hidden, starts, ends)

    @property
    def signature_layer(self) -> int:
        """The layer whose input prompt summaries (signatures, routing) are read at."""
        c = self.csreft_config
        return c.router_reads() if c.use_router else c.layers[0]

    def routing_table(self):
        """What a library router scores against: the signature table, or the prototypes of the
        edits at the router's layer (a subspace that does not edit it: at its lowest edited layer)."""
        if self.csreft_config.routing == "signatures":
            if self.signature_table is None:
                raise ValueError("routing=signatures, but this model has no signatures: compose adapters saved "
                                 "by csreft train, or give a calibration file (csreft compose --calibration)")
            return self.signature_table
        found = None
        for layer in sorted(self.edits, key=lambda l: (int(l) != self.signature_layer, int(l))):
            edit, k = self.edits[layer][0], self.csreft_config.num_subspaces
            q = edit.stacked_basis().reshape(edit.hidden_size, -1, edit.rank).permute(1, 0, 2)
            p = prototypes(q[:k], edit.weight[: k * edit.rank])
            found = p if found is None else torch.where(found.abs().sum(-1, keepdim=True) > 0, found, p)
        return found

    @torch.no_grad()
    def prompt_summaries(self, input_ids, attention_mask=None, prompt_starts=None, prompt_lengths=None,
                         of: str = "signature") -> torch.Tensor:
        """(B, d) summaries of the prompts at signature_layer (the unedited hidden states there):
        a signature's (csreft.signatures.prompt_summary), or of="router" what the learned router
        reads (Router.summarise); runs the base only up to that layer."""
        if of not in ("signature", "router") or (of == "router" and not isinstance(self.router, Router)):
            raise ValueError(f"of={of!r}: 'signature', or 'router' for a model with a learned router")
        ctx = self._context(input_ids, attention_mask, prompt_starts, prompt_lengths, None, route_only=True)
        ctx.summary_only = of
        return self._up_to_router(ctx, input_ids, attention_mask).summary

    def _up_to_router(self, ctx, input_ids, attention_mask) -> _Context:
        """Run the base on `ctx` (route_only) until the router's hook stops it; returns ctx."""
        self._ctx = ctx
        try:
            self.base_model(input_ids=input_ids, attention_mask=attention_mask)
        except _StopForward:
            pass
        finally:
            self._ctx = None
        return ctx

    def _route_before(self, ctx, input_ids, attention_mask) -> None:
        """Fill ctx.gates from a first pass of the base (no edits, no gradient through the
        base) that stops at the router's layer; the router itself keeps its gradient."""
        ctx.route_only, ctx.keep_hidden = True, True
        try:
            with torch.no_grad():
                self.base_model(input_ids=input_ids, attention_mask=attention_mask)
        except _StopForward:
            pass
        finally:
            ctx.route_only, ctx.keep_hidden = False, False
        self._run_router(ctx.router_hidden, ctx)
        ctx.router_hidden = None

    def _edit_hook(self, layer: str, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        ctx = self._current(hidden)
        if ctx is None or ctx.gates is None:  # not edited, or the routing pass below the router
            return None
        groups, gates = ctx.on(hidden.device, self.csreft_config.shared_subspaces)
        if gates.dim() == 3:  # per-layer gates (B, layers, k)
            gates = gates[:, self._layer_index[layer]]
        mask = self._site_mask.get(layer)
        if ctx.decoding:  # a generated token: the last position group's edit, as on the response in training
            if hidden.shape[1] != 1:
                raise RuntimeError("edit_generated decodes one token per step: generate with use_cache=True")
            here = gates if mask is None else gates * mask[-1]
            hidden = hidden + self.edits[layer][-1](hidden, here[:, None, :], delta_only=True)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        for g, (edit, (idx, valid)) in enumerate(zip(self.edits[layer], groups)):
            index = idx[..., None].expand(-1, -1, hidden.shape[-1])
            here = gates if mask is None else gates * mask[g]
            # gates (B, P, k): the sequence's gates at valid positions, 0 at padding ones
            delta = edit(hidden.gather(1, index), here[:, None, :] * valid[..., None], delta_only=True)
            hidden = hidden.scatter_add(1, index, delta)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def _end_of_forward_hook(self, module, args, output):
        if self._ctx is not None and self._ctx.once:  # generate(): the prompt (prefill) pass is done
            if self.csreft_config.edit_generated and self._ctx.gates is not None:
                self._ctx.decoding = True  # the generated tokens are edited too, one per step
            else:
                self._ctx = None

    # -- positions --------------------------------------------------------------------------
    def _context(self, input_ids, attention_mask, prompt_starts, prompt_lengths, labels, **kw):
        """Absolute prompt spans [start, end) per row from padding and the optional offsets.

        prompt_starts / prompt_lengths index the unpadded sequence; without prompt_lengths the
        prompt ends at the first labelled token (labels != -100) or at the last real token.
        """
        batch, seq_len = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        offset = attention_mask.long().argmax(1)  # first real token (left padding)
        n_real = attention_mask.long().sum(1)
        check_padding(attention_mask, offset, n_real)  # forward, route and generate alike
        starts = offset + self._as_tensor(prompt_starts, batch, device, "prompt_starts", 0)
        if prompt_lengths is not None:
            ends = offset + self._as_tensor(prompt_lengths, batch, device, "prompt_lengths", 0)
        elif labels is not None:
            has = labels != -100
            ends = torch.where(has.any(1), has.long().argmax(1), offset + n_real)
        else:
            ends = offset + n_real
        check_spans(starts - offset, ends - offset, n_real)  # no clamping of a span out of range
        groups = [edit_positions(seg, starts, ends, seq_len) for seg in self.csreft_config.position_groups]
        if self.csreft_config.edit_generated:  # the response after the prompt: the last group's edit
            idx, valid = groups[-1]
            response = ends[:, None] + torch.arange(seq_len, device=device)
            groups[-1] = (torch.cat([idx, response.clamp(0, seq_len - 1)], 1),
                          torch.cat([valid, response < (offset + n_real)[:, None]], 1))
        return _Context(groups, starts, ends, seq_len, **kw)

    @staticmethod
    def _as_tensor(value, batch, device, name, default):
        if value is None:
            return torch.full((batch,), default, dtype=torch.long, device=device)
        t = torch.as_tensor(value)
        if t.is_floating_point() and not bool((t == t.round()).all()):
            raise ValueError(f"{name} must be whole token counts, got {t.tolist()}")
        t = t.to(device=device, dtype=torch.long).reshape(-1)
        if t.numel() != batch:
            raise ValueError(f"{name} has {t.numel()} entries for a batch of {batch}")
        return t

    # -- public API -------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        prompt_starts=None,
        prompt_lengths=None,
        skill_labels: torch.Tensor | None = None,
        full_logits: bool = True,
        logits_at: torch.Tensor | None = None,
        gates=None,
        skills=None,
        **kwargs,
    ) -> CSReftOutput:
        """Edited forward pass. labels (B, L) as in transformers (-100 = ignore, unshifted).

        loss = task cross-entropy + sparsity_weight * Omega(probs)
               + routing_loss_weight * BCE(probs, skill_labels) (when skill_labels given).
        full_logits=False (training): the LM head runs only where labels are set, .logits is
        None and .token_losses holds each labelled token's loss (row-major order).
        logits_at (B, L) bool (scoring): the LM head runs only there; .logits is (N, V),
        N = logits_at.sum(), rows in row-major (b, position) order; no loss (labels must be None).
        A 4D attention_mask (B, 1, L, L) goes to the base as is (e.g. several candidate
        responses packed after one prompt); prompt spans then count from each row's start
        (rows right-padded), so pass prompt_lengths.
        gates (B, k) or (k,), or per edited layer (B, layers, k) / skills (names) replace the
        router for this call (csreft.gates); no router loss is computed then and .probs is None.
        """
        if logits_at is not None and labels is not None:
            raise ValueError("logits_at and labels cannot be combined: logits_at computes no loss")
        check_forward_inputs(self.base_model, input_ids, attention_mask, labels, kwargs)
        if logits_at is not None:
            check_logits_at(logits_at, input_ids.shape)
        if skill_labels is not None:
            skill_labels = check_skill_labels(skill_labels, input_ids.shape[0], self.csreft_config.num_subspaces)
        padding = attention_mask if attention_mask is None or attention_mask.dim() == 2 else None
        self._ctx = self._context(input_ids, padding, prompt_starts, prompt_lengths, labels)
        self._ctx.gates = self._explicit_gates(gates, skills, input_ids)
        try:
            if self._route_first and self._ctx.gates is None:
                self._route_before(self._ctx, input_ids, attention_mask)
            logits, token_losses = self._logits(input_ids, attention_mask, labels, full_logits, logits_at, kwargs)
        finally:
            ctx, self._ctx = self._ctx, None
        # Where a checkpointed layer's recomputation runs its hooks again, it needs this pass's
        # context during backward (transformers 5.24 checkpoints `forward` only and runs hooks once).
        self._recompute_ctx = ctx if torch.is_grad_enabled() and _checkpointing(self.base_model) else None
        task = None
        if token_losses is not None:
            task = token_losses.mean()
        elif labels is not None:
            task = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        out = CSReftOutput(logits=logits, gates=ctx.gates, probs=ctx.probs, task_loss=task,
                           token_losses=token_losses)
        if task is not None:
            out.loss = task
            if isinstance(self.router, Router) and ctx.probs is not None:  # a library router learns nothing
                cfg = self.csreft_config
                out.sparsity_loss = sparsity_loss(ctx.probs)
                out.balance_loss = balance_loss(ctx.probs)
                out.loss = out.loss + cfg.sparsity_weight * out.sparsity_loss + cfg.balance_weight * out.balance_loss
                if skill_labels is not None:
                    labels_on = torch.as_tensor(skill_labels, device=ctx.probs.device)
                    out.routing_loss = routing_loss(ctx.probs, labels_on)
                    out.loss = out.loss + cfg.routing_loss_weight * out.routing_loss
        return out

    def _logits(self, input_ids, attention_mask, labels, full_logits, logits_at, kwargs):
        """(logits, token_losses) of the base run: full logits, or the LM head applied only at
        `logits_at` (logits (N, V)) or at the labelled tokens (token_losses (N,), no logits)."""
        if logits_at is None and (labels is None or full_logits):
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits, None
        hidden = self.base_model.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, **kwargs
        ).last_hidden_state
        head = self.base_model.get_output_embeddings()
        if logits_at is not None:
            return head(hidden[logits_at.to(hidden.device)]), None
        targets = labels[:, 1:]
        keep = targets != -100
        return None, F.cross_entropy(head(hidden[:, :-1][keep]).float(), targets[keep], reduction="none")

    @torch.no_grad()
    def route(self, input_ids, attention_mask=None, prompt_starts=None, prompt_lengths=None, gates=None, skills=None):
        """Gates (B, k) for a batch of prompts; runs the base only up to the first edited layer.
        With gates or skills: those gates (B, k), nothing runs."""
        explicit = self._explicit_gates(gates, skills, input_ids)
        if explicit is not None:
            return explicit
        ctx = self._context(input_ids, attention_mask, prompt_starts, prompt_lengths, None, route_only=True)
        return self._up_to_router(ctx, input_ids, attention_mask).gates

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, prompt_starts=None, gates=None, skills=None,
                 **generate_kwargs):
        """Generate with the edits applied to the prompt during prefill (batch may be left-padded).

        prompt_starts index each unpadded row (default 0); the prompt ends at the row's end.
        gates / skills: as in forward (per row or for the whole batch).
        """
        self._ctx = self._context(input_ids, attention_mask, prompt_starts, None, None, once=True)
        self._ctx.gates = self._explicit_gates(gates, skills, input_ids)
        edits = [e for group in self.edits.values() for e in group]
        try:
            for e in edits:  # no parameter changes during generation: each basis is computed once
                e.keep_basis = True
            if self._route_first and self._ctx.gates is None:
                self._route_before(self._ctx, input_ids, attention_mask)
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        finally:
            self._ctx = None
            for e in edits:
                e.keep_basis, e._kept = False, None

    def _explicit_gates(self, gates, skills, input_ids) -> torch.Tensor | None:
        """(B, k) or per-layer (B, layers, k) gates that replace the router for this call, or
        None (see csreft.gates)."""
        if gates is None and skills is None:
            gates = self.default_gates
            if gates is None:
                return None
        k = self.csreft_config.num_subspaces
        return resolve_gates(gates, skills, self.skill_names, k, input_ids.shape[0],
                             len(self.csreft_config.layers)).to(input_ids.device)

    def trainable_parameters(self) -> dict:
        """Counts of trainable numbers: edits, router, total, and percent of the base model."""
        edits = sum(numel(p) for p in self.edits.parameters() if p.requires_grad)  # frozen: --train router
        router = sum(numel(p) for p in self.router.parameters() if p.requires_grad) if self.router is not None else 0
        base = sum(numel(p) for p in self.base_model.parameters())  # whole sizes under ZeRO-3 too
        return {
            "edits": edits,
            "router": router,
            "total": edits + router,
            "base": base,
            "percent": 100.0 * (edits + router) / base,
        }

    def print_trainable_parameters(self) -> None:
        c = self.trainable_parameters()
        print(
            f"trainable: {c['total']:,} (edits {c['edits']:,}, router {c['router']:,}) | "
            f"base: {c['base']:,} | {c['percent']:.4f}%"
        )

    def adapter_state_dict(self, training: bool = False) -> dict[str, torch.Tensor]:
        """Edits and router only (no base weights), each edit's basis as Q (`edits.L.g.basis`);
        training=True: the tensors training moves instead (reflectors and anchor), which a
        checkpoint needs to resume bit for bit (see csreft.integrity)."""
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("base_model.")}
        return state if training else basis_form(state)

    def _signature_state(self) -> dict[str, torch.Tensor]:
        table = self.signature_table or {}
        return {f"{SIGNATURE_PREFIX}{k}": v for k, v in table.items()}

    def set_signatures(self, table: dict[str, torch.Tensor] | None, info: dict | None = None) -> None:
        """Attach signatures (csreft.signatures: one row per routed subspace, read at
        signature_layer), checked; None removes them."""
        if table is None:
            self.signature_table = self.signature_info = None
        else:
            self.signature_table, self.signature_info = self._checked_signatures(table, info)

    def _checked_signatures(self, table: dict, info: dict | None) -> tuple[dict, dict]:
        d = model_identity(self.base_model)["hidden_size"]
        check_table(table, self.csreft_config.num_subspaces, d, "signatures")
        info = dict(info or {})
        if info.get("layer", self.signature_layer) != self.signature_layer:
            raise ValueError(f"signatures read at layer {info['layer']}, but this adapter's router reads layer "
                             f"{self.signature_layer}; compute them again (csreft compose --calibration FILE)")
        return ({k: v.detach().float().cpu() for k, v in table.items()},
                {**info, "layer": self.signature_layer, "summary": "mean", "hidden_size": d})

    def save_pretrained(self, directory: str | os.PathLike, metadata: dict | None = None, state=None,
                        overwrite: bool = False) -> None:
        """Write csreft_model.safetensors + csreft_config.json, atomically (temp dir + rename).

        `metadata` (JSON-serialisable, e.g. the skill names) is stored in csreft_config.json.
        `state`: the adapter tensors to write (gathered by a sharded engine), else this model's.
        The directory is replaced as a whole: one that holds anything but an adapter is refused
        unless `overwrite` (a training run's never); a symbolic link is written through.
        """
        check_replaceable(directory, overwrite)
        atomic_directory(directory, lambda tmp: self.write_adapter(tmp, metadata, state))

    def write_adapter(self, directory: str | os.PathLike, metadata: dict | None = None, state=None,
                      training: bool = False) -> None:
        """Write the adapter files into an existing directory (not atomic by itself); the
        config records the sha256 of the weights file. `state` in either form (default: this
        model's); written in basis form, or as is with training=True (a checkpoint)."""
        # signatures are not module state (engines neither shard nor gather them): added here
        state = {**(self.adapter_state_dict(training=True) if state is None else state), **self._signature_state()}
        state = {k: v.detach().cpu().contiguous() for k, v in (state if training else basis_form(state)).items()}
        meta = {
            "csreft_config": self.csreft_config.to_dict(),
            "base_model": model_identity(self.base_model),
            "metadata": metadata or {},
            **({"signature": self.signature_info} if self.signature_table is not None else {}),
            "weights_sha256": write_weights(Path(directory) / ADAPTER_WEIGHTS, state),
        }
        write_file(Path(directory) / ADAPTER_CONFIG, json.dumps(meta, indent=2, sort_keys=True).encode())

    def load_adapter_weights(self, directory: str | os.PathLike) -> None:
        """Load adapter tensors saved by write_adapter into this model, after checking them:
        the checksum (adapters saved before checksums: none), names, shapes, kinds of dtype,
        finite values and orthonormal bases. Any of the three forms of the bases is read (Q, a
        checkpoint's reflectors, format 1's parametrisation). On a failure nothing is loaded."""
        meta = read_adapter_config(directory)
        state = read_weights(directory, meta.get("weights_sha256"))
        weights = adapter_files(directory)[1]
        table = {k[len(SIGNATURE_PREFIX):]: state.pop(k) for k in list(state) if k.startswith(SIGNATURE_PREFIX)}
        if table:
            try:
                table, info = self._checked_signatures(table, meta.get("signature"))
            except ValueError as err:
                raise ValueError(f"{weights}: {err}") from None
        elif self.csreft_config.routing == "signatures":
            raise ValueError(f"{weights}: routing=signatures, but the file holds no signature tensors")
        if is_training_form(state):  # a checkpoint: loaded as is, so a resume continues exactly
            check_against(state, self.adapter_state_dict(training=True), weights)
        else:
            state = basis_form(state)  # format 1's bases, read as Q
            check_against(state, self.adapter_state_dict(), weights)
            check_orthonormal(state, weights)
        self.load_state_dict(state, strict=False)  # Q becomes the edit's anchor, exactly
        if table:
            self.signature_table, self.signature_info = table, info

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory: str | os.PathLike, revision: str | None = None,
                        token=None, cache_dir=None) -> "CSReftModel":
        """Attach a saved adapter to `base_model`: a local folder, or a Hub repo id ("org/name",
        at `revision`; only the adapter files are downloaded, see csreft.hub). Checks the base
        identity and verifies the weights (see load_adapter_weights)."""
        from .hub import resolve_adapter

        directory = resolve_adapter(directory, revision, token, cache_dir)
        meta = read_adapter_config(directory)
        config_file, weights = adapter_files(directory)
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: missing; is {directory} a csreft adapter directory?")
        if config_file.name != ADAPTER_CONFIG:  # PEFT's names: Hugging Face tools take it for a PEFT adapter
            warnings.warn(f"{directory}: an adapter saved under the earlier file names ({config_file.name}, "
                          f"{weights.name}), which Hugging Face tools mistake for a PEFT adapter and fail on; "
                          f"rename them to {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}, or save it again")
        try:
            config = CSReftConfig.from_dict(meta["csreft_config"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{config_file}: not a valid csreft adapter config: {err}") from err
        saved, here = meta.get("base_model"), model_identity(base_model)
        if not isinstance(saved, dict):
            saved = {}
        for key in ("hidden_size", "num_hidden_layers"):
            if saved.get(key) is not None and saved[key] != here[key]:
                raise ValueError(
                    f"{directory}: adapter was trained on a base with {key}={saved[key]}, "
                    f"but this base model has {key}={here[key]}"
                )
        for key in ("model_type", "vocab_size"):
            if saved.get(key) is not None and saved[key] != here[key]:
                warnings.warn(f"{directory}: adapter base {key}={saved[key]!r}, this base has {here[key]!r}")
        try:
            model = cls(base_model, config)
        except ValueError as err:  # e.g. layers beyond this base's depth
            raise ValueError(f"{config_file}: {err}") from err
        try:
            model.load_adapter_weights(directory)
        except Exception:
            model.remove_hooks()  # leave the base as it was
            raise
        model.skill_names = subspace_names(meta.get("metadata") or {}, config.num_subspaces)
        model.adapter_metadata = meta.get("metadata") or {}
        return model.eval()

    def push_to_hub(self, repo_id: str, metadata: dict | None = None, private: bool | None = None, token=None,
                    revision: str | None = None, commit_message: str | None = None) -> str:
        """Upload this adapter (never the base weights) and a model card to the Hub repo
        `repo_id`, created if needed; returns the commit URL. `metadata` as in save_pretrained
        (default: what the adapter was loaded or trained with)."""
        from .hub import push_model

        if metadata is None:
            metadata = self.adapter_metadata or ({"skills": self.skill_names, "skill_routing": True}
                                                 if self.skill_names else {})
        return push_model(self, repo_id, metadata, private=private, token=token, revision=revision,
                          commit_message=commit_message)

    @classmethod
    def from_adapters(cls, base_model: nn.Module, directories, router: bool = True, seed: int = 0,
                      calibration: list[dict] | None = None, **router_options) -> "CSReftModel":
        """One model from separately trained adapters, each imported as subspaces of its own (a
        skill library, see csreft.compose): with only adapter i's gates on it computes adapter
        i's edits exactly. `router`: a fresh (untrained) router, or none; router_options:
        CSReftConfig router fields for it (router_input, gating, ...); routing="signatures" or
        "prototypes" routes without training (csreft.signatures). The library keeps the
        adapters' signatures; `calibration`: encoded prompts (csreft.data.encode_example) with a
        "skill" (a library skill name) whose signatures replace or supply those skills'. The
        result carries .skill_names and .composition (sources, overlap): save it with
        save_pretrained(dir, metadata=model.composition)."""
        directories = [Path(d) for d in directories]
        if not directories:
            raise ValueError("give at least one adapter directory to compose")
        parts = []
        for directory in directories:
            part = cls.from_pretrained(base_model, directory)  # checks files, shapes and the base
            try:
                parts.append(compose.library_part(directory, part, read_adapter_config(directory)))
            finally:
                part.remove_hooks()
        config = compose.library_config(parts, router, **router_options)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(base_model, config)
        rows, problems = compose.fill_library(model, parts, seed)
        calibrated = None
        if calibration:
            unknown = sorted({e["skill"] for e in calibration} - set(model.skill_names))
            if unknown:
                raise ValueError(f"calibration prompts of skill(s) {unknown}, which the library does not have; "
                                 f"its skills: {', '.join(model.skill_names)}")
            skills = sorted({e["skill"] for e in calibration}, key=model.skill_names.index)
            table = signatures_of(model, calibration, [skills.index(e["skill"]) for e in calibration],
                                  subspaces=len(skills))
            calibrated = dict(zip(skills, unstack(table)))
        compose.finish_signatures(model, rows, problems, calibrated)
        return model.eval()

    def remove_hooks(self) -> nn.Module:
        """Detach the edits and return the untouched base model."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return self.base_model

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            if _acts_on_base_weights(name):
                raise AttributeError(
                    f"CSReftModel has no {name!r}: the base model's would save, upload or swap the base "
                    f"weights, not this adapter; call model.base_model.{name} if that is what you want") from None
            return getattr(self.base_model, name)  # config, device, dtype, ... of the base


# the base model's methods that save, upload or swap weights: never reached through CSReftModel
_BASE_ONLY_PREFIXES = ("push", "save", "upload", "create_repo", "load_adapter", "add_adapter", "set_adapter",
                       "delete_adapter", "enable_adapter", "disable_adapter", "get_adapter_state_dict",
                       "merge_and_unload")


def _acts_on_base_weights(name: str) -> bool:
    return name.lstrip("_").startswith(_BASE_ONLY_PREFIXES) or "hub" in name.lower()


def get_csreft_model(base_model: nn.Module, config: CSReftConfig) -> CSReftModel:
    """Freeze `base_model` and attach k routed subspace edits as described by `config`."""
    return CSReftModel(base_model, config)
