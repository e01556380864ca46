"""A skill library composed from separately trained adapters reproduces each of them."""

import json

import pytest
import torch

from conftest import randomize_edits, tiny_llama
from csreft import CSReftConfig, CSReftModel, get_csreft_model
from csreft.cli import main

compose_adapters = CSReftModel.from_adapters

ADAPTERS = {  # name: (config, metadata)
    "cs": (dict(layers=[1, 2], rank=2, num_subspaces=2), {"skills": ["reverse", "sort"], "skill_routing": True}),
    "lo": (dict(layers=[1, 2], rank=2, num_subspaces=1, use_router=False), {"skills": ["upper"]}),
    "free": (dict(layers=[2, 3], rank=1, num_subspaces=2, orthogonal_subspaces=False, shared_subspaces=1),
             {"skills": ["a", "b"], "skill_routing": False}),
}


def ids_batch(batch=2, length=12, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def write_adapter(path, name, seed, **overrides):
    cfg, meta = ADAPTERS[name]
    model = get_csreft_model(tiny_llama(), CSReftConfig(**{"positions": "f3+l3", **cfg, **overrides}))
    randomize_edits(model, 0.5, seed=seed)
    model.save_pretrained(path / name, metadata=meta)
    return path / name


@pytest.fixture
def library(tmp_path):
    return [write_adapter(tmp_path, name, seed) for seed, name in enumerate(ADAPTERS)]


def test_each_adapter_is_reproduced_with_only_its_gates_on(library):
    composed = compose_adapters(tiny_llama(), library)
    assert composed.skill_names == ["reverse", "sort", "upper", "free.0", "free.1", "free.shared0"]
    cfg = composed.csreft_config
    assert (cfg.layers, cfg.rank, cfg.num_subspaces, cfg.orthogonal_subspaces) == ([1, 2, 3], 2, 6, False)
    ids = ids_batch(3, 12)
    blocks = {"cs": slice(0, 2), "lo": slice(2, 3), "free": slice(3, 5)}
    worst = {}
    g = torch.Generator().manual_seed(5)
    for name, directory in zip(ADAPTERS, library):
        source = CSReftModel.from_pretrained(tiny_llama(), directory)
        k = source.csreft_config.num_subspaces
        own = torch.rand(3, k, generator=g) * 2 - 0.5  # any gates, negative ones too
        gates = torch.zeros(3, 6)
        gates[:, blocks[name]] = own
        if name == "free":
            gates[:, 5] = 1.0  # its shared subspace is always on in the source
        with torch.no_grad():
            expected = source(ids, prompt_starts=[1] * 3, gates=own).logits
            got = composed(ids, prompt_starts=[1] * 3, gates=gates).logits
        worst[name] = float((got - expected).abs().max())
        assert (expected - source.base_model(ids).logits).abs().max() > 1e-3  # the edits do something
    print("composed vs source, max abs logit difference:", {k: f"{v:.1e}" for k, v in worst.items()})
    assert max(worst.values()) <= 1e-5


def test_overlap_report_gives_principal_angles(library):
    composed = compose_adapters(tiny_llama(), library)
    overlap = composed.composition["overlap"]
    assert set(overlap) == {"layer 1", "layer 2"}  # layer 3: one adapter only, no pair
    assert set(overlap["layer 2"]) == {"cs | lo", "cs | free", "lo | free"}
    pair = overlap["layer 2"]["cs | lo"]
    assert len(pair["cosines"]) == 2 and 0 <= pair["min_angle_deg"] <= 90


def test_overlap_of_an_adapter_with_itself_is_zero_degrees(tmp_path):
    a = write_adapter(tmp_path, "lo", 0)
    b = tmp_path / "copy"
    b.mkdir()
    for f in a.iterdir():
        (b / f.name).write_bytes(f.read_bytes())
    meta = json.loads((b / "csreft_config.json").read_text())
    meta["metadata"]["skills"] = ["upper2"]
    (b / "csreft_config.json").write_text(json.dumps(meta))
    composed = compose_adapters(tiny_llama(), [a, b])
    assert composed.composition["overlap"]["layer 1"]["lo | copy"]["min_angle_deg"] == pytest.approx(0, abs=0.1)


@pytest.mark.filterwarnings("ignore:.*vocab_size")  # the CLI's tiny base has a larger vocabulary
@pytest.mark.parametrize(
    "overrides,message",
    [({"positions": "f2+l2"}, "positions='f2\\+l2', but .* has positions='f3\\+l3'"),
     ({"intervention": "direft"}, "intervention='direft'"),
     ({"share_positions": False}, "share_positions=False")],
)
def test_incompatible_adapters_are_refused_and_nothing_is_written(tmp_path, tiny_model_dir, library, overrides,
                                                                  message):
    other = write_adapter(tmp_path / "x", "lo", 9, **overrides)
    with pytest.raises(SystemExit, match=message):
        main(["compose", "--adapters", f"{library[0]},{other}", "--output-dir", str(tmp_path / "out"),
              "--model", str(tiny_model_dir)])
    assert not (tmp_path / "out").exists()


def test_same_skill_twice_and_another_base_are_refused(tmp_path, library):
    twin = write_adapter(tmp_path / "x", "lo", 3)
    with pytest.raises(ValueError, match="skill name 'upper' is in both"):
        compose_adapters(tiny_llama(), [library[1], twin])
    with pytest.raises(ValueError, match="hidden_size"):
        compose_adapters(tiny_llama(d=96), library)


@pytest.mark.filterwarnings("ignore:.*vocab_size")
def test_cli_compose_writes_a_loadable_library(tmp_path, tiny_model_dir, library, capsys):
    out = tmp_path / "lib"
    main(["compose", "--adapters", ",".join(map(str, library)), "--output-dir", str(out),
          "--model", str(tiny_model_dir)])
    printed = capsys.readouterr().out
    assert "min angle" in printed and "reverse, sort, upper" in printed
    loaded = CSReftModel.from_pretrained(tiny_llama(), out)
    assert loaded.skill_names[:3] == ["reverse", "sort", "upper"] and loaded.router is not None
    composed = compose_adapters(tiny_llama(), library)
    ids = ids_batch()
    with torch.no_grad():
        assert torch.equal(loaded(ids, skills="upper").logits, composed(ids, skills="upper").logits)


def test_router_only_training_leaves_every_imported_edit_bit_identical(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    dirs = []
    for seed, skill in enumerate(("reverse", "double")):
        model = get_csreft_model(base, CSReftConfig(layers=[1, 2], rank=2, num_subspaces=1, use_router=False))
        randomize_edits(model, 0.5, seed=seed)
        model.save_pretrained(tmp_path / skill, metadata={"skills": [skill]})
        model.remove_hooks()
        dirs.append(str(tmp_path / skill))
    words = ["abc", "dog", "cat", "sun", "map", "pen"]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{s} the word {w}", "response": f(w), "skill": s}) + "\n"
                            for s, f in (("reverse", lambda w: w[::-1]), ("double", lambda w: w + w))
                            for w in words))
    lib = tmp_path / "lib"
    main(["compose", "--adapters", ",".join(dirs), "--output-dir", str(lib), "--model", str(tiny_model_dir)])
    out = tmp_path / "run"
    main(["train", "--init-adapter", str(lib), "--train", "router", "--skill-routing", "--data", str(data),
          "--model", str(tiny_model_dir), "--output-dir", str(out), "--max-steps", "4", "--batch-size", "4",
          "--lr", "1e-2", "--logging-steps", "2", "--routing-loss-weight", "2.0"])
    before, after = load_file(lib / "csreft_model.safetensors"), load_file(out / "adapter" / "csreft_model.safetensors")
    # the library had no signatures; the run stored its skills' prompt signatures beside the same tensors
    assert before.keys() == {k for k in after if not k.startswith("signature.")}
    assert after["signature.mean"].shape == (2, 64)
    edits = [k for k in before if k.startswith("edits.")]
    assert edits and all(torch.equal(before[k], after[k]) for k in edits)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("router."))
    meta = json.loads((out / "adapter" / "csreft_config.json").read_text())
    assert meta["metadata"]["skills"] == ["reverse", "double"] and meta["metadata"]["skill_routing"]
    assert meta["csreft_config"]["routing_loss_weight"] == 2.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["edit_parameters"] == 0 and summary["router_parameters"] > 0
    with pytest.raises(SystemExit, match="rank come"):
        main(["train", "--init-adapter", str(lib), "--train", "router", "--data", str(data), "--rank", "8",
              "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "bad")])


def test_library_without_router_turns_every_edit_on(library):
    composed = compose_adapters(tiny_llama(), library, router=False)
    assert composed.router is None
    ids = ids_batch()
    with torch.no_grad():
        assert torch.equal(composed(ids).logits, composed(ids, gates=[1.0] * 6).logits)
