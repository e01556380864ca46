"""A skill library: one CS-ReFT model assembled from separately trained adapters.

Each imported adapter (LoReFT, k = 1, or CS-ReFT with k subspaces, its always-on shared ones
included) becomes subspaces of the composed model that keep their own basis, W and b, so the
composed config has independent bases (orthogonal_subspaces=False). With only adapter i's
gates on, the composed model computes adapter i's edits exactly (the other subspaces add
exact zeros): CSReftModel.from_adapters(...)(x, gates=[0.., g_i, ..0]) == adapter_i(x, gates=g_i).

Compatibility: every adapter must share positions, share_positions and intervention (they
decide where and how all edits act). Different layers are merged: an adapter that does not
edit a layer gets a null edit there (W = R, b = 0 for loreft; 0 for direft). Different ranks
are padded to the largest: the extra directions of a smaller-rank subspace get a null edit, so
its output is unchanged. The base model (hidden size, layer count, model type, vocabulary)
must be the one every adapter was trained on.

Skill names are kept (an adapter without named subspaces gets its folder name, its run's for
RUN/adapter, NAME.i for several subspaces; shared subspaces become NAME.sharedJ). The overlap between the imported
adapters' subspaces is reported as principal angles per edited layer (90 degrees: orthogonal).

The composed model gets a fresh router (router=True, the default): it is untrained, so use
explicit gates/skills, or train it alone with `csreft train --init-adapter DIR --train router`.
router=False composes without a router: every imported edit is then on unless gates say otherwise.

This module holds the library's math and checks on plain tensors; CSReftModel.from_adapters
loads the adapters and assembles the model with it.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

from .config import CSReftConfig
from .gates import subspace_names
from .integrity import adapter_name
from .signatures import stack, unstack

MUST_MATCH = ("positions", "share_positions", "intervention", "edit_generated")
ROUTER_OPTIONS = ("router_input", "router_head", "router_layer", "router_hidden", "gating", "threshold",
                  "top_k", "sparsity_weight", "balance_weight", "routing_loss_weight", "dropout", "routing",
                  "routing_temperature")


def _names(directory: Path, meta: dict, config: CSReftConfig) -> list[str]:
    names = subspace_names(meta.get("metadata") or {}, config.num_subspaces)
    label = adapter_name(directory)  # RUN/adapter -> RUN: two runs' adapters get two names
    if names is None:
        k = config.num_subspaces
        names = [label] if k == 1 else [f"{label}.{i}" for i in range(k)]
    return names + [f"{label}.shared{j}" for j in range(config.shared_subspaces)]


def library_part(directory: Path, model, meta: dict) -> dict:
    """One imported adapter (loaded as `model`, its csreft_config.json read as `meta`): its
    identity, names and, per (layer, group), its bases Q (d, n*r), W, b."""
    with torch.no_grad():
        edits = {(int(layer), g): (e.stacked_basis().detach().clone(), e.weight.detach().clone(),
                                   e.bias.detach().clone())
                 for layer, groups in model.edits.items() for g, e in enumerate(groups)}
    config = model.csreft_config
    return {"dir": directory, "config": config, "identity": meta.get("base_model", {}), "edits": edits,
            "names": _names(directory, meta, config), "metadata": meta.get("metadata") or {},
            "signature": model.signature_table, "signature_info": model.signature_info}


def check_compatible(adapters: list[dict]) -> None:
    first = adapters[0]
    for a in adapters[1:]:
        for key in MUST_MATCH:
            mine, theirs = getattr(a["config"], key), getattr(first["config"], key)
            if mine != theirs:
                raise ValueError(
                    f"{a['dir']}: {key}={mine!r}, but {first['dir']} has {key}={theirs!r}; composed "
                    f"adapters must agree on {', '.join(MUST_MATCH)} (layers and ranks may differ)"
                )
        for key in ("hidden_size", "num_hidden_layers", "model_type", "vocab_size"):
            mine, theirs = a["identity"].get(key), first["identity"].get(key)
            if mine is not None and theirs is not None and mine != theirs:
                raise ValueError(f"{a['dir']} was trained on a base with {key}={mine!r}, "
                                 f"{first['dir']} on one with {key}={theirs!r}: not the same base model")
        if a["identity"].get("name_or_path") != first["identity"].get("name_or_path"):
            warnings.warn(f"{a['dir']} names its base {a['identity'].get('name_or_path')!r}, {first['dir']} "
                          f"names {first['identity'].get('name_or_path')!r}; composing on the given base")
    seen = {}
    for a in adapters:
        for name in a["names"]:
            if name in seen:
                raise ValueError(f"skill name {name!r} is in both {seen[name]} and {a['dir']}; "
                                 "skill names of a library must be unique")
            seen[name] = a["dir"]


def _complete(q: torch.Tensor, width: int, seed: int) -> torch.Tensor:
    """(d, width) orthonormal columns whose first columns are exactly q (d, r; orthonormal)."""
    d, r = q.shape
    g = torch.Generator().manual_seed(seed)
    filler = torch.randn(d, width - r, generator=g, dtype=torch.float64)
    full, _ = torch.linalg.qr(torch.cat([q.detach().cpu().double(), filler], 1))
    return torch.cat([q.detach().cpu(), full[:, r:].to(q.dtype)], 1)


@torch.no_grad()
def fill_subspaces(edit, blocks: list, loreft: bool, seed: int = 0) -> None:
    """Set the independent-basis edit `edit` (k x d x R bases) to the given subspaces.

    blocks[j]: (Q (d, r) orthonormal columns, W (r, d), b (r,)) with r <= R, or None. Subspace
    j then computes exactly that edit: its basis is exactly Q (set_basis), completed to R columns
    by orthonormal directions whose edit is null, like the whole of subspace j where blocks[j]
    is None: W = R (loreft) or 0 (direft), b = 0, so (W - R) h + b is exactly 0."""
    rank = edit.rank
    bases = edit.basis().clone()  # (k, d, R)
    weight, bias = edit.weight.clone(), torch.zeros_like(edit.bias)
    null = torch.ones(len(blocks) * rank, dtype=torch.bool, device=weight.device)
    for j, block in enumerate(blocks):
        if block is not None:
            q, w, b = block
            r = q.shape[1]
            bases[j] = _complete(q, rank, seed + j).to(bases)
            rows = slice(j * rank, j * rank + r)
            weight[rows], bias[rows], null[rows] = w.to(weight), b.to(bias), False
    edit.set_basis(bases)
    weight[null] = edit.stacked_basis().T[null] if loreft else 0.0
    edit.weight.copy_(weight)
    edit.bias.copy_(bias)


def overlap_report(adapters: list[dict]) -> dict:
    """Principal angles between every two adapters' subspaces (all of each adapter's
    subspaces together), per edited layer and position group: cosines of the angles, largest
    first, and the smallest angle in degrees."""
    report = {}
    for key in sorted({k for a in adapters for k in a["edits"]}):
        rows = {}
        for i, a in enumerate(adapters):
            for b in adapters[i + 1:]:
                if key in a["edits"] and key in b["edits"]:
                    qa, qb = a["edits"][key][0].double(), b["edits"][key][0].double()
                    cos = torch.linalg.svdvals(qa.T @ qb).clamp(0, 1)
                    rows[f"{a['label']} | {b['label']}"] = {
                        "min_angle_deg": round(math.degrees(math.acos(float(cos[0]))), 2),
                        "cosines": [round(float(c), 4) for c in cos],
                    }
        if rows:
            report[f"layer {key[0]}" + (f" group {key[1]}" if key[1] else "")] = rows
    return report


def library_config(adapters: list[dict], router: bool = True, **router_options) -> CSReftConfig:
    """The composed config: every adapter's layers, the largest rank, one subspace per skill,
    independent bases; router_options are CSReftConfig router fields for the fresh router."""
    unknown = sorted(set(router_options) - set(ROUTER_OPTIONS))
    if unknown:
        raise ValueError(f"compose: unknown option(s) {unknown}; router options are {', '.join(ROUTER_OPTIONS)}")
    check_compatible(adapters)
    for a in adapters:  # the overlap report's label: the folder name, with its parent where not unique
        unique = sum(b["dir"].name == a["dir"].name for b in adapters) == 1
        a["label"] = a["dir"].name if unique else f"{a['dir'].parent.name}/{a['dir'].name}"
    first = adapters[0]["config"]
    return CSReftConfig(layers=sorted({layer for a in adapters for layer in a["config"].layers}),
                        rank=max(a["config"].rank for a in adapters),
                        num_subspaces=sum(len(a["names"]) for a in adapters), positions=first.positions,
                        share_positions=first.share_positions, intervention=first.intervention,
                        edit_generated=first.edit_generated,
                        orthogonal_subspaces=False, use_router=router, **router_options)


def fill_library(model, adapters: list[dict], seed: int = 0) -> tuple[list, dict]:
    """Set the composed model's edits (built from library_config) to the adapters' subspaces,
    and its skill names and .composition (sources, overlap) for the saved metadata; returns
    the adapters' signatures (see library_signatures)."""
    config = model.csreft_config
    for layer, groups in model.edits.items():
        for g, edit in enumerate(groups):
            blocks = []
            for a in adapters:
                n, r = len(a["names"]), a["config"].rank
                found = a["edits"].get((int(layer), g))
                sites = a["config"].placement_sites()  # a placed subspace is null (not untrained) elsewhere
                blocks += [None if found is None or (sites and s < len(sites) and not (
                               int(layer) in sites[s][0] and g in sites[s][1])) else
                           (found[0][:, s * r:(s + 1) * r], found[1][s * r:(s + 1) * r], found[2][s * r:(s + 1) * r])
                           for s in range(n)]
            fill_subspaces(edit, blocks, config.intervention == "loreft", seed)
    model.skill_names = [n for a in adapters for n in a["names"]]
    model.composition = {
        "skills": model.skill_names,
        "composed_from": [{"adapter": str(a["dir"]), "skills": a["names"], "rank": a["config"].rank,
                           "layers": a["config"].layers, "base_model": a["identity"]} for a in adapters],
        "overlap": overlap_report(adapters),
        "router_trained": False,
    }
    return library_signatures(adapters, model.signature_layer)  # for finish_signatures


