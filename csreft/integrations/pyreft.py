"""Import a LoReFT model saved by pyreft (ReftModel.save, i.e. pyvene's IntervenableModel.save).

What pyreft writes into its directory:
  config.json       the IntervenableConfig: "representations", one per intervention, each a list
                    in RepresentationConfig order (layer, component, unit, max_number_of_units,
                    low_rank_dimension, intervention_type, intervention, ...) or a dict;
                    "intervention_types", str(type(intervention)) per intervention, e.g.
                    "<class 'pyreft.interventions.LoreftIntervention'>"; "sorted_keys", the
                    intervention keys "layer_<L>_comp_<component>_unit_<unit>_nunit_<n>#<i>".
  intkey_<key>.bin  torch.save of each intervention's state dict; LoReFT and DiReFT hold
                    "rotate_layer" (d x r, orthonormal columns: R = its transpose) and the
                    learned_source Linear's "weight" (r x d) and "bias" (r).
pyreft's LoReFT computes h + R^T (W h + b - R h), csreft's loreft edit exactly (DiReFT:
h + R^T (W h + b), csreft's direft); the activation is assumed linear (pyreft's default; it is
not saved). Files are read with torch.load(weights_only=True): tensors only, never arbitrary
pickled objects.

Positions are not in the checkpoint (pyreft's training script chooses them): pass them
(default f7+l7, pyreft's LoReFT recipe). One intervention per layer shares its weights over
first and last positions; two per layer (pyreft's share_weights=False) are, as in its recipe,
key #0 for the first positions and #1 for the last ones. pyreft counts positions from the
first token of the templated sequence: call the converted model with prompt_starts=0 to edit
the same tokens (csreft's own helpers count from the user's content). For prompts shorter than
first + last positions pyreft clamps each to half the prompt; csreft edits the first ones and
the last ones not already edited.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..base_models import model_identity
from ..config import CSReftConfig
from ..compose import fill_subspaces
from ..model import CSReftModel

FIELDS = ("layer", "component", "unit", "max_number_of_units", "low_rank_dimension")
TYPES = {"LoreftIntervention": "loreft", "DireftIntervention": "direft"}
_LAYER_COMPONENT = re.compile(r"layers?\[(\d+)\]\.output$")
ORTHONORMAL_TOLERANCE = 1e-3  # what loading a float32 adapter accepts (csreft.integrity)


def _fail(src: Path, why: str) -> ValueError:
    return ValueError(f"{src}: not a pyreft LoReFT checkpoint: {why}")


def _representation(rep) -> dict:
    if isinstance(rep, dict):
        return {k: rep.get(k) for k in FIELDS}
    return dict(zip(FIELDS, list(rep) + [None] * len(FIELDS)))


def _layer(src: Path, rep: dict) -> int:
    component = str(rep.get("component") or "block_output")
    if component == "block_output":
        return int(rep.get("layer") or 0)
    found = _LAYER_COMPONENT.search(component)
    if found is None:
        raise _fail(src, f"component {component!r}: csreft edits decoder-layer outputs "
                         "(pyreft's 'block_output' or '...layers[N].output') only")
    return int(found.group(1))


def _load_state(src: Path, key: str) -> dict:
    path = src / f"intkey_{key}.bin"
    if not path.is_file():
        raise _fail(src, f"{path.name} is missing (config.json lists intervention {key!r})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refused (not plain tensors) or a damaged file
        raise _fail(src, f"{path.name} cannot be read as a state dict of tensors ({type(err).__name__}: it "
                         "holds other objects, or is damaged); csreft never unpickles anything but tensors")
    missing = [k for k in ("rotate_layer", "weight", "bias") if k not in state]
    if missing:
        raise _fail(src, f"{path.name} has no {', '.join(missing)} (found {sorted(state)})")
    return state


def read_pyreft(src) -> dict:
    """{"intervention", "rank", "layers": {layer: [(R^T (d, r), W, b) per key #i]}} of a pyreft directory."""
    src = Path(src)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise _fail(src, "no config.json (pyreft's ReftModel.save writes one)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise _fail(src, f"config.json is not JSON ({err})")
    reps, types = cfg.get("representations"), cfg.get("intervention_types")
    if not isinstance(reps, list) or not reps or not isinstance(types, list) or len(types) != len(reps):
        raise _fail(src, "config.json has no 'representations' and 'intervention_types' of equal length")
    kinds = set()
    for t in types:
        name = next((n for n in TYPES if n in str(t)), None)
        if name is None:
            raise _fail(src, f"intervention type {t!r}; csreft converts {' and '.join(TYPES)}")
        kinds.add(TYPES[name])
    if len(kinds) > 1:
        raise _fail(src, f"mixed intervention types {sorted(map(str, types))}")
    keys = cfg.get("sorted_keys") or []
    if len(keys) != len(reps):
        raise _fail(src, "config.json's 'sorted_keys' do not name one file per intervention")
    layers: dict[int, list] = {}
    for key, rep in zip(keys, map(_representation, reps)):
        if (rep.get("unit") or "pos") != "pos":
            raise _fail(src, f"intervention {key!r} has unit {rep['unit']!r}; csreft edits token positions ('pos')")
        state = _load_state(src, key)
        rotate = state["rotate_layer"].float()
        w, b = state["weight"].float(), state["bias"].float()
        if rotate.dim() != 2 or w.shape != rotate.T.shape or b.shape != (rotate.shape[1],):
            raise _fail(src, f"intervention {key!r}: shapes rotate_layer {tuple(rotate.shape)}, weight "
                             f"{tuple(w.shape)}, bias {tuple(b.shape)} do not form a rank-r LoReFT edit")
        for name, tensor in (("rotate_layer", rotate), ("weight", w), ("bias", b)):
            if not bool(torch.isfinite(tensor).all()):
                raise _fail(src, f"intervention {key!r}: {name} holds NaN or infinite values")
        error = (rotate.double().T @ rotate.double() - torch.eye(rotate.shape[1], dtype=torch.float64)).abs().max()
        if not error <= ORTHONORMAL_TOLERANCE:  # csreft would refuse to load what it wrote
            raise _fail(src, f"intervention {key!r}: rotate_layer's columns are not orthonormal "
                             f"(max |R R^T - I| = {float(error):.3g} > {ORTHONORMAL_TOLERANCE})")
        order = int(key.rsplit("#", 1)[1]) if "#" in key and key.rsplit("#", 1)[1].isdigit() else 0
        layers.setdefault(_layer(src, rep), []).append((order, (rotate, w, b)))
    layers = {layer: [block for _, block in sorted(found, key=lambda f: f[0])] for layer, found in layers.items()}
    ranks = {q.shape[1] for found in layers.values() for q, _, _ in found}
    if len(ranks) > 1:
        raise _fail(src, f"interventions of different ranks {sorted(ranks)}")
    counts = {len(found) for found in layers.values()}
    if len(counts) > 1 or max(counts) > 2:
        raise _fail(src, "csreft needs one intervention per layer (shared weights) or two (first/last "
                         f"positions) on every layer; found {({k: len(v) for k, v in layers.items()})}")
    return {"intervention": kinds.pop(), "rank": ranks.pop(), "layers": layers, "per_layer": counts.pop()}


def convert_pyreft(src, base, positions: str = "f7+l7", skill: str | None = None) -> CSReftModel:
    """A csreft model (k = 1, no router: LoReFT) on `base` with the pyreft checkpoint's edits;
    save it with save_pretrained(dir, metadata=model.conversion)."""
    src = Path(src)
    found = read_pyreft(src)
    separate = found["per_layer"] == 2
    config = CSReftConfig(layers=sorted(found["layers"]), rank=found["rank"], num_subspaces=1, positions=positions,
                          share_positions=not separate, intervention=found["intervention"],
                          orthogonal_subspaces=False, use_router=False)
    if separate and len(config.position_groups) != 2:
        raise ValueError(f"{src}: two interventions per layer edit first and last positions apart; "
                         f"positions={positions!r} needs both (e.g. f7+l7)")
    d, edit_d = model_identity(base)["hidden_size"], next(iter(found["layers"].values()))[0][0].shape[0]
    if d != edit_d:
        raise ValueError(f"{src}: the edits have hidden size {edit_d}, this base model has {d}: "
                         "convert on the base the checkpoint was trained on")
    model = CSReftModel(base, config)
    for layer, groups in model.edits.items():
        for edit, block in zip(groups, found["layers"][int(layer)]):
            fill_subspaces(edit, [block], config.intervention == "loreft")
    model.skill_names = [skill or src.name]
    model.conversion = {"skills": model.skill_names, "converted_from": {"pyreft": str(src), "positions": positions}}
    return model.eval()
