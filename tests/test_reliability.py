"""Nothing a user has is lost, and nothing loads or runs silently wrong: output folders that are
not adapters, symbolic links, interrupted saves, replaced libraries, huge gates, bad pyreft
tensors, mistyped adapter configs, launchers that start one process instead of several."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import randomize_edits, tiny_llama
from csreft import CSReftConfig, CSReftModel, get_csreft_model
from csreft.cli import build_parser, main
from csreft.cli.options import given

CONFIG = dict(layers=[1, 2], rank=2, num_subspaces=1, use_router=False, positions="f3+l3")


def saved(path, seed=0, **overrides):
    model = get_csreft_model(tiny_llama(), CSReftConfig(**{**CONFIG, **overrides}))
    randomize_edits(model, 0.5, seed=seed)
    model.save_pretrained(path)
    return path


def tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# -- output folders ------------------------------------------------------------------------------
def test_an_adapter_never_replaces_a_folder_of_other_files(tmp_path, tiny_model_dir):
    a, b = saved(tmp_path / "a"), saved(tmp_path / "b", seed=1)
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    (work / "checkpoint-4").mkdir()
    for argv in (["compose", "--adapters", f"{a},{b}"], ["convert-pyreft", str(tmp_path / "pyreft")]):
        if argv[0] == "convert-pyreft":
            from test_pyreft import write_pyreft

            write_pyreft(tmp_path / "pyreft", [1])
        with pytest.raises(SystemExit, match=r"work: not empty and not an adapter folder \(it holds checkpoint-4, "
                                             r"notes.txt\).*--overwrite"):
            main([*argv, "--output-dir", str(work), "--model", str(tiny_model_dir)])
        assert tree(work) == ["checkpoint-4", "notes.txt"]
    model = CSReftModel.from_pretrained(tiny_llama(), a)
    with pytest.raises(ValueError, match="not an adapter folder"):
        model.save_pretrained(work)
    main(["compose", "--adapters", f"{a},{b}", "--output-dir", str(work), "--model", str(tiny_model_dir),
          "--overwrite"])
    assert tree(work) == ["csreft_config.json", "csreft_model.safetensors"]


def test_a_training_runs_folder_and_the_inputs_themselves_are_never_replaced(tmp_path, tiny_model_dir):
    a, b = saved(tmp_path / "lib" / "a"), saved(tmp_path / "lib" / "b", seed=1)
    for out, message in ((tmp_path / "lib", "holds the input adapter"), (a, "holds the input adapter")):
        with pytest.raises(SystemExit, match=message):
            main(["compose", "--adapters", f"{a},{b}", "--output-dir", str(out), "--model", str(tiny_model_dir),
                  "--overwrite"])
    run = tmp_path / "run"
    run.mkdir()
    (run / ".csreft.lock").write_text("1 host 0")
    with pytest.raises(SystemExit, match=r"a training run's directory \(it holds .csreft.lock\)"):
        main(["compose", "--adapters", f"{a},{b}", "--output-dir", str(run), "--model", str(tiny_model_dir),
              "--overwrite"])
    assert tree(run) == [".csreft.lock"] and tree(tmp_path / "lib") == [
        "a", "a/csreft_config.json", "a/csreft_model.safetensors", "b", "b/csreft_config.json",
        "b/csreft_model.safetensors"]


def test_a_symlinked_output_is_written_through(tmp_path):
    target = saved(tmp_path / "real", seed=0)
    link = tmp_path / "link"
    link.symlink_to(target)
    model = CSReftModel.from_pretrained(tiny_llama(), saved(tmp_path / "other", seed=3))
    model.save_pretrained(link)
    assert link.is_symlink() and os.path.realpath(link) == str(target)
    again = CSReftModel.from_pretrained(tiny_llama(), target)
    assert all(torch.equal(v, model.adapter_state_dict()[k]) for k, v in again.adapter_state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "other", "real"]  # no leftovers


def test_a_save_killed_between_two_renames_is_restored(tmp_path):
    """Without renameat2 a save renames the old folder away, then the new one in: a kill in
    between leaves only .NAME.old-PID-*; the next load (or save) puts it back."""
    target = saved(tmp_path / "adapter")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    os.replace(target, tmp_path / f".adapter.old-{dead}-0a1b2c3d")
    model = CSReftModel.from_pretrained(tiny_llama(), target)
    assert target.is_dir() and model.csreft_config.layers == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# -- what loads, converts and runs -----------------------------------------------------------------
@pytest.mark.parametrize("field, value, message", [
    ("use_router", "no", "use_router='no' is not valid: true or false"),
    ("share_positions", 1, "share_positions=1 is not valid: true or false")])
def test_a_mistyped_adapter_config_is_refused(tmp_path, field, value, message):
    path = saved(tmp_path / "a")
    meta = json.loads((path / "csreft_config.json").read_text())
    meta["csreft_config"][field] = value
    (path / "csreft_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=message):
        CSReftModel.from_pretrained(tiny_llama(), path)


def test_metadata_that_is_not_a_mapping_names_the_file_and_leaves_the_base_clean(tmp_path):
    path = saved(tmp_path / "a")
    meta = json.loads((path / "csreft_config.json").read_text())
    meta["metadata"] = [1]
    (path / "csreft_config.json").write_text(json.dumps(meta))
    base = tiny_llama()
    with pytest.raises(ValueError, match=r"csreft_config.json: .*'metadata' is list \[1\], expected a mapping"):
        CSReftModel.from_pretrained(base, path)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in base.modules())


def test_huge_gates_are_refused_not_turned_into_nan(tmp_path):
    model = CSReftModel.from_pretrained(tiny_llama(), saved(tmp_path / "a"))
    ids = torch.randint(3, 128, (1, 8))
    assert torch.isfinite(model(ids, gates=[1e3]).logits).all()
    with pytest.raises(ValueError, match="gates must be between -1000 and 1000"):
        model(ids, gates=[1e30])


@pytest.mark.parametrize("damage, message", [("scale", "columns are not orthonormal"), ("nan", "NaN or infinite")])
def test_convert_pyreft_refuses_what_csreft_could_not_load(tmp_path, tiny_model_dir, damage, message):
    from test_pyreft import write_pyreft

    src = tmp_path / "pyreft"
    write_pyreft(src, [1])
    (path,) = src.glob("intkey_*.bin")
    state = torch.load(path, weights_only=True)
    state["rotate_layer"] = state["rotate_layer"] * 2 if damage == "scale" else state["rotate_layer"] * float("nan")
    torch.save(state, path)
    with pytest.raises(SystemExit, match=message):
        main(["convert-pyreft", str(src), "--output-dir", str(tmp_path / "out"), "--model", str(tiny_model_dir)])
    assert not (tmp_path / "out").exists()


def test_convert_pyreft_needs_no_tokenizer(tmp_path):
    from test_pyreft import write_pyreft

    write_pyreft(tmp_path / "pyreft", [1, 2])
    tiny_llama().save_pretrained(tmp_path / "base")  # weights and config only
    main(["convert-pyreft", str(tmp_path / "pyreft"), "--output-dir", str(tmp_path / "out"),
          "--model", str(tmp_path / "base")])
    assert CSReftModel.from_pretrained(tiny_llama(), tmp_path / "out").csreft_config.layers == [1, 2]


def test_adapters_of_two_training_runs_compose_under_their_runs_names(tmp_path, tiny_model_dir, capsys):
    a = saved(tmp_path / "runs" / "sort" / "adapter")
    b = saved(tmp_path / "runs" / "upper" / "adapter", seed=1)
    main(["compose", "--adapters", f"{a},{b}", "--output-dir", str(tmp_path / "lib"), "--model",
          str(tiny_model_dir), "--no-router"])
    assert "skills: sort, upper" in capsys.readouterr().out


def test_resuming_a_router_run_refuses_a_library_replaced_at_the_same_path(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from csreft.training.recipe import build, fit
    from csreft.training.rundir import RunDirectoryError

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for seed in (0, 1):
        model = get_csreft_model(base, CSReftConfig(layers=[1], rank=2, num_subspaces=2))
        randomize_edits(model, 0.5, seed=seed)
        model.save_pretrained(tmp_path / f"lib{seed}", metadata={"skills": ["a", "b"]})
        model.remove_hooks()
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"word {i}", "response": "x", "skill": "ab"[i % 2]}) + "\n"
                            for i in range(8)))
    lib = tmp_path / "lib"
    os.replace(tmp_path / "lib0", lib)
    opts = {"init_adapter": str(lib), "train": "router", "data": str(data), "model": str(tiny_model_dir),
            "output_dir": str(tmp_path / "run"), "max_steps": 4, "save_steps": 2, "batch_size": 2}
    fit(build({**opts, "max_steps": 2}))
    os.replace(lib, tmp_path / "lib-old")
    os.replace(tmp_path / "lib1", lib)  # another library at the same path
    with pytest.raises(RunDirectoryError, match="another run"):
        build({**opts, "resume": "latest"})


# -- launchers ------------------------------------------------------------------------------------
def test_the_deepspeed_launchers_local_rank_argument_is_accepted():
    args = build_parser().parse_args(["train", "--data", "x.jsonl", "--local_rank=1"])
    assert given(args) == {"data": "x.jsonl"}


def test_accelerate_launch_on_cpus_asking_for_two_processes_is_refused():
    from csreft.training.distributed import single_process_launch

    env = {"ACCELERATE_USE_CPU": "True"}
    asked = ["python", "accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "csreft.cli", "train"]
    assert "use `torchrun --nproc_per_node 2" in single_process_launch(asked, env)
    assert single_process_launch(["accelerate", "launch", "--cpu", "--num_processes=1"], env) is None
    assert single_process_launch(asked, {**env, "WORLD_SIZE": "2"}) is None  # several processes did start
    assert single_process_launch(asked, {}) is None  # not accelerate


def test_the_model_card_names_the_hub_model_and_says_what_unnamed_skills_mean():
    from csreft.hub import model_card

    counts = {"edits": 10, "router": 5, "total": 15, "percent": 0.01, "base": 1000}
    card = model_card({"base_model": {"name_or_path": "smollm2-135m-instruct"}, "metadata": {}}, counts, "org/x")
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "not named" not in card
    assert "Unsupervised: the subspaces have no skill names" in card
