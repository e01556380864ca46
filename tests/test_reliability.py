"""Nothing a user has is lost, and nothing loads or runs silently wrong: output folders that are
not adapters, symbolic links, interrupted saves, replaced libraries, huge gates, bad pyreft
tensors, mistyped adapter configs, launchers that start one process instead of several."""

from __future__ import annotations

import importlib.util
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
@pytest.mark.parametrize("argv", [["--local_rank=1", "train", "--data", "x.jsonl"],  # what `deepspeed` runs
                                  ["train", "--data", "x.jsonl", "--local_rank=1"]])
def test_the_deepspeed_launchers_local_rank_argument_is_accepted(argv):
    assert given(build_parser().parse_args(argv)) == {"data": "x.jsonl"}


def test_accelerate_launch_on_cpus_asking_for_two_processes_is_refused():
    from csreft.training.distributed import single_process_launch

    env = {"ACCELERATE_USE_CPU": "True"}
    asked = ["python", "accelerate", "launch", "--cpu", "--num_processes", "2", "-m", "csreft.cli", "train"]
    assert "use `torchrun --nproc_per_node 2" in single_process_launch(asked, env)
    assert single_process_launch(["accelerate", "launch", "--cpu", "--num_processes=1"], env) is None
    assert single_process_launch(asked, {**env, "WORLD_SIZE": "2"}) is None  # several processes did start
    assert single_process_launch(asked, {}) is None  # not accelerate


def test_accelerate_launch_refusal_end_to_end(tmp_path, tiny_model_dir):
    pytest.importorskip("accelerate")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "-m", "csreft.cli",
           "train", "--data", str(data), "--model", str(tiny_model_dir), "--layers", "1", "--output-dir",
           str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and "started one process" in proc.stderr and "torchrun --nproc_per_node 2" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_no_deprecation_warning_from_a_peft_model_and_no_deepspeed_gpu_warning(tmp_path):
    import warnings

    peft = pytest.importorskip("peft")
    from csreft.model import _checkpointing

    lora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _checkpointing(lora) is False
    if importlib.util.find_spec("deepspeed") is None:
        return
    code = ("from csreft.training.trainer import training_arguments; from csreft.training.options import "
            f"TrainingOptions; training_arguments(TrainingOptions(output_dir={str(tmp_path)!r})); import deepspeed")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"})
    assert proc.returncode == 0 and "WARNING" not in proc.stderr + proc.stdout, proc.stderr


def test_the_model_card_names_the_hub_model_and_says_what_unnamed_skills_mean():
    from csreft.hub import model_card

    counts = {"edits": 10, "router": 5, "total": 15, "percent": 0.01, "base": 1000}
    card = model_card({"base_model": {"name_or_path": "smollm2-135m-instruct"}, "metadata": {}}, counts, "org/x")
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "not named" not in card
    assert "Unsupervised: the subspaces have no skill names" in card


def test_an_adapter_under_the_earlier_file_names_loads_and_says_how_to_rename_it(tmp_path):
    path = saved(tmp_path / "old")
    os.replace(path / "csreft_config.json", path / "adapter_config.json")
    os.replace(path / "csreft_model.safetensors", path / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match="rename them to csreft_config.json and csreft_model.safetensors"):
        CSReftModel.from_pretrained(tiny_llama(), path)


# -- errors that name the problem ------------------------------------------------------------------
def _model():
    return get_csreft_model(tiny_llama(), CSReftConfig(layers=[1], rank=2, num_subspaces=2))


IDS = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
API_CASES = {
    "skill labels out of range": (lambda m: m(IDS, skill_labels=torch.tensor([5, 0])),
                                  r"skill_labels holds \[5, 0\]: each must be a subspace index 0..1"),
    "empty batch": (lambda m: m(torch.zeros(0, 10, dtype=torch.long)), r"input_ids has shape \(0, 10\): an empty batch"),
    "token id outside the vocabulary": (lambda m: m(torch.full((1, 10), 500)), "token id 500, outside the base "
                                        "model's vocabulary 0..127"),
    "logits_at of the wrong shape": (lambda m: m(IDS, logits_at=torch.tensor([1, 2, 3])),
                                     r"logits_at must be a bool tensor of shape \(2, 10\)"),
    "fractional prompt_starts": (lambda m: m(IDS, prompt_starts=[1.5, 0]), "prompt_starts must be whole token counts"),
    "padding inside a row": (lambda m: m(IDS, attention_mask=torch.tensor([[1, 1, 0] + [1] * 7, [1] * 10])),
                             "attention_mask row 0 has padding between its tokens"),
    "router too wide to allocate": (lambda m: get_csreft_model(tiny_llama(), CSReftConfig(
        layers=[1], rank=2, num_subspaces=2, router_hidden=10**12)), "router_hidden=1000000000000: a router of "
        "that width cannot be allocated"),
}


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_the_python_api_names_the_problem(case):
    call, message = API_CASES[case]
    with pytest.raises(ValueError, match=message):
        call(_model())


