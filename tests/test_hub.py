"""The Hub: loading by repo id (mock endpoint on 127.0.0.1, and an offline cache filled by
hand), push -> load round trip, errors, and no base-model Hub method reachable by mistake."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import randomize_edits, tiny_llama
from csreft import CSReftConfig, get_csreft_model
from mock_hub import MockHub

TESTS = Path(__file__).parent


def worker(tmp_path, *args, endpoint=None, offline=False) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_CACHE=str(tmp_path / "cache"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1", PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]))
    env["HF_ENDPOINT"] = endpoint or "http://127.0.0.1:9"  # nothing listens there
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, str(TESTS / "hub_worker.py"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def saved_adapter(path):
    model = get_csreft_model(tiny_llama(), CSReftConfig(layers=[1, 2], rank=2, num_subspaces=3, positions="f3+l3"))
    randomize_edits(model, scale=0.5)
    model.save_pretrained(path, metadata={"skills": ["a", "b", "c"]})
    return model


def test_push_then_load_round_trip_is_bit_identical(tmp_path):
    with MockHub() as hub:
        result = worker(tmp_path, "push", tmp_path, endpoint=hub.url)
        files = hub.repos["org/adapter"]["commits"][hub.repos["org/adapter"]["refs"]["main"]]
        downloads = [r for r in hub.requests if "/resolve/" in r]
    assert result["bit_identical"] and result["logits_equal"] and result["skills"] == ["a", "b", "c"]
    assert sorted(files) == ["README.md", "csreft_config.json", "csreft_model.safetensors"]
    assert files["csreft_model.safetensors"] == (tmp_path / "local" / "csreft_model.safetensors").read_bytes()
    card = files["README.md"].decode()
    for text in ("library_name: csreft", "`a`, `b`, `c`", "| total |", "train.jsonl", "csreft train ...",
                 '"num_subspaces": 3', 'from_pretrained(base, "org/adapter")'):
        assert text in card, text
    assert not any("README" in r for r in downloads)  # only the adapter files travel


def hand_filled_cache(tmp_path, repo="org/name", revision_sha="a" * 40, files=None):
    """The Hub cache's layout (models--org--name/{refs,snapshots}), as a download leaves it."""
    root = tmp_path / "cache" / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / revision_sha
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revision_sha)
    for name, source in (files or {}).items():
        shutil.copy(source, snap / name)
    return snap


def test_load_from_a_hand_filled_cache_offline(tmp_path):
    model = saved_adapter(tmp_path / "a")
    hand_filled_cache(tmp_path, files={n: tmp_path / "a" / n for n in ("csreft_config.json", "csreft_model.safetensors")})
    result = worker(tmp_path, "load", tmp_path, "org/name", "-", offline=True)
    assert "error" not in result, result
    for name, value in result["weights"].items():
        assert value == model.adapter_state_dict()[name].tolist()


def test_hub_errors_are_clear(tmp_path):
    saved_adapter(tmp_path / "a")
    hand_filled_cache(tmp_path, repo="org/notes", files={"README.md": tmp_path / "a" / "csreft_config.json"})
    result = worker(tmp_path, "load", tmp_path, "org/notes", "-", offline=True)
    assert "holds no csreft adapter" in result["error"], result
    with MockHub() as hub:
        hub.repos["org/adapter"] = {"refs": {"main": "b" * 40}, "commits": {"b" * 40: {
            n: (tmp_path / "a" / n).read_bytes() for n in ("csreft_config.json", "csreft_model.safetensors")}}}
        hub.repos["org/readme"] = {"refs": {"main": "c" * 40}, "commits": {"c" * 40: {"README.md": b"# hi"}}}
        missing_rev = worker(tmp_path / "x", "load", tmp_path, "org/adapter", "v9", endpoint=hub.url)
        no_files = worker(tmp_path / "y", "load", tmp_path, "org/readme", "-", endpoint=hub.url)
        fine = worker(tmp_path / "z", "load", tmp_path, "org/adapter", "main", endpoint=hub.url)
    assert "revision 'v9'" in missing_rev["error"] and "no such revision" in missing_rev["error"], missing_rev
    assert "holds no csreft adapter" in no_files["error"], no_files
    assert "error" not in fine, fine


def test_cli_push_uploads_the_folder_as_saved(tmp_path, tiny_model_dir):
    model = get_csreft_model(tiny_llama(vocab=320), CSReftConfig(layers=[1, 2], rank=2, num_subspaces=3))
    model.save_pretrained(tmp_path / "local", metadata={"skills": ["x"]})
    with MockHub() as hub:
        worker(tmp_path, "cli-push", tmp_path, tiny_model_dir, endpoint=hub.url)
        files = hub.repos["org/cli"]["commits"][hub.repos["org/cli"]["refs"]["main"]]
    for name in ("csreft_config.json", "csreft_model.safetensors"):
        assert files[name] == (tmp_path / "local" / name).read_bytes()
    assert f"| total | {model.trainable_parameters()['total']:,} " in files["README.md"].decode()


def test_failed_push_leaves_the_local_adapter_untouched(tmp_path):
    saved_adapter(tmp_path / "local")
    before = {p.name: p.read_bytes() for p in (tmp_path / "local").iterdir()}
    with MockHub(fail_commits=True) as hub:
        result = worker(tmp_path, "push-fails", tmp_path, endpoint=hub.url)
    assert "error" in result and "500" in result["error"], result
    assert {p.name: p.read_bytes() for p in (tmp_path / "local").iterdir()} == before


def test_no_base_model_hub_method_is_reachable(tiny_csreft):
    from csreft import CSReftModel

    assert type(tiny_csreft).push_to_hub is CSReftModel.push_to_hub
    for name in ("save_to_hub", "_upload_modified_files", "_create_repo", "load_adapter", "add_adapter",
                 "set_adapter", "push_model_to_hub"):
        with pytest.raises(AttributeError, match="base_model"):
            getattr(tiny_csreft, name)
    assert tiny_csreft.config is tiny_csreft.base_model.config  # everything else still reaches the base
    assert hasattr(tiny_csreft.base_model, "push_to_hub")  # explicitly, it is there


def test_a_missing_local_folder_is_not_sent_to_the_hub(tmp_path, tiny_csreft):
    from csreft import CSReftModel

    with pytest.raises(FileNotFoundError, match="missing"):
        CSReftModel.from_pretrained(tiny_llama(), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="revision"):
        CSReftModel.from_pretrained(tiny_llama(), tmp_path, revision="main")