def library_signatures(adapters: list[dict], layer: int) -> tuple[list, dict]:
    """Each library subspace's signature (the adapters' rows in library order; None where an
    adapter has none usable) and, per skill without one, why."""
    rows, problems = [], {}
    for a in adapters:
        table, info = a.get("signature"), a.get("signature_info") or {}
        problem = None
        if table is None:
            problem = "has no signatures (saved by an older csreft, imported from pyreft, or trained sharded)"
        elif info.get("layer") != layer:
            problem = f"has signatures read at layer {info.get('layer')}, but the library's router reads layer {layer}"
        elif a["config"].shared_subspaces:
            problem = "has always-on shared subspaces, which signatures cannot route"
        rows += [None] * len(a["names"]) if problem else unstack(table)
        problems.update({name: f"{a['dir']} {problem}" for name in a["names"]} if problem else {})
    return rows, problems


def finish_signatures(model, rows: list, problems: dict, calibrated: dict | None = None) -> None:
    """Set the library's signatures from `rows`, with the skills in `calibrated` (skill name ->
    signature from calibration prompts) replaced; under routing=signatures a skill left without
    one is an error naming its adapter."""
    names = model.skill_names
    rows = [(calibrated or {}).get(name, row) for name, row in zip(names, rows)]
    missing = [name for name, row in zip(names, rows) if row is None]
    if not missing:
        model.set_signatures(stack(rows), {"calibrated": sorted(calibrated or {})})
    elif model.csreft_config.routing == "signatures":
        first = missing[0]
        raise ValueError(f"routing=signatures: {problems.get(first, first + ' has no signature')}; give prompts "
                         f"of skill(s) {', '.join(missing)} in a calibration file (csreft compose --calibration FILE)")


def overlap_lines(composition: dict) -> list[str]:
    """The overlap report as text lines: smallest principal angle per pair and layer."""
    lines = []
    for where, pairs in composition.get("overlap", {}).items():
        for pair, v in pairs.items():
            lines.append(f"{where:<18} {pair:<40} min angle {v['min_angle_deg']:6.2f} deg, "
                         f"cosines {', '.join(f'{c:.3f}' for c in v['cosines'])}")
    return lines
