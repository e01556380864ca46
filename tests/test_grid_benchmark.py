"""benchmarks/composition_grid.py: gates of a cell, fitted per-layer weights, an end-to-end run."""

import json

import pytest
import torch

from conftest import load_benchmark, randomize_edits
from csreft import CSReftConfig, get_csreft_model
from csreft.base_models import load_base
from csreft.evaluation.grid import grid_suite, summarise


def load_module():
    return load_benchmark("composition_grid")


def test_role_gates_at_one_are_the_union_of_the_cell():
    module = load_module()
    held = grid_suite(train_per_skill=0, test_per_skill=0, composed=8, validation=0).composed
    union = module.union_gates(held)
    assert union.sum(1).tolist() == [2.0] * 8
    for row, rec in zip(union, held):
        assert {module.SKILLS[j] for j in row.nonzero().flatten().tolist()} == {rec["task"], rec["style"]}
    weights = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.5, 2.0]])
    layered = module.role_gates(held, weights)
    assert torch.equal(layered[:, :2], union[:, None].expand(8, 2, -1))
    rec = held[0]
    assert layered[0, 2, module.SKILLS.index(rec["task"])] == 0.5 and layered[0, 2, module.SKILLS.index(rec["style"])] == 2.0


def test_fitted_weights_lower_the_loss_of_their_examples(tiny_model_dir):
    module = load_module()
    base, tok = load_base(str(tiny_model_dir))
    model = get_csreft_model(base, CSReftConfig(layers=[1, 2], rank=2, num_subspaces=9, positions="f3+l3"))
    randomize_edits(model, 0.3)
    records = grid_suite(train_per_skill=0, test_per_skill=0, composed=0, validation=8).validation

    def loss(weights):
        from csreft.data import SupervisedDataset, pad_batch
        batch = pad_batch(SupervisedDataset(records, tok, 256).examples, tok.pad_token_id)
        with torch.no_grad():
            return model(**batch, gates=module.role_gates(records, weights)).loss.item()

    weights = module.fit_weights(model, tok, records, steps=15, max_length=256)
    assert weights.shape == (2, 2) and loss(weights) < loss(torch.ones(2, 2)) - 1e-3
    assert all(p.grad is None for p in model.base_model.parameters())


