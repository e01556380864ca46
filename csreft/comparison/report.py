"""The comparison's report: numbers from the runs (report.json), a readable table (report.md)
and gate heatmaps. Written after every run, so an interrupted comparison keeps its results."""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import asdict
from pathlib import Path

from ..evaluation.stats import paired_over_seeds

JOINT_KINDS = ("loreft", "csreft", "csreft_supervised", "lora", "lora_edits")
REFERENCES = ("loreft", "lora", "lora_edits", "specialists", "base")


def plot_gates(matrix, skills, path: Path, title: str) -> None:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(matrix[0]), 1.0 + 0.45 * len(skills)))
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(matrix[0])), [f"s{i}" for i in range(len(matrix[0]))])
    ax.set_yticks(range(len(skills)), skills)
    for (i, j), v in np.ndenumerate(np.array(matrix)):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("subspace")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLATEAU_GAIN = 0.01  # plateaued: less than 1 point of validation accuracy gained over the last quarter


def plateau(curve: list[dict], planned: int | None = None) -> dict:
    """Where a learning curve [{"step", "accuracy"}, ...] levels off. gain_last_quarter: the last
    point's accuracy minus that of the last point at or before 3/4 of the `planned` steps (default:
    the last point's step), None when that is the last point (a curve ending that early says
    nothing of its last quarter); plateaued: that gain < PLATEAU_GAIN; step: the first point that
    no later point beats by PLATEAU_GAIN."""
    steps, acc = [p["step"] for p in curve], [p["accuracy"] for p in curve]
    quarter = max(i for i, s in enumerate(steps) if s <= 0.75 * max(planned or 0, steps[-1]))
    gain = acc[-1] - acc[quarter] if quarter < len(steps) - 1 else None
    first = next(i for i in range(len(acc)) if max(acc[i:]) - acc[i] < PLATEAU_GAIN)
    return {"gain_last_quarter": gain, "plateaued": None if gain is None else gain < PLATEAU_GAIN,
            "step": steps[first], "final": acc[-1], "best": max(acc), "quarter_step": steps[quarter]}


def gain_ci(curves: list[list[dict]], step: int) -> list[float] | None:
    """95% CI of the gain from `step` to the runs' end, in the curves' own measure (the mean of the
    per-skill accuracies, then of the seeds): a bootstrap over validation records, each record
    carrying every seed's pair of answers (the seeds share the records). None when a curve lacks
    the per-record answers (runs saved before they were kept), the point, or the same records."""
    pairs = []
    for c in curves:
        at = {p["step"]: p for p in c[:-1]}
        if step not in at or not isinstance(at[step].get("correct"), dict) or \
                not isinstance(c[-1].get("correct"), dict):
            return None
        pairs.append((at[step]["correct"], c[-1]["correct"]))
    shape = {k: len(v) for k, v in pairs[0][0].items()}
    if not shape or any({k: len(v) for k, v in side.items()} != shape for pair in pairs for side in pair):
        return None
    n = sum(shape.values())
    # a record of skill s weighs n / (k n_s): the records' plain mean is then the skills' mean
    weights = [n / (len(shape) * n_s) for n_s in shape.values() for _ in range(n_s)]

    def weighted(answers: dict) -> list[float]:
        return [w * float(x) for w, x in zip(weights, (x for skill in shape for x in answers[skill]))]

    return paired_over_seeds([weighted(a) for _, a in pairs], [weighted(b) for b, _ in pairs])["ci95"]


