"""An adversarial pass over the commands a user reaches for with a skill library: compose,
convert-pyreft, explicit gates, router-only training, data, push, compare on files.

Each case runs `csreft ...` in this process (a tiny random Llama, offline) and is judged:
  ok            the expected result: a success that checks out, or one clear line naming the problem
  traceback     an exception escaped the command
  unclear       an error whose line does not name what the case got wrong (the expected words)
  silent bad    exit 0 where an error was due, or a success whose result is wrong
  data loss     a file that was there before is gone or changed

    python benchmarks/adversarial.py [--json benchmarks/results/adversarial.json] [--only compose]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing leaves the machine
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from conftest import randomize_edits, tiny_llama, tiny_tokenizer  # noqa: E402
from csreft import CSReftConfig, get_csreft_model  # noqa: E402
from csreft.cli import main  # noqa: E402
from test_pyreft import write_pyreft  # noqa: E402


def run(argv):
    """(exit code, stdout, stderr, escaped exception or None) of `csreft ARGV`."""
    out, err = io.StringIO(), io.StringIO()
    code, escaped = 0, None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in argv])
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
            if not isinstance(stop.code, int) and stop.code is not None:
                err.write(str(stop.code) + "\n")
        except Exception as exc:  # noqa: BLE001 - what the pass looks for
            code, escaped = 1, exc
    return code, out.getvalue(), err.getvalue(), escaped


def snapshot(paths):
    return {str(p): (p.read_bytes() if p.is_file() else None) for p in paths}


class Pass:
    def __init__(self, work: Path):
        self.work, self.rows = work, []

    def case(self, group, name, argv, error=None, check=None, keep=()):
        """error: a regex the one error line must match (None: success expected); check: a
        callable judging a success; keep: files that must survive unchanged."""
        before = snapshot(keep)
        code, out, err, escaped = run(argv)
        lines = [line for line in err.strip().splitlines() if line.startswith("csreft")]  # not progress bars
        after = snapshot(keep)
        if escaped is not None:
            verdict, detail = "traceback", f"{type(escaped).__name__}: {escaped}"
        elif before != after:
            verdict, detail = "data loss", f"changed: {[k for k in before if before[k] != after[k]]}"
        elif error is None:
            ok = code == 0 and (check is None or check(out))
            verdict, detail = ("ok" if ok else "silent bad"), (lines[-1] if lines else out.strip()[-160:])
        elif code == 0:
            verdict, detail = "silent bad", "exit 0: " + out.strip()[-160:]
        else:
            message = lines[-1] if lines else ""
            verdict = "ok" if re.search(error, message) and len(lines) == 1 else "unclear"
            detail = message if len(lines) <= 1 else " | ".join(lines[-3:])
        detail = detail.replace(str(self.work), "WORK")
        self.rows.append({"group": group, "case": name, "verdict": verdict, "detail": detail[:300]})
        print(f"{verdict:<11} {group:<9} {name}: {detail[:140]}", flush=True)


def build_world(w: Path):
    """A tiny base model, trained-looking adapters, a pyreft checkpoint, data files."""
    tok = tiny_tokenizer()
    base = tiny_llama(vocab=len(tok))
    base.config.pad_token_id = base.config.eos_token_id = tok.pad_token_id
    base.save_pretrained(w / "base")
    tok.save_pretrained(w / "base")

    def adapter(path, seed, meta=None, **cfg):
        model = get_csreft_model(base, CSReftConfig(**{"layers": [1, 2], "rank": 2, "num_subspaces": 1,
                                                       "use_router": False, "positions": "f3+l3", **cfg}))
        randomize_edits(model, 0.3, seed=seed)
        model.save_pretrained(path, metadata=meta)
        model.remove_hooks()
        return path

    adapter(w / "sort", 0, {"skills": ["sort"]})
    adapter(w / "upper", 1, {"skills": ["upper"]})
    adapter(w / "runs" / "a" / "adapter", 2)
    adapter(w / "runs" / "b" / "adapter", 3)
    adapter(w / "f5", 4, {"skills": ["f5"]}, positions="f5")
    adapter(w / "unnamed", 5, None, num_subspaces=2, use_router=True)
    adapter(w / "norouter", 6, {"skills": ["x"]})
    write_pyreft(w / "pyreft", [1, 2], d=64)
    records = [{"prompt": f"sort {i} {i + 1}", "response": f"{i} {i + 1}", "skill": "sort"} for i in range(6)]
    records += [{"prompt": f"upper w{i}", "response": f"W{i}", "skill": "upper"} for i in range(6)]
    (w / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (w / "noskill.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n"
                                             for r in records))
    (w / "other-skills.jsonl").write_text(json.dumps({"prompt": "count a b", "response": "2", "skill": "count"}) + "\n")
    (w / "lines.json").write_text((w / "train.jsonl").read_text())
    (w / "sentinel").mkdir()
    (w / "sentinel" / "notes.txt").write_text("keep me")
    (w / "rundir").mkdir()
    (w / "rundir" / ".csreft.lock").write_text(f"{os.getpid()} host 0")
    (w / "afile").write_text("a file")
    (w / "real").mkdir()
    (w / "link").symlink_to(w / "real")
    big = tiny_llama(d=96)
    big.save_pretrained(w / "other-base")
    tok.save_pretrained(w / "other-base")


def cases(p: Pass):
    w, B = p.work, ["--model", p.work / "base"]
    lib = w / "lib"
    # -- compose
    p.case("compose", "missing adapter folder", ["compose", "--adapters", f"{w}/nope", "--output-dir", lib, *B],
           "nope: not a csreft adapter directory")
    p.case("compose", "a file as adapter", ["compose", "--adapters", w / "afile", "--output-dir", lib, *B],
           "afile: not a csreft adapter directory")
    p.case("compose", "no adapters", ["compose", "--adapters", ",", "--output-dir", lib, *B], "at least one adapter")
    p.case("compose", "--add without --library", ["compose", "--add", f"{w}/sort", "--output-dir", lib, *B],
           "--add needs --library")
    p.case("compose", "calibration file not JSON", ["compose", "--adapters", f"{w}/sort,{w}/upper",
           "--output-dir", lib, *B, "--routing", "signatures", "--calibration", w / "afile"],
           "afile: invalid JSON at line 1")
    p.case("compose", "signature routing of adapters without signatures", ["compose", "--adapters",
           f"{w}/sort,{w}/upper", "--output-dir", lib, *B, "--routing", "signatures"],
           "has no signatures.*--calibration")
    p.case("compose", "same adapter twice", ["compose", "--adapters", f"{w}/sort,{w}/sort", "--output-dir", lib, *B],
           "holds the input adapter|skill name 'sort' is in both")
    p.case("compose", "output holds other files", ["compose", "--adapters", f"{w}/sort,{w}/upper", "--output-dir",
                                                   w / "sentinel", *B], "not an adapter folder.*--overwrite",
           keep=[w / "sentinel" / "notes.txt"])
    p.case("compose", "output is a training run", ["compose", "--adapters", f"{w}/sort,{w}/upper", "--output-dir",
                                                   w / "rundir", *B, "--overwrite"], "training run's directory",
           keep=[w / "rundir" / ".csreft.lock"])
    p.case("compose", "output is an input", ["compose", "--adapters", f"{w}/sort,{w}/upper", "--output-dir",
                                             w / "sort", *B, "--overwrite"], "holds the input adapter",
           keep=[w / "sort" / "csreft_model.safetensors"])
    p.case("compose", "output is a file", ["compose", "--adapters", f"{w}/sort,{w}/upper", "--output-dir",
                                           w / "afile", *B], "exists and is not a directory", keep=[w / "afile"])
    p.case("compose", "incompatible positions", ["compose", "--adapters", f"{w}/sort,{w}/f5", "--output-dir", lib, *B],
           "positions='f5'.*must agree")
    p.case("compose", "another base model", ["compose", "--adapters", f"{w}/sort,{w}/upper", "--output-dir", lib,
                                             "--model", w / "other-base"], "hidden_size")
    p.case("compose", "bad router input", ["compose", "--adapters", f"{w}/sort,{w}/upper", "--output-dir", lib,
                                           "--router-input", "middle", *B], "invalid choice: 'middle'")
    p.case("compose", "bad gating", ["compose", "--adapters", f"{w}/sort,{w}/upper", "--output-dir", lib,
                                     "--gating", "often", *B], "invalid choice: 'often'")
    p.case("compose", "through a symlink", ["compose", "--adapters", f"{w}/sort,{w}/upper", "--output-dir",
                                            w / "link", *B],
           check=lambda out: (w / "link").is_symlink() and (w / "real" / "csreft_config.json").is_file())
    p.case("compose", "two runs' adapters", ["compose", "--adapters", f"{w}/runs/a/adapter,{w}/runs/b/adapter",
                                             "--output-dir", lib, *B], check=lambda out: "skills: a, b" in out)
    p.case("compose", "a new output folder", ["compose", "--adapters", f"{w}/sort,{w}/upper", "--output-dir",
                                               w / "sentinel2", *B],
           check=lambda out: (w / "sentinel2" / "csreft_config.json").is_file())
    p.case("compose", "library", ["compose", "--adapters", f"{w}/sort,{w}/upper", "--output-dir", lib, *B],
           check=lambda out: "skills: sort, upper" in out)
    # -- convert-pyreft
    out = w / "converted"
    p.case("convert", "missing source", ["convert-pyreft", w / "nope", "--output-dir", out, *B], "no config.json")
    bad = w / "pyreft-badjson"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    p.case("convert", "config.json not JSON", ["convert-pyreft", bad, "--output-dir", out, *B], "not JSON")
    pickled = w / "pyreft-pickle"
    write_pyreft(pickled, [1])
    (key,) = pickled.glob("intkey_*.bin")
    torch.save({"rotate_layer": Path("not a tensor"), "weight": torch.zeros(1), "bias": torch.zeros(1)}, key)
    p.case("convert", "pickled object", ["convert-pyreft", pickled, "--output-dir", out, *B],
           "never unpickles anything but tensors")
    for damage in ("scale", "nan"):
        src = w / f"pyreft-{damage}"
        write_pyreft(src, [1])
        (key,) = src.glob("intkey_*.bin")
        state = torch.load(key, weights_only=True)
        state["rotate_layer"] = state["rotate_layer"] * (2 if damage == "scale" else float("nan"))
        torch.save(state, key)
        p.case("convert", f"rotation {damage}", ["convert-pyreft", src, "--output-dir", out, *B],
               "not orthonormal" if damage == "scale" else "NaN or infinite")
    p.case("convert", "bad positions", ["convert-pyreft", w / "pyreft", "--output-dir", out, "--positions", "x7", *B],
           "positions='x7' is not valid")
    two = w / "pyreft-two"
    write_pyreft(two, [1, 1])
    p.case("convert", "two per layer, one position group", ["convert-pyreft", two, "--output-dir", out,
                                                             "--positions", "f7", *B], "needs both")
    p.case("convert", "output holds other files", ["convert-pyreft", w / "pyreft", "--output-dir", w / "sentinel", *B],
           "not an adapter folder", keep=[w / "sentinel" / "notes.txt"])
    bare = w / "bare-base"
    tiny_llama().save_pretrained(bare)
    p.case("convert", "base without tokenizer", ["convert-pyreft", w / "pyreft", "--output-dir", out, "--model", bare],
           check=lambda o: "converted" in o)
    p.case("convert", "another hidden size", ["convert-pyreft", w / "pyreft", "--output-dir", w / "c2", "--model",
                                              w / "other-base"], "hidden size 64, this base model has 96")
    # -- explicit gates
    G = ["generate", "--prompt", "hi", "--max-new-tokens", "2", *B]
    p.case("gates", "wrong count", [*G, "--adapter", lib, "--gates", "1,0,0"], r"gates has shape \(1, 3\)")
    p.case("gates", "huge gates", [*G, "--adapter", lib, "--gates=1e30,1e30"], "between -1000 and 1000")
    p.case("gates", "nan gate", [*G, "--adapter", lib, "--gates", "nan,1"], "finite")
    p.case("gates", "unknown skill", [*G, "--adapter", lib, "--skills", "dance"], "unknown skill 'dance'")
    p.case("gates", "skills of an unnamed adapter", [*G, "--adapter", w / "unnamed", "--skills", "a"],
           "subspaces are not|pass gates instead")
    p.case("gates", "skills and gates", [*G, "--adapter", lib, "--skills", "sort", "--gates", "1,0"], "not both")
    p.case("gates", "gates without adapter", [*G, "--gates", "1,0"], "give --adapter")
    p.case("gates", "gates not numbers", [*G, "--adapter", lib, "--gates", "a,b"], "comma-separated numbers")
    p.case("gates", "a skill switched on", [*G, "--adapter", lib, "--skills", "upper"])
    p.case("gates", "eval nll under gates", ["eval", "--data", w / "train.jsonl", "--adapter", lib, "--gates", "0,1",
                                             "--method", "nll", *B],
           check=lambda o: "nan" not in o.lower() and "NLL/token" in o)
    # -- router-only training
    T = ["train", "--data", w / "train.jsonl", *B, "--max-steps", "2", "--batch-size", "4"]
    p.case("router", "adapter without router", [*T, "--init-adapter", w / "norouter", "--train", "router",
                                                "--output-dir", w / "r1"], "has no router")
    p.case("router", "shape option changed", [*T, "--init-adapter", lib, "--train", "router", "--rank", "8",
                                              "--output-dir", w / "r2"], "rank come")
    p.case("router", "missing library", [*T, "--init-adapter", w / "nope", "--train", "router",
                                         "--output-dir", w / "r3"], "nope.*missing")
    p.case("router", "pyreft folder as library", [*T, "--init-adapter", w / "pyreft", "--train", "router",
                                                  "--output-dir", w / "r4"], "csreft_config.json: missing")
    p.case("router", "train edits", [*T, "--init-adapter", lib, "--train", "edits", "--output-dir", w / "r5"],
           "invalid choice: 'edits'")
    p.case("router", "unknown skill", [*T, "--init-adapter", lib, "--train", "router", "--skill-routing", "--data",
                                       w / "other-skills.jsonl", "--output-dir", w / "r6"],
           r"skill\(s\) \['count'\] of .* are not among the adapter's skills")
    p.case("router", "unnamed library, skills from the data", [*T, "--init-adapter", w / "unnamed", "--train", "router",
                                                               "--skill-routing", "--output-dir", w / "r6b"],
           check=lambda o: "training done" in o)
    p.case("router", "router only", [*T, "--init-adapter", lib, "--train", "router", "--skill-routing",
                                     "--output-dir", w / "r7"], check=lambda o: "training done" in o)
    p.case("router", "into a folder with other files (they stay)", [*T, "--init-adapter", lib, "--train", "router",
                                                                     "--output-dir", w / "sentinel"],
           check=lambda o: (w / "sentinel" / "adapter" / "csreft_config.json").is_file(),
           keep=[w / "sentinel" / "notes.txt"])
    # -- data
    p.case("data", "offline", ["data", "--output", w / "d", "--suite", "classification"], "offline|reach|connect|Hub")
    p.case("data", "bad revision", ["data", "--output", w / "d", "--revision", "a=b=c"], "revision")
    p.case("data", "output is a file", ["data", "--output", w / "afile"], "afile", keep=[w / "afile"])
    # -- push
    p.case("push", "missing folder", ["push", w / "nope", "org/x"], "nope.*missing")
    tampered = w / "tampered"
    tampered.mkdir()
    for f in (lib / "csreft_config.json", lib / "csreft_model.safetensors"):
        (tampered / f.name).write_bytes(f.read_bytes())
    data = bytearray((tampered / "csreft_model.safetensors").read_bytes())
    data[-1] ^= 1
    (tampered / "csreft_model.safetensors").write_bytes(bytes(data))
    p.case("push", "tampered weights", ["push", tampered, "org/x"], "checksum mismatch")
    p.case("push", "bad repo id", ["push", lib, "not a repo id", *B], "repo|Repo")
    p.case("push", "offline", ["push", lib, "org/x", *B], "offline|Offline|connect|reach")
    # -- compare on files
    C = ["compare", *B, "--layers", "1", "--max-steps", "1", "--seeds", "1", "--output-dir", w / "cmp"]
    p.case("compare", "train without test", [*C, "--train", w / "train.jsonl"], "--test")
    p.case("compare", "records without skill", [*C, "--train", w / "noskill.jsonl", "--test", w / "noskill.jsonl"],
           "skill")
    p.case("compare", "unknown method", [*C, "--methods", "best"], "unknown method 'best'")
    p.case("compare", "bad variant", [*C, "--methods", "csreft[rank=0]"], "rank=0 is not valid")
    p.case("compare", "empty lr grid", [*C, "--lr-grid-reft", ","], "--lr-grid-reft")
    p.case("compare", "JSONL named .json", [*C, "--train", w / "lines.json", "--test", w / "lines.json"],
           "name it .jsonl")
    cfg = w / "cmp.yaml"
    cfg.write_text("seed: 3\n")
    p.case("compare", "unknown key in --config", [*C, "--config", cfg], "unknown option 'seed'; did you mean 'seeds'")
    p.case("compare", "zero seeds", [*C, "--seeds", "0"], "--seeds 0 is not valid")


def main_(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows and counts here")
    args = parser.parse_args(argv)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        p = Pass(Path(tmp))
        with contextlib.redirect_stderr(io.StringIO()):
            build_world(p.work)
        cases(p)
    counts = Counter(r["verdict"] for r in p.rows)
    print(f"\n{len(p.rows)} cases in {time.time() - started:.0f} s: " +
          ", ".join(f"{k} {counts.get(k, 0)}" for k in ("ok", "traceback", "unclear", "silent bad", "data loss")))
    if args.json:
        Path(args.json).write_text(json.dumps({"counts": dict(counts), "rows": p.rows}, indent=1) + "\n")
    return 0 if counts.get("ok", 0) == len(p.rows) else 1


if __name__ == "__main__":
    sys.exit(main_())
