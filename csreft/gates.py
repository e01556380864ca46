"""Explicit gates: choose a request's subspaces by value or by skill name, per row or per batch.

`forward`, `generate` and `route` of a CSReftModel take either

    gates   numbers, (B, k) one row per example or (k,) / (1, k) for the whole batch, used in
            place of the router's output for that call (no router runs; models without a
            router take them too). Any finite value is allowed: 1 applies a subspace's edit as
            trained, 0 leaves it out, a negative gate subtracts it (removes a skill) and a gate
            above 1 amplifies it. (B, L, k) or (1, L, k) give each of the L edited layers its
            own gates (per-layer weights, e.g. fitted for a composition);
    skills  names from the adapter's skill list that turn exactly those subspaces on (gate 1,
            all others 0): "sort,upper" for the whole batch, or one entry per example, each a
            comma-separated string or a list of names ("" or [] = no routed subspace).

Always-on shared subspaces (config.shared_subspaces) stay on whatever the gates. Rows are
independent, so one batch may serve different skills to different examples.

Which subspace a skill name means: an adapter trained with --skill-routing (or --train-gates
skills) learned skill i in subspace i (its metadata's `skills`, sorted); a composed adapter lists its imported skills in
order; a one-subspace adapter (LoReFT) trained on one skill is that skill. Other adapters'
subspaces have no names; give them numeric gates.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def subspace_names(metadata: dict, num_subspaces: int) -> list[str] | None:
    """Skill name of each routed subspace from an adapter's metadata, or None when the
    subspaces are not tied to skills (unsupervised routing)."""
    skills = [str(s) for s in (metadata or {}).get("skills") or []]
    meta = metadata or {}
    if meta.get("skill_routing") or meta.get("composed_from") or meta.get("train_gates") == "skills":
        return skills[:num_subspaces] + [f"subspace{i}" for i in range(len(skills), num_subspaces)]
    if num_subspaces == 1 and len(skills) == 1:
        return skills
    return None


def _names_of(row) -> list[str]:
    if isinstance(row, str):
        return [s.strip() for s in row.split(",") if s.strip()]
    if isinstance(row, (list, tuple)) and all(isinstance(s, str) for s in row):
        return [s.strip() for s in row if s.strip()]
    raise ValueError(f"skills entry {row!r}: expected a comma-separated string or a list of names")


def skill_gates(skills, names: list[str] | None, batch: int) -> torch.Tensor:
    """(rows, k) 0/1 gates for skill names; rows is 1 (whole batch) or `batch`."""
    if names is None:
        raise ValueError(
            "skills=... needs an adapter whose subspaces are named by skills (trained with "
            "--skill-routing, composed, or a one-skill LoReFT); this one's are not: pass gates instead"
        )
    rows = [skills] if isinstance(skills, str) else list(skills)
    if len(rows) not in (1, batch):
        raise ValueError(
            f"skills has {len(rows)} entries for a batch of {batch}: give one entry per example, "
            "or one string such as 'sort,upper' for the whole batch"
        )
    out = torch.zeros(len(rows), len(names))
    for i, row in enumerate(rows):
        for name in _names_of(row):
            if name not in names:
                raise ValueError(f"unknown skill {name!r}; this adapter's skills: {', '.join(names)}")
            out[i, names.index(name)] = 1.0
    return out


MAX_GATE = 1e3  # beyond this an explicit gate only overflows the hidden states


def resolve_gates(gates, skills, names: list[str] | None, k: int, batch: int, layers: int | None = None) -> torch.Tensor:
    """The (batch, k), or per-layer (batch, layers, k), float32 gates given by `gates` or
    `skills` (exactly one of them). A gates tensor that requires grad keeps its graph."""
    if gates is not None and skills is not None:
        raise ValueError("give gates or skills, not both")
    if skills is not None:
        gates = skill_gates(skills, names, batch)
    t = gates.float() if isinstance(gates, torch.Tensor) else torch.tensor(gates, dtype=torch.float32)
    if t.dim() == 1:
        t = t[None]
    per_layer = t.dim() == 3 and layers is not None and t.shape[1] == layers
    if not (t.dim() == 2 or per_layer) or t.shape[-1] != k or t.shape[0] not in (1, batch):
        also = f", or ({batch}, {layers}, {k}) per edited layer" if layers is not None else ""
        raise ValueError(
            f"gates has shape {tuple(t.shape)}: expected ({batch}, {k}) (one row per example) or "
            f"({k},) (one row for the whole batch){also}; this model has k = {k} routed subspaces"
        )
    if not bool(torch.isfinite(t).all()):
        raise ValueError("gates must be finite numbers")
    if t.abs().max() > MAX_GATE:  # the edits would overflow the hidden states (NaN logits)
        raise ValueError(f"gates must be between -{MAX_GATE:g} and {MAX_GATE:g} (got {t.abs().max().item():g}): "
                         "a gate scales its edit; 1 applies it fully")
    return t.expand(batch, *t.shape[1:])


@contextmanager
def steering(model, gates=None, skills=None):
    """Within the block, every call of `model` that gets no gates/skills of its own uses these
    (one row for any batch): e.g. to score a composition with csreft.evaluation.scoring functions.

        with steering(model, skills="reverse,upper"):
            evaluate_suite(model, tokenizer, suite, records=composed)
    """
    row = resolve_gates(gates, skills, model.skill_names, model.csreft_config.num_subspaces, 1,
                        len(model.csreft_config.layers))
    previous, model.default_gates = model.default_gates, row
    try:
        yield model
    finally:
        model.default_gates = previous


def parse_gate_list(text: str) -> list[float]:
    """"0,1,-0.5" -> [0.0, 1.0, -0.5] (the CLI's --gates)."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--gates {text!r}: expected comma-separated numbers such as 0,1,0,0") from None
