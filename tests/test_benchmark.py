"""benchmarks/speed.py runs end to end on a tiny random Llama and writes its JSON keys."""

import contextlib
import importlib.util
import io
import json
import subprocess
from pathlib import Path

import torch

SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
KEYS = (
    "train_ratio_vs_reference", "train_ratio_vs_loreft", "decode_ratio_vs_base",
    "memory_ratio_vs_base", "memory_ratio_generate_vs_base", "decode_ratio_mixed_vs_base",
)


def load_speed():
    spec = importlib.util.spec_from_file_location("csreft_speed_benchmark", SPEED)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speed_benchmark_writes_its_keys(tmp_path, monkeypatch):
    speed = load_speed()

    run = subprocess.run

    def probe_here(cmd, **kwargs):  # memory probes in this process: fast; only keys are checked
        if "--memory-probe" not in cmd:
            return run(cmd, **kwargs)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            speed.main(cmd[2:])
        return subprocess.CompletedProcess(cmd, 0, out.getvalue(), "")

    monkeypatch.setattr(speed.subprocess, "run", probe_here)
    threads = torch.get_num_threads()
    try:
        speed.main([
            "--model-shape", "tiny", "--device", "cpu", "--threads", "1", "--batch-size", "2",
            "--seq-len", "16", "--repeats", "1", "--new-tokens", "3", "--memory-jobs", "1",
            "--json", str(tmp_path / "speed.json"),
        ])
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "speed.json").read_text())
    for key in KEYS:
        assert result[key] > 0, key
    assert set(result["train"]["seconds"]) == {"reference", "loreft", "csreft", "lora"}
    assert set(result["generate"]) == {"batch_1", "batch_2"}
    assert set(result["generate_mixed"]) == {"batch_8"}
    assert set(result["memory"]["train"]) == {"reference", "loreft", "csreft", "lora"}
    assert result["train"]["breakdown"]["csreft"]["total_ms"] > 0


def test_memory_probes_start_equal():
    """Each memory probe is a fresh process; built, the reference's and csreft's must hold the same
    modules and weights (a module only the csreft path imported once made +100 MiB look like a
    training memory regression of 1.1x)."""
    speed = load_speed()
    args = speed.parse_args(["--model-shape", "tiny", "--device", "cpu", "--batch-size", "2", "--seq-len", "16",
                             "--new-tokens", "2", "--memory-jobs", "1"])
    found = speed.bench_memory(args, ["reference:train", "csreft:train"])["train"]
    starts = [found[m]["start_mb"] for m in ("reference", "csreft")]
    assert abs(starts[0] - starts[1]) < speed.START_SPREAD_MB / 2, found
    assert found["csreft"]["peak_mb"] / found["reference"]["peak_mb"] < 1.05, found