def test_helpers_name_the_problem():
    from conftest import CharTokenizer
    from csreft.data import encode_example, pad_batch
    from csreft.evaluation.scoring import response_nll
    from csreft.generation import generate_texts

    tok, model = CharTokenizer(), _model()
    for call, message in [(lambda: pad_batch([], 0), "pad_batch: no examples"),
                          (lambda: encode_example(tok, None, "x"), "prompt must be a string, got NoneType"),
                          (lambda: generate_texts(model, tok, ["a"], batch_size=0), "batch_size=0 is not valid"),
                          (lambda: response_nll(model, tok, [{"prompt": "a", "response": "b"}], batch_size=0),
                           "batch_size=0 is not valid")]:
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("name, text, message", [
    ("a.json", '{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n',
     r"a.json: invalid JSON at line 2, column 1 \(Extra data\); it looks like JSON Lines .*name it .jsonl"),
    ("b.jsonl", '{"prompt": "a", "response": "b"}\n\n\n{"prompt": "c"}\n', r"b.jsonl: line 4: field 'response' is missing"),
    ("c.jsonl", '{"prompt": "a", "response": "b", "instruction": "x", "output": "y"}\n',
     r"c.jsonl: line 1: fields of two record formats \(alpaca and prompt/response")])
def test_data_files_name_the_line_and_the_problem(tmp_path, name, text, message):
    from csreft.data import DataError, load_records

    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message):
        load_records(str(tmp_path / name))


def test_a_full_disk_names_the_file_and_keeps_the_old_adapter(tmp_path):
    code = f"""
import resource, signal, sys
sys.path.insert(0, {str(os.path.dirname(__file__))!r})
from conftest import tiny_llama
from csreft import CSReftConfig, CSReftModel
model = CSReftModel.from_pretrained(tiny_llama(), {str(saved(tmp_path / 'adapter'))!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
from csreft.cli import error_line
try:
    model.save_pretrained({str(tmp_path / 'adapter')!r})
except OSError as err:
    print(error_line(err))
"""
    before = (tmp_path / "adapter" / "csreft_model.safetensors").read_bytes()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout
    assert "csreft_model.safetensors: File too large (writing" in out, out
    assert (tmp_path / "adapter" / "csreft_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


@pytest.mark.parametrize("damage, message", [
    ("optimizer.pt", "optimizer.pt cannot be read"), ("trainer_state.json", "trainer_state.json is not valid JSON")])
def test_a_damaged_checkpoint_file_is_named(tmp_path, damage, message):
    from csreft.integrity import checkpoint_problems

    ckpt = saved(tmp_path / "checkpoint-2")
    torch.save({"state": {}, "param_groups": []}, ckpt / "optimizer.pt")
    torch.save({"last_epoch": 2}, ckpt / "scheduler.pt")
    (ckpt / "trainer_state.json").write_text("{}")
    torch.save({"python": 1}, ckpt / "rng_state.pth")
    assert checkpoint_problems(ckpt) == []
    data = (ckpt / damage).read_bytes()
    (ckpt / damage).write_bytes(data[: len(data) // 2])
    assert any(message in p for p in checkpoint_problems(ckpt))


# -- bf16 on the CPU ---------------------------------------------------------------------------------
def test_train_with_bf16_on_the_cpu_keeps_the_adapter_in_float32(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"word {i}", "response": f"x{i}"}) + "\n" for i in range(8)))
    with pytest.warns(UserWarning, match="time one step against float32"):
        main(["train", "--data", str(data), "--model", str(tiny_model_dir), "--layers", "1", "--rank", "2",
              "--num-subspaces", "2", "--max-steps", "2", "--batch-size", "4", "--output-dir", str(tmp_path / "run"),
              "--bf16"])
    state = load_file(tmp_path / "run" / "adapter" / "csreft_model.safetensors")
    assert state and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in state.values())
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["options"]["bf16"] is True


def test_edits_compute_in_float32_under_bf16_autocast():
    model = get_csreft_model(tiny_llama(), CSReftConfig(layers=[1, 2], rank=2, num_subspaces=2))
    randomize_edits(model, 0.5)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    labels = ids.masked_fill(torch.arange(10) < 5, -100)
    reference = model(ids, labels=labels).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=labels)
        delta = model.edits["1"][0](torch.randn(2, 10, 64), torch.ones(2, 10, 2), delta_only=True)
    out.loss.backward()
    assert delta.dtype == torch.float32  # the edit's own math is not autocast
    assert torch.isfinite(out.logits).all() and (out.logits.float() - reference).abs().max() < 0.1
    grads = [p.grad for p in model.edits.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
