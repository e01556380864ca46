"""benchmarks/speed.py and benchmarks/scale.py run end to end on tiny random Llamas."""

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import torch

from conftest import load_benchmark

SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
KEYS = (
    "train_ratio_vs_reference", "train_ratio_vs_loreft", "decode_ratio_vs_base",
    "memory_ratio_vs_base", "memory_ratio_generate_vs_base", "decode_ratio_mixed_vs_base",
)


def load_speed():
    return load_benchmark("speed")


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
    modules and weights, up to csreft's own few MiB (measured 9-14: its tensors, LAPACK's code). A
    module only the csreft path imported once added 100 MiB, reported as a 1.1x regression."""
    speed = load_speed()
    args = speed.parse_args(["--model-shape", "tiny", "--device", "cpu", "--batch-size", "2", "--seq-len", "16",
                             "--new-tokens", "2", "--memory-jobs", "1"])
    found = speed.bench_memory(args, ["reference:train", "csreft:train"])["train"]
    starts = [found[m]["start_mb"] for m in ("reference", "csreft")]
    assert abs(starts[0] - starts[1]) < speed.START_SPREAD_MB, found
    assert found["csreft"]["peak_mb"] / found["reference"]["peak_mb"] < 1.05, found


def test_scale_benchmark_reports_size_memory_and_time(tmp_path):
    """benchmarks/scale.py (the 7B-shape CPU benchmark) end to end at the tiny shape."""
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(SPEED.parent / "scale.py"), "--shape", "tiny", "--dtype", "float32",
                           "--router-hidden", "8", "--skip", "generate", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    train = json.loads(out.read_text())["train"]
    assert set(train) == {"reference", "8"}
    r = train["8"]
    assert r["router_parameters"] == 64 * 8 + 8 + 8 * 4 + 4  # Linear(d, 8) -> ReLU -> Linear(8, k)
    # the file holds Q, W, b per edit (4 layers, one group, d 64 x 16) and the router, in float32
    assert r["edits_bytes"] == 4 * (64 * 16 * 2 + 16) * 4
    assert r["edits_bytes"] < r["adapter_bytes"] < r["edits_bytes"] + 4 * r["router_parameters"] + 20_000
    assert r["peak_mb"] > 0 and r["step_cpu_seconds"] > 0
    assert "x1." in proc.stdout or "x0." in proc.stdout


def test_router_views_clusters_held_out_points_and_measures_nmi():
    """benchmarks/router_views.py's clustering: fitted on some points of three clusters, it assigns
    held-out points of the same clusters to them (NMI 1) under both restart rules; an assignment
    that ignores the labels has NMI 0."""
    views = load_benchmark("router_views")
    g = torch.Generator().manual_seed(0)
    k, d, n = 3, 24, 120
    labels = torch.arange(n) % k
    centres = 6.0 * torch.randn(k, d, generator=g)
    x = centres[labels] + torch.randn(n, d, generator=g)
    for rule in ("inertia", "balance"):
        centre, project = views.fit_clusters(x[:90], k, dims=k, rule=rule, seed=0)
        assign = torch.cdist(project(x[90:]), centre).argmin(1)
        assert views.nmi_of(assign, labels[90:], k) == 1.0
    assert views.nmi_of(torch.zeros(30, dtype=torch.long), labels[90:], k) == 0.0