@pytest.mark.filterwarnings("ignore")
def test_grid_benchmark_smoke(tmp_path, tiny_model_dir, monkeypatch, capsys):
    module = load_module()
    out = tmp_path / "grid"
    argv = ["--model", str(tiny_model_dir), "--output-dir", str(out), "--train-per-skill", "4", "--test-per-skill", "2",
            "--cell-records", "2", "--steps", "2", "--batch-size", "4", "--layers", "0,1,2,3", "--rank", "2",
            "--fit-examples", "4", "--fit-steps", "2", "--max-length", "256"]
    report = module.main(argv)
    rows = report["models"]
    assert set(rows) == set(module.MODELS)
    val_cells = set(report["cells"]["validation"])
    for name, row in rows.items():
        assert set(row["union"]["cells"]) == val_cells, name  # --split validation: validation cells only
        assert row["single"]["all"]["n"] == 2 * 9
        assert ("removal" in row) == (name not in ("base", "loreft", "lora", "lora-merge")), name
        assert ("fitted" in row) == (name not in ("base", "loreft", "lora")), name
    assert set(rows["gated"]["fitted"]["cells"]) == val_cells and len(rows["gated"]["fitted"]["weights"]) == 2
    assert rows["lora"]["lora_rank"] >= 1
    merge = rows["lora-merge"]
    assert {f"union-{k}" for k in module.MERGES} <= set(merge) and merge["union"] == merge["union-cat"]
    assert set(merge["union-ties"]["cells"]) == val_cells and len(merge["fitted"]["weights"]) == 2
    assert all(kind in module.MERGES for kind, _ in merge["fitted"]["weights"])
    assert sorted(p.name for p in (out / "lora-skills").iterdir()) == module.SKILLS
    placed = json.loads((out / "layers" / "adapter" / "csreft_config.json").read_text())["csreft_config"]
    tasks_first = {"add": "0,1", "bullet": "2,3", "json": "2,3", "last": "0,1", "max": "0,1", "prefix": "2,3",
                   "sentiment": "0,1", "signoff": "2,3", "sort": "0,1"}  # sorted skills: subspace order
    assert placed["placement"] == ";".join(tasks_first.values()) and placed["num_subspaces"] == 9
    positions = json.loads((out / "positions" / "adapter" / "csreft_config.json").read_text())["csreft_config"]
    assert positions["placement"] == ";".join("0,1,2,3@f" if v == "0,1" else "0,1,2,3@l" for v in tasks_first.values())
    assert positions["share_positions"] is False
    assert json.loads((out / "generated" / "adapter" / "csreft_config.json").read_text())["csreft_config"]["edit_generated"]
    assert "| gated |" in (out / "grid-validation.md").read_text()
    # a second run reuses the adapters (same training key) and can score the test cells
    adapter = out / "gated" / "adapter" / "csreft_model.safetensors"
    before = adapter.stat().st_mtime_ns
    test = module.main(argv + ["--split", "test", "--models", "gated"])
    assert adapter.stat().st_mtime_ns == before
    assert set(test["models"]) == {"gated"}  # the validation rows stay in grid-validation.json
    assert set(test["models"]["gated"]["union"]["cells"]) == set(test["cells"]["test"])
    assert set(json.loads((out / "grid-validation.json").read_text())["models"]) == set(module.MODELS)
    again = module.main(argv + ["--models", "lora,lora-merge"])
    for name in ("lora", "lora-merge"):  # saved LoRAs are reused, not trained again, and score the same
        assert again["models"][name]["train_seconds"] == 0.0, name
        assert again["models"][name]["union"] == rows[name]["union"], name
    assert rows["lora-merge"]["lora_steps_per_skill"] == 1  # --steps 2 / 9 skills, at least 1
    longer = module.main(argv + ["--models", "lora-merge", "--lora-skill-steps", "2", "--output-dir", str(tmp_path / "longer")])
    assert longer["models"]["lora-merge"]["lora_steps_per_skill"] == 2 and longer["models"]["lora-merge"]["train_seconds"] > 0
    n_held = len(report["cells"]["validation"]) * 2
    assert {len(rows["lora-merge"]["outputs"][k]) for k in ("union", "fitted")} == {n_held}
    assert len(rows["gated"]["outputs"]["fitted"]) == n_held  # in held-out order, so it pairs with the others
    text = (out / "grid-validation.md").read_text()
    assert "| gated | union | %d |" % n_held in text and "lora-merge fitted" in text
    held = module.held_records(report["args"])  # the kept outputs are in held-out order: they give the rows' rates
    for name, kind in (("lora-merge", "union"), ("lora-merge", "fitted"), ("gated", "fitted"), ("positions", "union")):
        assert summarise(held, rows[name]["outputs"][kind]) == {k: rows[name][kind][k] for k in ("all", "cells")}, name
    seed1 = tmp_path / "seed1"  # a second seed's report (here: the first one's, relabelled)
    seed1.mkdir()
    saved = json.loads((out / "grid-validation.json").read_text())
    saved["args"]["seed"] = 1
    for row in saved["models"].values():
        row["suite"]["seed"] = 1
    (seed1 / "grid-validation.json").write_text(json.dumps(saved))
    pooled = module.main(["--pool", f"{out},{seed1}", "--output-dir", str(tmp_path / "pooled")])["pooled"]
    assert "| gated | fitted | %d |" % (2 * n_held) in pooled  # two runs' records, concatenated
    assert (tmp_path / "pooled" / "grid-validation-pooled.md").read_text() == pooled
    with pytest.raises(SystemExit, match="grid-validation.json does not exist"):
        module.main(["--pool", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="seed 0, model base is in both"):
        module.main(["--pool", f"{out},{out}"])
    whole = module.main(["--pool", str(out), "--output-dir", str(tmp_path / "whole")])["pooled"]
    parts = []  # one seed's models spread over two files (runs in parallel folders) pool as one run
    for i, names in enumerate((["lora", "lora-merge"], [n for n in module.MODELS if n not in ("lora", "lora-merge")])):
        part = json.loads((out / "grid-validation.json").read_text())
        part["models"] = {n: part["models"][n] for n in names}
        parts.append(tmp_path / f"part{i}.json")
        parts[-1].write_text(json.dumps(part))
    assert module.main(["--pool", ",".join(map(str, parts)), "--output-dir", str(tmp_path / "parts")])["pooled"] == whole
    bad = json.loads(parts[0].read_text())
    bad["args"]["seed"], bad["models"]["lora-merge"]["lora_steps_per_skill"] = 1, 5
    parts[1].write_text(json.dumps(bad))  # seeds whose merges trained for other lengths do not pool
    with pytest.raises(SystemExit, match=r"the lora-merge rows differ in training steps \(\[1, 5\]\)"):
        module.main(["--pool", f"{out},{parts[1]}"])
    with pytest.raises(SystemExit):
        module.parse_args(["--lora-skill-steps", "-1"])
    assert "--lora-skill-steps: -1; allowed: 0" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="holds split validation, not --split test"):
        module.main(["--pool", str(parts[0]), "--split", "test"])
    saved["args"]["steps"] = 3
    (seed1 / "grid-validation.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match=r"the loreft rows differ in training steps \(\[2, 3\]\)"):
        module.main(["--pool", f"{out},{seed1}"])  # one model's seeds trained for other lengths do not pool
    other_length = json.loads((out / "grid-validation.json").read_text())  # but two models of other lengths do
    other_length["args"]["steps"] = 3
    other_length["models"] = {n: other_length["models"][n] for n in ("gated", "positions")}
    (tmp_path / "other_length.json").write_text(json.dumps(other_length))
    mixed = module.main(["--pool", f"{parts[0]},{tmp_path / 'other_length.json'}",
                         "--output-dir", str(tmp_path / "mixed")])["pooled"]
    assert "Training steps: lora 2, lora-merge 1 per skill, gated 3, positions 3" in mixed
    assert "| gated | union | %d | " % n_held in mixed and "| lora-merge fitted |" in mixed
    import shutil  # a trained adapter copied to another output dir is reused, not trained again
    other = tmp_path / "other"
    shutil.copytree(out / "gated", other / "gated")
    monkeypatch.setattr(module, "train_run", lambda opts: pytest.fail(f"trained again: {opts['output_dir']}"))
    copied = module.main([*argv[:argv.index("--output-dir")], "--output-dir", str(other), *argv[argv.index("--output-dir") + 2:],
                          "--models", "gated", "--fit-examples", "0"])
    assert copied["models"]["gated"]["union"] == rows["gated"]["union"]
    reseeded = module.main(argv + ["--models", "base", "--seed", "1"])  # rows of seed 0 would pair with seed 1's records
    assert set(reseeded["models"]) == {"base"}
