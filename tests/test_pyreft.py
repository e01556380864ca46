"""convert-pyreft: a checkpoint in pyreft's on-disk format (written here, no pyreft needed)
becomes a csreft adapter whose edit is pyreft's LoReFT formula h + R^T (W h + b - R h)."""

import json
from collections import OrderedDict

import pytest
import torch

from conftest import tiny_llama
from csreft import CSReftModel
from csreft.cli import main
from csreft.integrations.pyreft import convert_pyreft

LOREFT = "<class 'pyreft.interventions.LoreftIntervention'>"


def write_pyreft(path, layers, rank=3, d=64, kind=LOREFT, seed=0):
    """What pyvene's IntervenableModel.save writes for pyreft interventions on `layers`
    (a layer listed twice: share_weights=False, first then last positions)."""
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True)
    keys, reps, seen, tensors = [], [], {}, {}
    for layer in layers:
        n = seen[layer] = seen.get(layer, -1) + 1
        key = f"layer_{layer}_comp_block_output_unit_pos_nunit_1#{n}"
        rotate, _ = torch.linalg.qr(torch.randn(d, rank, generator=g))
        state = OrderedDict(weight=torch.randn(rank, d, generator=g).to(torch.bfloat16),
                            bias=torch.randn(rank, generator=g).to(torch.bfloat16), rotate_layer=rotate)
        torch.save(state, path / f"intkey_{key}.bin")
        keys.append(key)
        reps.append([layer, "block_output", "pos", 1, rank, None, None, None, None, None, None, None, None, None])
        tensors[(layer, n)] = {k: v.float() for k, v in state.items()}
    config = {"representations": reps, "intervention_types": [kind] * len(layers), "sorted_keys": keys,
              "mode": "parallel", "intervention_dimensions": [d] * len(layers),
              "intervention_constant_sources": [True] * len(layers), "transformers_version": "4.45.0",
              "model_type": "<class 'transformers.models.llama.modeling_llama.LlamaForCausalLM'>"}
    (path / "config.json").write_text(json.dumps(config))
    return tensors


def layer_outputs(model, ids, layers):
    """(raw, edited) outputs of each layer in one forward: before and after the edit hook."""
    raw, edited, hooks = {}, {}, []
    for layer in layers:
        mod = model.base_model.model.layers[layer]
        hooks.append(mod.register_forward_hook(lambda m, a, o, L=layer: raw.update({L: o.clone()}), prepend=True))
        hooks.append(mod.register_forward_hook(lambda m, a, o, L=layer: edited.update({L: o.clone()})))
    with torch.no_grad():
        model(ids, prompt_starts=[0])
    for h in hooks:
        h.remove()
    return raw, edited


def loreft(t, h):
    R = t["rotate_layer"].T
    return h + R.T @ (t["weight"] @ h + t["bias"] - R @ h)


@pytest.mark.filterwarnings("ignore:.*vocab_size")  # converted on the CLI's tiny base, loaded on another
@pytest.mark.parametrize("share", [True, False])
def test_converted_edit_is_pyrefts_loreft_formula(tmp_path, share, tiny_model_dir):
    layers = [1, 3] if share else [1, 3, 1, 3]
    tensors = write_pyreft(tmp_path / "pyreft", layers)
    out = tmp_path / "converted"
    main(["convert-pyreft", str(tmp_path / "pyreft"), "--output-dir", str(out), "--positions", "f2+l3",
          "--model", str(tiny_model_dir), "--skill", "greet"])
    model = CSReftModel.from_pretrained(tiny_llama(), out)
    assert model.skill_names == ["greet"] and model.router is None
    assert model.csreft_config.share_positions is share
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(1))
    raw, edited = layer_outputs(model, ids, [1, 3])
    worst = 0.0
    for layer in (1, 3):
        h, got = raw[layer][0], edited[layer][0]
        for pos in range(10):
            which = 0 if share or pos < 2 else 1
            expected = loreft(tensors[(layer, which)], h[pos]) if pos in (0, 1, 7, 8, 9) else h[pos]
            worst = max(worst, float((got[pos] - expected).abs().max()))
    print(f"converted vs pyreft formula (share={share}): max abs difference {worst:.2e}")
    assert worst <= 1e-5


def test_direft_converts_to_direft(tmp_path):
    write_pyreft(tmp_path / "p", [2], kind="<class 'pyreft.interventions.DireftIntervention'>")
    assert convert_pyreft(tmp_path / "p", tiny_llama()).csreft_config.intervention == "direft"


class NotATensor:
    pass


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda p: (p / "config.json").unlink(), "no config.json"),
        (lambda p: (p / "config.json").write_text(json.dumps(
            {**json.loads((p / "config.json").read_text()),
             "intervention_types": ["<class 'pyreft.interventions.NoreftIntervention'>"]})),
         "intervention type .*NoreftIntervention.*csreft converts LoreftIntervention and DireftIntervention"),
        (lambda p: next(p.glob("intkey_*.bin")).unlink(), "intkey_layer_2.*is missing"),
        (lambda p: torch.save({"rotate_layer": NotATensor()}, next(p.glob("intkey_*.bin"))),
         "intkey_.*cannot be read as a state dict of tensors"),
        (lambda p: torch.save({"rotate_layer": torch.zeros(64, 2)}, next(p.glob("intkey_*.bin"))),
         "intkey_.*has no weight, bias"),
    ],
)
def test_not_a_loreft_checkpoint_is_a_clear_error(tmp_path, damage, message):
    write_pyreft(tmp_path / "p", [2])
    damage(tmp_path / "p")
    with pytest.raises(SystemExit, match="not a pyreft LoReFT checkpoint: " + message):
        main(["convert-pyreft", str(tmp_path / "p"), "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_another_base_is_refused(tmp_path):
    write_pyreft(tmp_path / "p", [2], d=64)
    with pytest.raises(ValueError, match="hidden size 64, this base model has 96"):
        convert_pyreft(tmp_path / "p", tiny_llama(d=96))
