"""kill -9 at random points of `csreft train`, then resume; prints a JSON report.

    python kill_runner.py SPEC.json

SPEC: {"args": [train flags without --output-dir and --save-steps], "max_steps": N,
"workdir": DIR, "seeds": [..], "points_per_seed": n, "save_steps": [..] (one per seed)}. csreft is imported once here and
every run is a forked child running csreft.cli.main (what `python -m csreft.cli` runs), so
a run costs its training, not a Python start. For each seed and point: an uninterrupted
reference run, then a run killed with SIGKILL at a random moment (before the first
checkpoint, or a random delay after a random checkpoint appeared), then `--resume` (or a plain rerun when the kill came before the first checkpoint);
the resumed adapter file must equal the reference's byte for byte.
"""

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

from csreft.cli import main
import csreft.training.recipe  # noqa: F401  (imported before forking, like the CLI would)


def start(argv: list[str]) -> int:
    pid = os.fork()
    if pid == 0:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        code = 0
        try:
            main(argv)
        except SystemExit as err:
            code = err.code if isinstance(err.code, int) else 1
        except BaseException:
            code = 3
        os._exit(code)
    return pid


def wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def run(argv: list[str], out: Path | None = None) -> tuple[int, float, float]:
    """(exit status, seconds, seconds until the first checkpoint appeared in `out`)."""
    started, first = time.time(), None
    pid = start(argv)
    while out is not None:
        done, status = os.waitpid(pid, os.WNOHANG)
        if first is None and any(out.glob("checkpoint-*")):
            first = time.time() - started
        if done:
            return os.waitstatus_to_exitcode(status), time.time() - started, first
        time.sleep(0.005)
    return wait(pid), time.time() - started, first


def wait_for(path: Path, pid: int) -> None:
    """Until `path` exists or the process has ended."""
    while not path.exists():
        if not Path(f"/proc/{pid}").exists() or _zombie(pid):
            return
        time.sleep(0.002)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def state_of(out: Path) -> str:
    ckpts = sorted(p.name for p in out.glob("checkpoint-*"))
    return ",".join(ckpts) + ("+adapter" if (out / "adapter").exists() else "") or "nothing"


def main_(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec["workdir"])
    report = {"points": [], "identical": 0, "total": 0}
    for seed, save_steps in zip(spec["seeds"], spec["save_steps"]):
        args = spec["args"] + ["--save-steps", str(save_steps)]
        ref = work / f"ref-{save_steps}"
        if not ref.exists():
            code, _, _ = run(["train", *args, "--output-dir", str(ref)], ref)
            assert code == 0, f"reference run failed ({code})"
            # timed on a second run: the first pays one-off costs in the child
            again = work / f"ref-{save_steps}-again"
            code, duration, first = run(["train", *args, "--output-dir", str(again)], again)
            assert code == 0 and first is not None, f"second reference run failed ({code})"
            assert (again / "adapter" / "csreft_model.safetensors").read_bytes() == (
                ref / "adapter" / "csreft_model.safetensors").read_bytes(), "training is not deterministic"
            report[f"reference_{save_steps}"] = [round(first, 3), round(duration, 3)]
        expected = (ref / "adapter" / "csreft_model.safetensors").read_bytes()
        first, duration = report[f"reference_{save_steps}"]
        rng = random.Random(seed)
        marks = [f"checkpoint-{n}" for n in range(save_steps, spec["max_steps"] + 1, save_steps)]
        gap = (duration - first) / max(len(marks) - 1, 1)  # seconds between two checkpoints
        for i in range(spec["points_per_seed"]):
            out = work / f"s{seed}-{i}"
            # a random moment: before the first checkpoint, or within the gap after a random
            # one (a step, a checkpoint save, rotation, the adapter save, the summary)
            mark = rng.randrange(len(marks) + 1)
            delay = rng.uniform(0.5 * first, first) if mark == 0 else rng.uniform(0.0, gap)
            pid = start(["train", *args, "--output-dir", str(out)])
            if mark:
                wait_for(out / marks[mark - 1], pid)
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            killed = wait(pid)
            at_kill = state_of(out)
            resume = ["--resume"] if any(out.glob("checkpoint-*")) else []
            code, _, _ = run(["train", *args, "--output-dir", str(out), *resume])
            got = out / "adapter" / "csreft_model.safetensors"
            same = code == 0 and got.is_file() and got.read_bytes() == expected
            report["points"].append({"seed": seed, "after": marks[mark - 1] if mark else "start",
                                     "delay": round(delay, 3), "killed_status": killed,
                                     "state_at_kill": at_kill, "resumed": bool(resume), "exit": code,
                                     "identical": same})
            report["identical"] += same
            report["total"] += 1
    print(json.dumps(report))


if __name__ == "__main__":
    main_(sys.argv[1])
