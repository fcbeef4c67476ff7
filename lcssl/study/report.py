"""The study's report: RESULTS.md, the plot, and every run as JSON / CSV, from the records alone."""
from __future__ import annotations

import csv
import io
import pathlib
from typing import Sequence

import numpy as np

from lcssl.files import atomic_write_bytes, write_json
from lcssl.study.plan import BASELINE, ORACLE
from lcssl.study.stats import (MIN_SEEDS, _mean_std, _pm, _pm_ci, best_arm, paired_differences, per_class_iou,
                                summarize)

PLOT_NAME = "results_label_efficiency.png"


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (90, 90, 200),
            (200, 90, 90))


def plot(summary: dict, labels: dict, fractions: Sequence[float], path: pathlib.Path) -> None:
    """mIoU vs label fraction (log scale), one line per method with +- std error bars, as a PNG.

    Drawn with Pillow (installed with TensorBoard): matplotlib is not among the requirements.
    """
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 900, 560, 70, 330, 40, 60
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    lines = {arm: [(f, *summary[(arm, f)]["miou"][:2]) for f in fractions if (arm, f) in summary]
             for arm in labels}
    lines = {arm: pts for arm, pts in lines.items() if pts}
    highs = [m + (0 if np.isnan(s) else s) for pts in lines.values() for _, m, s in pts]
    y_max = max(10.0, 10 * np.ceil(max(highs, default=10.0) / 10))
    log_f = np.log10(np.asarray(fractions, np.float64))
    lo, hi = (log_f.min() - 0.15, log_f.max() + 0.15) if len(log_f) else (-2.0, 0.0)

    def xy(fraction, miou):
        x = left + (np.log10(fraction) - lo) / (hi - lo) * (width - left - right)
        y = height - bottom - miou / y_max * (height - top - bottom)
        return float(x), float(y)

    x0, y0 = xy(10 ** lo, 0)
    x1, y1 = xy(10 ** hi, y_max)
    draw.rectangle([x0, y1, x1, y0], outline="black")
    for tick in np.linspace(0, y_max, 6):
        _, y = xy(10 ** lo, tick)
        draw.line([x0, y, x1, y], fill=(225, 225, 225))
        draw.text((x0 - 35, y - 6), f"{tick:.0f}", fill="black")
    for f in fractions:
        x, _ = xy(f, 0)
        draw.line([x, y0, x, y0 + 5], fill="black")
        draw.text((x - 12, y0 + 8), f"{100 * f:g}%", fill="black")
    draw.text((x0, y0 + 30), "labelled training patches used (log scale)", fill="black")
    draw.text((x0, 12), "test mIoU (%), mean +- std over seeds", fill="black")
    for i, (arm, pts) in enumerate(lines.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        xys = [xy(f, m) for f, m, _ in pts]
        if len(xys) > 1:
            draw.line(xys, fill=colour, width=2)
        for (f, m, s), (x, y) in zip(pts, xys):
            if not np.isnan(s):
                _, ya = xy(f, m + s)
                _, yb = xy(f, max(m - s, 0.0))
                draw.line([x, ya, x, yb], fill=colour, width=1)
                draw.line([x - 4, ya, x + 4, ya], fill=colour)
                draw.line([x - 4, yb, x + 4, yb], fill=colour)
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        ly = top + 18 * i
        draw.line([width - right + 15, ly + 6, width - right + 40, ly + 6], fill=colour, width=3)
        draw.text((width - right + 46, ly), labels[arm], fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _budget_section(records: Sequence[dict], meta: dict) -> list[str]:
    """The compute budget as configured and as run (steps, epochs, why runs stopped)."""
    budget = meta.get("budget") or {}
    lines = ["", "## Budget", "",
             f"The same for every method. Pre-training: `{' '.join(budget.get('pretrain', []))}` plus "
             "each method's own flags (batch size, optimizer). Fine-tuning: "
             f"`{' '.join(budget.get('finetune', []))}`"
             + ("".join(f"{'; at most ' if i == 0 else ', '}{steps} steps at {100 * f:g}%"
                        for i, (f, steps) in enumerate(budget.get("finetune_steps") or [])))
             + "; the checkpoint with the best validation mIoU is scored on test.", ""]
    pre = [r for r in records if r.get("kind") == "pretrain" and r["status"] == "done"]
    if pre:
        lines += ["| pre-training | seed | steps | epochs | last loss | last probe accuracy | stopped early |",
                  "|---|---|---|---|---|---|---|"]
        for r in pre:
            curves = r.get("curves") or {}
            epochs = curves.get("train/epoch") or [[0, float("nan")]]
            loss = curves.get("train/loss") or [[0, float("nan")]]
            probe = (r.get("probe") or {}).get("accuracy")
            stop = r.get("early_stop") or {}
            lines.append(f"| {r['arm']} | {r.get('seed')} | {r.get('steps')} | {epochs[-1][1]:.1f} | "
                         f"{loss[-1][1]:.3f} | {'-' if probe is None else f'{probe:.3f}'} | "
                         f"{stop.get('reason') if stop.get('stopped') else 'no'} |")
        lines.append("")
    ft = [r for r in records if r.get("kind", "finetune") == "finetune" and r["status"] == "done"
          and r.get("steps") is not None]
    if ft:
        by_cell = {}
        for r in ft:
            by_cell.setdefault((r["arm"], r["label_fraction"]), []).append(r)
        lines += ["Did fine-tuning converge? A run whose best validation came at its step budget may "
                  "have had more to give.", "",
                  "| fine-tuning | at | runs | steps run (mean, min-max) | best-validation step (mean, min-max) "
                  "| best at the step budget | stopped early |", "|---|---|---|---|---|---|---|"]
        for (arm, f), rows in sorted(by_cell.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            steps = [r["steps"] for r in rows]
            best = [r["best_step"] for r in rows if r.get("best_step") is not None]
            at_end = sum(r.get("best_step") is not None and r.get("num_steps") is not None
                         and r["best_step"] >= r["num_steps"] for r in rows)
            early = sum(bool((r.get("early_stop") or {}).get("stopped")) for r in rows)
            best_txt = f"{np.mean(best):.0f} ({min(best)}-{max(best)})" if best else "-"
            lines.append(f"| {arm} | {100 * f:g}% | {len(rows)} | {np.mean(steps):.0f} ({min(steps)}-{max(steps)}) | "
                         f"{best_txt} | {at_end} of {len(rows)} | {early} of {len(rows)} |")
    return lines


def _pretraining_section(records: Sequence[dict], labels: dict) -> list[str]:
    """Each pre-training's health over time (loss, online probe vs the commonest class), and the
    same probe on encoders trained with labels: what the probe can tell apart."""
    pre = [r for r in records if r.get("kind") == "pretrain" and r["status"] == "done"]
    lines = []
    if pre:
        lines += ["## Pre-training curves", "",
                  "Online linear probe: ridge classifier (ridge chosen by 5-fold cross-validation on the "
                  "labelled training patches) on the frozen pooled embedding, predicting each validation "
                  "patch's majority class; 'commonest' always guesses the commonest training class.", ""]
        for r in pre:
            curves = r.get("curves") or {}
            loss = dict(map(tuple, curves.get("train/loss", [])))
            epoch = dict(map(tuple, curves.get("train/epoch", [])))
            base = dict(map(tuple, curves.get("probe/baseline_accuracy", [])))
            # steps per epoch from the logged epoch counter (train/epoch = step / steps_per_epoch)
            per_epoch = next((s / e for s, e in epoch.items() if e), None)
            lines += [f"**{labels.get(r['arm'], r['arm'])}**", "",
                      "| step | epoch | loss | probe accuracy | commonest class |", "|---|---|---|---|---|"]
            for step, acc in curves.get("probe/accuracy", []):
                # the loss logged at this step, or the last one logged before it (its step shown)
                at = max((s for s in loss if s <= step), default=None)
                shown = "-" if at is None else (f"{loss[at]:.4f}" if at == step else f"{loss[at]:.4f} (step {at})")
                lines.append(f"| {step} | {step / per_epoch if per_epoch else float('nan'):.1f} | {shown} | "
                             f"{acc:.3f} | {base.get(step, float('nan')):.3f} |")
            lines.append("")
    sup = [r for r in records if r.get("kind", "finetune") == "finetune" and r["status"] == "done"
           and (r.get("probe") or {}).get("accuracy") is not None and not r["arm"].endswith("_linear")
           and r["arm"].startswith("scratch")]
    if sup:
        lines += ["The same probe on the encoders of from-scratch runs (trained with labels), as a "
                  "check that it can tell a useful encoder from a useless one:", "",
                  "| encoder | label fraction | runs | probe accuracy | commonest class |", "|---|---|---|---|---|"]
        cells = {}
        for r in sup:
            cells.setdefault((r["arm"], r["label_fraction"]), []).append(r["probe"])
        for (arm, f), probes in sorted(cells.items()):
            lines.append(f"| {labels.get(arm, arm)} | {100 * f:g}% | {len(probes)} | "
                         f"{_pm(_mean_std([100 * p['accuracy'] for p in probes]))} | "
                         f"{_pm(_mean_std([100 * p['baseline_accuracy'] for p in probes]))} |")
        lines.append("")
    return lines


# The study's goal: the best pre-trained method beats from scratch by at least GOAL_POINTS mIoU at
# every label fraction under 100%, the 95% interval of the paired difference above 0, and closes at
# least GOAL_GAP of the oracle's gain at 10% labels.
GOAL_POINTS, GOAL_GAP = 5.0, 0.6


def _answer(summary: dict, labels: dict, meta: dict, fractions: Sequence[float]) -> list[str]:
    """'Does pre-training pay?' in figures: per label fraction under 100%, the best pre-trained
    method's paired difference with its interval and share of the oracle's gain, against the goal."""
    pretrained = meta.get("pretrained_arms") or []
    few = [f for f in fractions if f < 1.0]
    if not pretrained or not few:
        return []
    lines = ["", "## The answer", "",
             f"Goal: the best pre-trained method beats from scratch by >= {GOAL_POINTS:g} mIoU points "
             f"at each label fraction under 100%, with the 95% interval of the paired difference above "
             f"0, over >= {MIN_SEEDS} seeds, and closes >= {100 * GOAL_GAP:.0f}% of the oracle's "
             "gain at 10% labels.", "",
             "| labels | best pre-trained method | seeds | paired difference [95% CI] | share of the oracle's gain | goal |",
             "|---|---|---|---|---|---|"]
    for f in few:
        cells = {a: v for (a, g), v in summary.items() if g == f and a in pretrained and v["diff"][2] >= MIN_SEEDS}
        oracle = summary.get((ORACLE, f))
        oracle_txt = "" if not oracle or oracle["diff"][2] < MIN_SEEDS else f"; oracle {_pm_ci(oracle)}"
        if not cells:
            lines.append(f"| {100 * f:g}% | pending | - | -{oracle_txt} | - | not yet measured |")
            continue
        arm = max(cells, key=lambda a: cells[a]["diff"][0])
        c = cells[arm]
        met = (c["diff"][0] >= GOAL_POINTS and c["ci"][0] > 0 and c["diff"][2] >= MIN_SEEDS
               and (f != 0.1 or (np.isfinite(c["gap"]) and c["gap"] >= GOAL_GAP)))
        gap = f"{100 * c['gap']:.0f}%" if np.isfinite(c["gap"]) else "-"
        lines.append(f"| {100 * f:g}% | {labels.get(arm, arm)} | {c['diff'][2]} | {_pm_ci(c)}{oracle_txt} | "
                     f"{gap} | {'met' if met else 'not met'} |")
    return lines


def _screen_section(records: Sequence[dict], labels: dict, meta: dict) -> list[str]:
    """Pre-trained methods with 1 to MIN_SEEDS - 1 seeds: each seed's paired difference beside the
    oracle's of the same seed. It ranks which methods get more seeds; it is not a result."""
    pretrained = set(meta.get("pretrained_arms") or [])
    by_seed = paired_differences(records)
    rows = sorted(((f, -float(np.mean(list(d.values()))), arm, d) for (arm, f), d in by_seed.items()
                   if arm in pretrained and 0 < len(d) < MIN_SEEDS), key=lambda row: row[:2])
    if not rows:
        return []
    lines = ["", f"## Screening: methods with fewer than {MIN_SEEDS} seeds (no claim)", "",
             "Each seed's paired difference to from scratch (test mIoU points, method / oracle of the same "
             f"seed), best first. It decides which methods get more seeds; a figure needs {MIN_SEEDS}.", "",
             "| labels | method | per seed (method / oracle) | mean | share of the oracle's gain, same seeds |",
             "|---|---|---|---|---|"]
    for f, minus_mean, arm, diffs in rows:
        oracle = by_seed.get((ORACLE, f), {})
        seeds = "; ".join(f"seed {s}: {d:+.1f}" + (f" / {oracle[s]:+.1f}" if s in oracle else "")
                          for s, d in diffs.items())
        gain = [oracle[s] for s in diffs if s in oracle]
        share = (f"{100 * -minus_mean / np.mean(gain):.0f}%" if len(gain) == len(diffs) and np.mean(gain) > 0
                 else "-")
        lines.append(f"| {_frac(f)} | {labels.get(arm, arm)} | {seeds} | {-minus_mean:+.1f} | {share} |")
    return lines


def _frac(f: float) -> str:
    return f"{100 * f:g}%"


def _header(meta: dict) -> list[str]:
    """Who made the report, on what, how long it took, what the seeds mean."""
    wall, par = meta["wall_seconds_this_invocation"], meta.get("parallel", 1)
    steps_s = meta.get("train_steps_seconds_this_invocation")
    share = ("" if not steps_s or not meta.get("runs_this_invocation") else
             f" Training steps took {100 * steps_s / (wall * par):.0f}% of this invocation's "
             f"worker time ({par} worker(s) x wall time); the other "
             f"{100 - 100 * steps_s / (wall * par):.0f}% went to start-up, compilation, evaluation, "
             "checkpoints and idle workers.")
    seeds_note = ("pre-training and fine-tuning seeds both vary" if meta.get("pretrain_per_seed", True)
                  else f"one pre-training per method (seed {meta['seeds'][0]}), shared by every "
                       "fine-tuning seed: the std is over fine-tuning seeds only")
    return ["# Label-efficiency study", "",
            f"Produced by `{meta['command']}` on {meta['date']}, commit {meta['commit']}, machine "
            f"{meta['machine']}. Wall time of this invocation {_fmt_duration(wall)} with {par} worker(s); "
            f"all runs together {_fmt_duration(meta['run_seconds_total'])}; load average at the end "
            f"{meta.get('load_average_at_end', 'unknown')}.{share} "
            f"Seeds {meta['seeds']} ({seeds_note}); test split = held-out zones. Every figure below "
            f"comes from the runs' records in {meta.get('records', meta['workdir'])}.", ""]


def _readers_note(records: Sequence[dict]) -> list[str]:
    """Where the finished runs ran and how they read the shards: tf.data and the native reader give
    the same examples in different training orders, so records of both compare like two shuffles."""
    done = [r for r in records if r["status"] == "done"]
    groups = {}
    for r in done:
        key = (r.get("device") or "device not recorded", r.get("input") or "reader not recorded")
        groups[key] = groups.get(key, 0) + 1
    if not groups:
        return []
    parts = [f"{n} on {device} with {reader}" for (device, reader), n in sorted(groups.items())]
    return [f"Finished runs by device and input reader (`input` of each record): {'; '.join(parts)}. "
            "The two readers (tfdata, native) give the same examples in different training orders.", ""]


def _score_tables(summary: dict, labels: dict, arms: list, fractions: list, meta: dict) -> list[str]:
    """Test mIoU / OA per cell, the paired difference to from scratch, the share of the oracle's gain."""
    lines = ["## Test mIoU and OA (%), mean ± std over seeds (std with ddof=1)", "",
             "| method | " + " | ".join(f"mIoU {_frac(f)} | OA {_frac(f)}" for f in fractions) + " |",
             "|---|" + "---|---|" * len(fractions)]
    for arm in arms:
        cells = []
        for f in fractions:
            s = summary.get((arm, f))
            cells += [_pm(s["miou"]), _pm(s["oa"])] if s else ["-", "-"]
        lines.append(f"| {labels[arm]} | " + " | ".join(cells) + " |")
    lines += ["", "## Paired difference to from scratch (U-T&T), test mIoU points", "",
              "Per seed: this method's run minus the from-scratch U-T&T run of the same seed and label "
              "fraction (the same labelled patches); mean ± std over seeds [95% confidence interval of "
              "the mean, paired t].", "",
              "| method | " + " | ".join(_frac(f) for f in fractions) + " |", "|---|" + "---|" * len(fractions)]
    for arm in arms:
        if arm != BASELINE:
            lines.append(f"| {labels[arm]} | " + " | ".join(
                _pm_ci(summary[(arm, f)]) if (arm, f) in summary else "-" for f in fractions) + " |")
    few = [f for f in fractions if f < 1.0 and (ORACLE, f) in summary]
    if few:
        lines += ["", "## Share of the oracle's gain (%)", "",
                  "A method's mean paired difference over the oracle's: 100% = as good as the encoder "
                  "trained with every label, 0% = no better than from scratch.", "",
                  "| method | " + " | ".join(_frac(f) for f in few) + " |", "|---|" + "---|" * len(few)]
        for arm in arms:
            if arm not in (BASELINE, ORACLE):
                cells = [summary.get((arm, f)) for f in few]
                lines.append(f"| {labels[arm]} | " + " | ".join(
                    f"{100 * c['gap']:.0f}%" if c and c["diff"][2] >= MIN_SEEDS and np.isfinite(c["gap"])
                    else "-" for c in cells) + " |")
    notes = {a: n for a, n in (meta.get("notes") or {}).items() if a in arms and n}
    if notes:
        lines += ["", *[f"- {labels[a]}: {n}." for a, n in notes.items()]]
    return lines


def _per_class_section(records, shown: dict, labels: dict, meta: dict, fractions: list) -> list[str]:
    """Per-class test IoU of the best method against from scratch at the fraction nearest 10%."""
    target = min(fractions, key=lambda f: abs(f - 0.1))
    best = best_arm(shown, target, meta.get("pretrained_arms"))
    lines = ["", f"## Per-class test IoU (%) at {_frac(target)} labels: best method vs from scratch", ""]
    if best is None or (BASELINE, target) not in shown:
        return lines + [f"Not available: no method has {MIN_SEEDS} finished seeds beside from scratch at "
                        "this label fraction."]
    names, best_iou = per_class_iou(records, best, target)
    _, base_iou = per_class_iou(records, BASELINE, target)
    ahead = shown[(best, target)]["miou"][0] > shown[(BASELINE, target)]["miou"][0]
    kind = "pre-trained method" if meta.get("pretrained_arms") else "other method"
    verdict = ((f"The best {kind} by mean test mIoU, {labels[best]}, is ahead of from scratch"
                if ahead else f"From scratch (U-T&T) is ahead of every {kind}; the best of them "
                              f"is {labels[best]}")
               + f" (paired difference {_pm_ci(shown[(best, target)])} points).")
    lines += [f"{verdict} Means over seeds; '-': class absent from the test split.", "",
              f"| class | {labels[BASELINE]} | {labels[best]} | difference |", "|---|---|---|---|"]
    for name, a, b in zip(names, base_iou, best_iou):
        lines.append(f"| {name} | " + " | ".join("-" if np.isnan(v) else f"{v:.1f}" for v in (a, b, b - a)) + " |")
    return lines


def _status_sections(records, labels: dict, unavailable: dict) -> list[str]:
    """Arms the trainer cannot run, runs not run yet, runs that failed."""
    lines = []
    if unavailable:
        lines += ["## Not available in this trainer", ""]
        lines += [f"- {labels[a]} (`{a}`): {reason}" for a, reason in sorted(unavailable.items())]
        lines.append("")
    not_run = {}
    for r in records:
        if r["status"] == "not run" and r["arm"] not in unavailable:
            not_run[r["arm"]] = not_run.get(r["arm"], 0) + 1
    if not_run:
        lines += ["## Not run yet", "", "Runs without a record (the same command runs them, and only them):",
                  ", ".join(f"{labels.get(a, a)}: {n}" for a, n in not_run.items()) + ".", ""]
    problems = [r for r in records if r["status"] not in ("done", "not run") and r["arm"] not in unavailable]
    if problems:
        lines += ["## Runs without a result", ""]
        lines += [f"- {r['arm']} seed {r['seed']} "
                  + ("pre-training" if r.get("label_fraction") is None else f"at {_frac(r['label_fraction'])}")
                  + f": {r['status']}" + (f", {r['message']}" if r.get("message") else "") for r in problems]
        lines.append("")
    return lines


def _write_tables(records, summary: dict, labels: dict, unavailable: dict, meta: dict,
                  folder: pathlib.Path) -> dict:
    """results_label_efficiency.json (every run and every cell) and .csv (every run) in `folder`."""
    content = {"meta": meta, "labels": labels, "not_available": unavailable, "runs": list(records),
               "summary": [{"arm": arm, "label_fraction": f,
                            **{k: dict(zip(("mean", "std", "n"), s[k])) for k in ("miou", "oa", "diff")},
                            "diff_ci95": list(s["ci"]), "share_of_oracle_gain": s["gap"]}
                           for (arm, f), s in sorted(summary.items())]}
    write_json(folder / "results_label_efficiency.json", content)
    fields = ["arm", "kind", "seed", "label_fraction", "status", "test_miou", "test_miou_official", "test_oa",
              "val_miou", "best_step", "steps", "seconds", "input", "device", "workdir"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)
    atomic_write_bytes(folder / "results_label_efficiency.csv", buf.getvalue().encode())
    return content


def write_results(records: Sequence[dict], labels: dict, unavailable: dict, meta: dict,
                  results_path: pathlib.Path) -> dict:
    """Writes the Markdown report, the plot and the JSON / CSV of every run; returns the JSON content."""
    results_path = pathlib.Path(results_path)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    fractions = sorted({float(f) for f in meta["label_fractions"]})
    summary = summarize(records)
    shown = {k: v for k, v in summary.items() if v["miou"][2] >= MIN_SEEDS}  # cells with a figure
    arms = [a for a in labels if a not in unavailable]
    lines = _header(meta) + _readers_note(records) + _score_tables(summary, labels, arms, fractions, meta)
    lines += _budget_section(records, meta)
    lines += _answer(summary, labels, meta, fractions)
    lines += _screen_section(records, labels, meta)
    lines += _per_class_section(records, shown, labels, meta, fractions)
    lines += ["", f"![test mIoU vs label fraction]({PLOT_NAME})", ""]
    lines += _pretraining_section(records, labels)
    lines += _status_sections(records, labels, unavailable)
    notes = pathlib.Path(meta.get("records", "")) / "NOTES.md"
    if meta.get("records") and notes.is_file():  # hand-written, committed with the records
        lines += ["## What was tried, and what the figures say", "", notes.read_text().strip(), ""]
    lines += ["Every run (scores, status, seconds, its folder under the study's workdir): "
              "`results_label_efficiency.json` and `results_label_efficiency.csv` beside this file.", ""]
    atomic_write_bytes(results_path, "\n".join(lines).encode())
    plot(shown, {a: labels[a] for a in arms}, fractions, results_path.parent / PLOT_NAME)
    return _write_tables(records, summary, labels, unavailable, meta, results_path.parent)