def mean_curve(curves: list[list[dict]]) -> list[dict]:
    """The seeds' mean accuracy at the steps every curve has. Runs of one report have one planned
    length, but a run ends a few steps short where its stream held records that do not fit
    --max-length (they are dropped): ends within 5% of the latest, past every common step, are
    averaged together at the latest of them."""
    ends = [c[-1]["step"] for c in curves]
    last_common = max(set.intersection(*(set(p["step"] for p in c[:-1]) for c in curves)), default=-1)
    merge = min(ends) > last_common and max(ends) - min(ends) <= 0.05 * max(ends)
    at = [{p["step"]: p["accuracy"] for p in (c[:-1] if merge else c)} for c in curves]
    common = sorted(set.intersection(*(set(a) for a in at)))
    out = [{"step": s, "accuracy": statistics.mean(a[s] for a in at)} for s in common]
    if merge:
        out.append({"step": max(ends), "accuracy": statistics.mean(c[-1]["accuracy"] for c in curves)})
    return out


def plot_curves(curves: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, curve in curves.items():
        ax.plot([p["step"] for p in curve], [100 * p["accuracy"] for p in curve], marker="o", ms=3, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, suite, runs, *args) -> dict:
    report = build_report(suite, {m: r for m, r in runs.items() if r}, *args)
    curves = {label: m["curve"] for label, m in report["methods"].items() if m.get("curve")}
    if curves:
        plot_curves(curves, out / "curves.png", f"{suite.name}: validation accuracy while training "
                                                f"(mean of {len(report['seeds'])} seed(s))")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(render_markdown(report))
    return report


def _mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _ms(values) -> dict:
    return dict(zip(("mean", "sd"), _mean_sd(values)))


def _pairs(kinds: dict) -> list[tuple[str, str]]:
    """Every routed method against each reference present, then LoReFT and LoRA against theirs."""
    first, every = {}, {}
    for label, kind in kinds.items():
        first.setdefault(kind, label)
        every.setdefault(kind, []).append(label)
    # one reference of each kind; every specialists method (rank k r, rank r) is a reference of its own
    refs = [x for r in REFERENCES for x in (every.get(r, []) if r == "specialists" else every.get(r, [])[:1])]
    pairs = []
    for label, kind in kinds.items():
        if kind in ("csreft", "csreft_supervised"):
            pairs += [(label, r) for r in ([first["csreft"]] if label != first.get("csreft") and "csreft" in first else [])
                      + refs]
    pairs += [(first["loreft"], spec) for spec in every.get("specialists", []) if "loreft" in first]
    for a, b in (("lora", "loreft"), ("lora_edits", "loreft")):
        if a in first and b in first:
            pairs.append((first[a], first[b]))
    return pairs


def build_report(suite, runs, params, base, opts, max_steps, wall, configs, kinds, selection) -> dict:
    base_params = sum(p.numel() for p in base.parameters())
    run_seconds = sum(r["train_seconds"] + r["seconds"] for rs in runs.values() for r in rs)  # each run once
    # the frozen base has no seed: its one scoring stands for every seed the trained methods have
    n_seeds = max((len(rs) for label, rs in runs.items() if kinds[label] != "base"), default=opts.seeds)
    runs = {label: rs[:1] * n_seeds if kinds[label] == "base" else rs for label, rs in runs.items()}
    methods = {}
    for label, results in runs.items():
        per_skill = {s: _mean_sd([r["per_skill"][s]["accuracy"] for r in results if s in r["per_skill"]])
                     for s in suite.skills}
        sel = selection.get(label) or (selection.get("loreft") if kinds[label] == "specialists" else None)
        methods[label] = {
            "kind": kinds[label],
            "per_skill": {s: {"mean": m, "sd": sd} for s, (m, sd) in per_skill.items()},
            "accuracy": _ms([r["accuracy"] for r in results]),
            "composed_accuracy": _ms([r.get("composed_accuracy") for r in results]),
            "trainable_parameters": params.get(label, 0),
            "edit_parameters": results[0].get("edit_parameters"),
            "percent_of_base": 100.0 * params.get(label, 0) / base_params,
            "train_seconds": statistics.mean(r["train_seconds"] for r in results),
            "eval_seconds": statistics.mean(r["seconds"] for r in results),
            "per_seed_accuracy": [r["accuracy"] for r in results],
            "seeds": len(results),
            "lr": results[0].get("lr"),
            "validation_accuracy": (sel["validation_accuracy"].get(str(sel["lr"])) if sel else None),
            "lr_selection": sel,
            "routing_nmi": _ms([r["routing"]["nmi"] for r in results if "routing" in r]),
            "routing_soft_nmi": _ms([r["routing"]["soft_nmi"] for r in results if "routing" in r]),
            "gates": [r["gates"] for r in results if "gates" in r],
            "by_group": {g: {"micro_accuracy": _ms([r["by_group"][g]["micro_accuracy"] for r in results]),
                             "routing_nmi": _ms([r["by_group"][g]["routing"]["nmi"] for r in results
                                                 if "routing" in r["by_group"][g]])}
                         for g in sorted(results[0].get("by_group", {}))},
            "lora_rank": results[0].get("lora_rank"),
            "examples_per_skill": [r["examples_per_skill"] for r in results if "examples_per_skill" in r],
        }
        curves = [r["curve"] for r in results if r.get("curve")]
        if curves:
            methods[label]["curve"] = mean_curve(curves)
            p = methods[label]["plateau"] = plateau(methods[label]["curve"], max_steps)
            p["gain_ci95"] = gain_ci(curves, p["quarter_step"]) if p["gain_last_quarter"] is not None else None
    by_reference = {}  # per specialists method (e.g. rank k r and rank r), per joint method
    for spec_label, spec in methods.items():
        if spec["kind"] != "specialists":
            continue
        table = by_reference[spec_label] = {}
        for label, m in methods.items():
            if m["kind"] not in JOINT_KINDS:
                continue
            diffs = {s: spec["per_skill"][s]["mean"] - m["per_skill"][s]["mean"]
                     for s in suite.skills if spec["per_skill"][s]["mean"] is not None
                     and m["per_skill"][s]["mean"] is not None}
            table[label] = {"per_skill": diffs, "mean": statistics.mean(diffs.values()) if diffs else None}
    interference = next(iter(by_reference.values()), {})  # against the first specialists listed
    tests = []
    for a, b in _pairs({label: kinds[label] for label in runs}):
        n_seeds = min(len(runs[a]), len(runs[b]))
        try:
            t = paired_over_seeds([r["correct"] for r in runs[a][:n_seeds]],
                                  [r["correct"] for r in runs[b][:n_seeds]])
        except ValueError:  # other test records, or none that both answered: nothing to pair
            continue
        tests.append({"a": a, "b": b, **t})
    return {
        "suite": suite.name, "skills": suite.skills, "suite_info": suite.info, "eval_split": opts.eval_split,
        "sizes": {"train": len(suite.train), "test": len(suite.test), "composed": len(suite.composed),
                  "validation_per_skill": opts.val_per_skill},
        # the seeds this report holds (fewer than asked for while a comparison is unfinished)
        "seeds": list(range(max(len(r) for r in runs.values()))), "seeds_planned": opts.seeds,
        "max_steps": max_steps, "batch_size": opts.batch_size,
        "specialist_batch_size": opts.specialist_batch_size or opts.batch_size,
        "examples_seen_per_joint_run": max_steps * opts.batch_size,
        "methods": methods, "interference": interference, "interference_by_reference": by_reference,
        "paired_tests": tests,
        "configs": configs, "options": asdict(opts), "wall_seconds": wall, "report_only": opts.report_only,
        "run_seconds": run_seconds,
        "base_parameters": base_params,
        "model": opts.model or "smollm2-135m-instruct",
    }


def _fmt(mean, sd=None, pct=True):
    if mean is None:
        return "n/a"
    scale = 100 if pct else 1
    digits = 1 if pct else 2
    return f"{mean * scale:.{digits}f}" + (f" ± {sd * scale:.{digits}f}" if sd else "")


def render_markdown(r: dict) -> str:
    skills = r["skills"]
    split = r.get("eval_split", "test")
    lines = [
        f"# CS-ReFT comparison: {r['suite']} suite",
        "",
        f"Model {r['model']}; {r['sizes']['train']} train records ({r['sizes']['validation_per_skill']} per skill "
        f"held out for validation) / {r['sizes']['test']} test / {r['sizes']['composed']} composed; scored on "
        f"{split}; seeds {r['seeds']}{_unfinished(r)}; {r['max_steps']} steps x batch {r['batch_size']} = "
        f"{r['examples_seen_per_joint_run']} examples per joint run; {_time(r)}. "
        "Accuracy in % (mean ± sd over seeds); lr chosen on validation unless fixed; NMI: routing NMI "
        "between skill and strongest gate (soft NMI in the routing table).",
        "",
        *_head("method", *skills, "mean", "composed", "NMI", "lr", "val", "trainable", "PE%", "train s", "eval s"),
    ]
    for name, m in r["methods"].items():
        cells = [_fmt(m["per_skill"][s]["mean"], m["per_skill"][s]["sd"]) for s in skills]
        label = name + (f" (r={m['lora_rank']})" if m.get("lora_rank") else "")
        if m.get("seeds", len(r["seeds"])) != len(r["seeds"]):
            label += f" ({m['seeds']} seed{'s' if m['seeds'] > 1 else ''})"
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {_fmt(m['accuracy']['mean'], m['accuracy']['sd'])} | "
            f"{_fmt(m['composed_accuracy']['mean'])} | {_fmt(m['routing_nmi']['mean'], None, False)} | "
            f"{'' if m['lr'] is None else format(m['lr'], 'g')} | {_fmt(m['validation_accuracy'])} | "
            f"{m['trainable_parameters']:,} | {m['percent_of_base']:.4f} | {m['train_seconds']:.0f} | "
            f"{m['eval_seconds']:.0f} |")
    routed = {n: m for n, m in r["methods"].items() if m["gates"]}
    if routed:
        lines += ["", "Routing (on the scored split): NMI(skill; strongest gate) and soft NMI (gate vectors), "
                  "mean ± sd over seeds; 0 = the same gates for every skill, 1 = one subspace group per skill.", "",
                  *_head("method", "NMI", "soft NMI", "heatmaps")]
        for name, m in routed.items():
            maps = ", ".join(f"gates-{_slug(name)}-seed{s}.png" for s in r["seeds"][:len(m["gates"])])
            lines.append(f"| {name} | {_fmt(m['routing_nmi']['mean'], m['routing_nmi']['sd'], False)} | "
                         f"{_fmt(m['routing_soft_nmi']['mean'], m['routing_soft_nmi']['sd'], False)} | {maps} |")
    grouped = {n: m for n, m in r["methods"].items() if m.get("by_group")}
    if grouped:
        groups = sorted({g for m in grouped.values() for g in m["by_group"]})
        lines += ["", "By test group (the paraphrase suite: instructions seen in training or held out): "
                  "micro accuracy in %, routing NMI; mean over seeds.", "",
                  *_head("method", *(f"{g} {what}" for g in groups for what in ("acc", "NMI")))]
        for name, m in grouped.items():
            cells = []
            for g in groups:
                v = m["by_group"].get(g, {})
                cells += [_fmt(v.get("micro_accuracy", {}).get("mean")),
                          _fmt(v.get("routing_nmi", {}).get("mean"), None, False)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    curved = {n: m for n, m in r["methods"].items() if m.get("curve")}
    if curved:
        lines += ["", f"Learning curves (validation accuracy in %, mean over seeds; curves.png). Plateaued: less "
                  f"than {100 * PLATEAU_GAIN:g} point gained over the last quarter of the steps (from the last "
                  f"point at or before 3/4 of the planned steps; 95% CI: a bootstrap over the validation records, with "
                  f"every seed's answers, where kept); plateau step: the first point no later one beats by {100 * PLATEAU_GAIN:g} point.", "",
                  *_head("method", "steps", "start", "best", "final", "gain, last quarter", "plateaued", "plateau step")]
        for name, m in curved.items():
            p = m["plateau"]
            lines.append(f"| {name} | {m['curve'][-1]['step']} | {_fmt(m['curve'][0]['accuracy'])} | {_fmt(p['best'])} | "
                         f"{_fmt(p['final'])} | {_gain(p)} | {_PLATEAUED[p['plateaued']]} | "
                         f"{p['step']} |")
    for spec_label, table in r.get("interference_by_reference", {"specialists": r["interference"]}).items():
        if not table:
            continue
        rank = r["configs"].get(spec_label, r["configs"]["loreft"])["rank"]
        lines += ["", f"Interference against {spec_label} (one LoReFT of rank {rank} per skill) = specialist "
                  "accuracy - joint accuracy (points; positive = the joint run lost accuracy to sharing).", "",
                  *_head("method", *skills, "mean")]
        for name, v in table.items():
            cells = [f"{v['per_skill'][s] * 100:+.1f}" if s in v["per_skill"] else "n/a" for s in skills]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {v['mean'] * 100:+.1f} |")
    if r["interference"]:
        seen = next(m for m in r["methods"].values() if m["kind"] == "specialists")["examples_per_skill"]
        if seen:
            per = {s: statistics.mean(e[s] for e in seen) for s in skills}
            bs = r.get("specialist_batch_size", r["batch_size"])
            lines += ["", f"Each specialist saw its skill's share of the joint stream, at batch size {bs}: " +
                      ", ".join(f"{s} {n:.0f} examples ({math.ceil(n / bs)} steps)" for s, n in per.items()) + "."]
    if r["paired_tests"]:
        lines += ["", "Paired tests on the same test records (difference = a - b, points). With several seeds a "
                  "record's difference is its mean over the seeds; the CI is a bootstrap over records and p a "
                  "sign-flip test of those differences (McNemar's test for one seed); per seed: each seed's "
                  "difference.", "",
                  *_head("a", "b", "records x seeds", "difference (95% CI)", "p", "per seed")]
        for t in r["paired_tests"]:
            lines.append(f"| {t['a']} | {t['b']} | {t['n']} x {t['seeds']} | {t['accuracy_difference'] * 100:+.1f} "
                         f"({t['ci95'][0] * 100:+.1f}, {t['ci95'][1] * 100:+.1f}) | {_p(t['p'])} | "
                         + ", ".join(f"{d * 100:+.1f}" for d in t["per_seed"]) + " |")
    chosen = {n: m["lr_selection"] for n, m in r["methods"].items() if m["lr_selection"] and m["kind"] != "specialists"}
    if chosen:
        lines += ["", "Learning rates: validation accuracy (%) per grid value, seed 0, "
                  f"{next(iter(chosen.values()))['steps']} steps each; the best is used (ties: the smaller).", "",
                  *_head("method", "lr grid: validation accuracy", "chosen")]
        for n, s in chosen.items():
            grid = ", ".join(f"{float(lr):g}: {100 * acc:.1f}" for lr, acc in s["validation_accuracy"].items())
            lines.append(f"| {n} | {grid} | {s['lr']:g} |")
    lines += ["", "Configurations, options and per-example results: report.json and runs/*/result.json.", ""]
    return "\n".join(lines)


_PLATEAUED = {True: "yes", False: "no", None: "n/a"}


def _p(p: float) -> str:
    """A p-value to two digits; below 0.001 as such (a 2,000-flip sign-flip test cannot say more)."""
    return "< 0.001" if p < 0.001 else f"{p:.2g}"


def _gain(p: dict) -> str:
    """A curve's last-quarter gain in points, from which step, with its CI where the answers are kept."""
    if p["gain_last_quarter"] is None:
        return f"n/a (the curve ends at step {p['quarter_step']})"
    ci = p.get("gain_ci95")
    return (f"{100 * p['gain_last_quarter']:+.1f}" + (f" from step {p['quarter_step']}" if "quarter_step" in p else "")
            + (f" ({100 * ci[0]:+.1f}, {100 * ci[1]:+.1f})" if ci else ""))


def _head(*cells: str) -> list[str]:
    """A Markdown table's header and delimiter rows, of one width (else GitHub shows the table as text)."""
    return ["| " + " | ".join(cells) + " |", "|---" * len(cells) + "|"]


def _unfinished(r: dict) -> str:
    """' of 3 planned (unfinished)' while any method holds fewer seeds than were asked for."""
    planned = r.get("seeds_planned", len(r["seeds"]))
    short = sum(m.get("seeds", len(r["seeds"])) < planned for m in r["methods"].values())
    if not short:
        return ""
    some = f": {short} of {len(r['methods'])} methods have fewer" if short < len(r["methods"]) else ""
    return f" of {planned} planned (unfinished{some})"


def _time(r: dict) -> str:
    if r.get("report_only"):  # this process only read finished runs
        return f"rebuilt from finished runs (their training and scoring: {r['run_seconds'] / 60:.1f} min)"
    return f"wall time {r['wall_seconds'] / 60:.1f} min"


def _slug(label: str) -> str:
    """A file-name form of a method label: csreft[gating=hard] -> csreft-gating=hard."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label.replace("[", "-").replace("]", "")).strip("_")


def summary_lines(r: dict) -> list[str]:
    """What the terminal shows at the end: the main table and a two-line reading."""
    lines = [f"\n{r['suite']} suite, {r['max_steps']} steps x batch {r['batch_size']}, seeds {len(r['seeds'])}"
             f"{_unfinished(r)}, "
             f"scored on {len(r['seeds'])} x {r['sizes']['test'] if r.get('eval_split', 'test') == 'test' else 'validation'} records:",
             f"{'method':<44}{'accuracy':>10}{'composed':>10}{'routing NMI':>13}{'lr':>8}"]
    for name, m in r["methods"].items():
        lr = "" if m["lr"] is None else format(m["lr"], "g")
        lines.append(f"{name[:43]:<44}{_fmt(m['accuracy']['mean']):>10}{_fmt(m['composed_accuracy']['mean']):>10}"
                     f"{_fmt(m['routing_nmi']['mean'], None, False):>13}{lr:>8}")
    lines += ["", *reading(r)]
    return lines


def reading(r: dict) -> list[str]:
    """Two sentences: how the first CS-ReFT method did against LoReFT, and whether it routed."""
    methods = r["methods"]
    cs = next((n for n, m in methods.items() if m["kind"] == "csreft"), None)
    if cs is None:
        return ["No CS-ReFT run in this comparison."]
    test = next((t for t in r["paired_tests"] if t["a"] == cs and methods[t["b"]]["kind"] == "loreft"), None)
    if test is None:
        first = "CS-ReFT ran without a LoReFT reference, so no paired test."
    else:
        lo, hi = test["ci95"]
        verdict = ("significantly better than" if lo > 0 else "significantly worse than" if hi < 0
                   else "not distinguishable from")
        first = (f"Reading: CS-ReFT ({cs}) is {verdict} one LoReFT edit with the same edit parameters: "
                 f"{test['accuracy_difference'] * 100:+.1f} points (95% CI {lo * 100:+.1f} to {hi * 100:+.1f}, "
                 f"{test['n']} paired answers).")
    nmi = methods[cs]["routing_nmi"]["mean"]
    if nmi is None:
        second = "Its router was not measured."
    else:
        how = ("gives each skill subspaces of its own" if nmi >= 0.7 else
               "partly separates the skills" if nmi >= 0.3 else "gives nearly the same gates to every skill")
        second = f"Its router {how} (routing NMI {nmi:.2f}; 1 = one subspace group per skill)."
    return [first, second]
