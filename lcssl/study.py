"""The label-efficiency study: arms x label fractions x seeds -> a results table, a plot, raw results.

    python -m lcssl.study --config=configs/study_synth.py --workdir=runs/study
    python -m lcssl.study --config=configs/study_synth.py:tiny --workdir=/tmp/study --results=/tmp/R.md

Each run is the real command, `python -m lcssl.main --config=<arm's config> --workdir=<run dir>
<overrides>`, in a subprocess of its own (JAX state isolated, one log file per run:
`<run dir>/log.txt`). Layout of --workdir:

    data/                          the benchmark, synthesised and built once (unless data.data_dir)
    runs/<arm>/seed<S>/pretrain/   one pre-training per arm and seed, shared by the label fractions
    runs/<arm>/seed<S>/frac<F>/    fine-tuning at label fraction F (eval_results.json: test scores)
    jax_cache/                     compiled programs, shared by all runs (same program, no recompile)

A run whose eval_results.json exists is finished and never run again; any other resumes from its
checkpoints (lcssl.main resumes). An arm whose overrides the trainer's config rejects (a field it
does not have, such as `task` before the objectives exist) is "not available" in the report, with
the trainer's reason. The report (--results, default docs/RESULTS.md) holds mean +- std over seeds
(numpy, ddof=1) of test mIoU and OA per arm x label fraction, the paired difference to from-scratch
U-T&T per seed, the per-class IoU of the best arm against from-scratch at 10% labels, the plot
`results_label_efficiency.png`, and `results_label_efficiency.json` / `.csv` with every run, beside it.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import os
import pathlib
import platform
import subprocess
import sys
import time
import warnings
from typing import Optional, Sequence

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from lcssl.files import atomic_write_bytes, read_json, write_json

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASELINE = "scratch_utt"
PRETRAIN_PLACEHOLDER = "{pretrain}"
PLOT_NAME = "results_label_efficiency.png"



def _define_flags():
    """The command's flags, defined when it runs, not on import: tests import this module beside
    lcssl.main, whose absl flags have the same names."""
    config_flags.DEFINE_config_file("config", None, "Study config: configs/study_synth.py[:preset]",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Where the data, every run and its logs go.")
    flags.DEFINE_string("results", "docs/RESULTS.md",
                        "The report; the plot, JSON and CSV are written beside it.")
    flags.mark_flags_as_required(["config", "workdir"])


# ----------------------------------------------------------------------------- the plan

@dataclasses.dataclass
class Run:
    """One `python -m lcssl.main` call of the study."""
    arm: str
    kind: str                       # 'pretrain' | 'finetune'
    seed: int
    fraction: Optional[float]       # None for pre-training
    workdir: pathlib.Path
    config: str                     # module path with presets, relative to the repository root
    overrides: list
    needs: Optional[pathlib.Path] = None  # the pre-training workdir a fine-tuning run starts from

    @property
    def finished(self) -> bool:
        return (self.workdir / "eval_results.json").is_file()

    def argv(self, cache_dir: pathlib.Path) -> list:
        module_path, _, presets = self.config.partition(":")
        config = str((ROOT / module_path).resolve()) + (f":{presets}" if presets else "")
        return [sys.executable, "-m", "lcssl.main", f"--config={config}", f"--workdir={self.workdir}",
                f"--compilation_cache={cache_dir}", *self.overrides]


def _fraction_dir(fraction: float) -> str:
    return f"frac{fraction:g}"


def _pretrain_of(arm: dict, arms_by_name: dict) -> Optional[dict]:
    """The arm whose pre-training this arm fine-tunes from (itself, another arm's, or none)."""
    if arm.get("pretrain_of"):
        return arms_by_name[arm["pretrain_of"]]
    return arm if arm.get("pretrain") else None


def plan(config, workdir: pathlib.Path, data_dir: pathlib.Path) -> list[Run]:
    """Every run of the study, pre-training before the fine-tuning runs that need it; seeds outermost,
    so a partial study already has every cell at one seed."""
    arms_by_name = {a["name"]: a for a in config.arms}
    only = [n for n in config.only_arms.split(",") if n]
    unknown = sorted(set(only) - set(arms_by_name))
    if unknown:
        raise ValueError(f"--config.only_arms: unknown arm(s) {unknown}; arms are {sorted(arms_by_name)}")
    runs, pretrains = [], {}
    for seed in config.seeds:
        common = [f"--config.data_dir={data_dir}", f"--config.seed={seed}", *config.run_overrides]
        for arm in config.arms:
            if only and arm["name"] not in only:
                continue
            source = _pretrain_of(arm, arms_by_name)
            pre_dir = None
            if source is not None:
                pre_dir = workdir / "runs" / source["name"] / f"seed{seed}" / "pretrain"
                if pre_dir not in pretrains:
                    pretrains[pre_dir] = Run(source["name"], "pretrain", seed, None, pre_dir,
                                             source["pretrain"]["config"],
                                             [*common, *config.pretrain_overrides,
                                              *source["pretrain"]["overrides"]])
                    runs.append(pretrains[pre_dir])
            for fraction in config.label_fractions:
                ft = arm["finetune"]
                overrides = [o.replace(PRETRAIN_PLACEHOLDER, str(pre_dir)) for o in ft["overrides"]]
                runs.append(Run(arm["name"], "finetune", seed, float(fraction),
                                workdir / "runs" / arm["name"] / f"seed{seed}" / _fraction_dir(fraction),
                                ft["config"], [*common, *config.finetune_overrides,
                                               f"--config.label_fraction={fraction}", *overrides],
                                needs=pre_dir))
    return runs


def trainer_config(config_path: str, overrides: Sequence[str]):
    """The locked trainer config that `lcssl.main` would build from these flags (raises on a bad one)."""
    module_path, _, presets = config_path.partition(":")
    path = str((ROOT / module_path).resolve()) + (f":{presets}" if presets else "")
    values = flags.FlagValues()
    argv = ["lcssl.main", f"--config={path}", *overrides]
    # sys_argv: the override flags are found in this argv, not in the study's own command line
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    return values.config


def _known_tasks() -> set:
    """Objectives the trainer implements (the registry of lcssl/tasks/)."""
    from lcssl import tasks

    return set(tasks.NAMES)


def unavailable_reason(arm: dict, arms_by_name: dict) -> Optional[str]:
    """Why the trainer cannot run this arm (its config rejects an override, or an unknown task), or None."""
    steps = []
    source = _pretrain_of(arm, arms_by_name)
    if source is not None:
        steps.append(("pre-training", source["pretrain"]))
    steps.append(("fine-tuning", arm["finetune"]))
    for what, step in steps:
        overrides = [o.replace(PRETRAIN_PLACEHOLDER, "runs/pretrain") for o in step["overrides"]]
        try:
            cfg = trainer_config(step["config"], overrides)
        except Exception as e:  # absl's flag errors and ml_collections' KeyError/TypeError alike
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return f"{what} config {step['config']} {' '.join(overrides)}: {first}"
        if "task" in cfg and cfg.task != "supervised" and cfg.task not in _known_tasks():
            return f"{what}: the trainer has no task {cfg.task!r} (lcssl/tasks/ has {sorted(_known_tasks())})"
    return None


# ----------------------------------------------------------------------------- running

def _tail(path: pathlib.Path, lines: int = 1) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return ""
    return " | ".join(text[-lines:])


def execute(run: Run, cache_dir: pathlib.Path, timeout_s: float) -> dict:
    """Runs (or resumes) one run; returns {'status': 'done'|'failed', 'seconds', 'message'}."""
    run.workdir.mkdir(parents=True, exist_ok=True)
    log = run.workdir / "log.txt"
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(run.argv(cache_dir))}\n")
        f.flush()
        try:
            proc = subprocess.run(run.argv(cache_dir), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=timeout_s)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
    seconds = time.perf_counter() - t0
    previous = read_json(run.workdir / "study_run.json", "study run record") \
        if (run.workdir / "study_run.json").is_file() else {}
    record = {"seconds": previous.get("seconds", 0.0) + seconds, "argv": run.argv(cache_dir)}
    write_json(run.workdir / "study_run.json", record)
    if code == 0 and run.finished:
        return {"status": "done", "seconds": seconds, "message": ""}
    why = f"timed out after {timeout_s:.0f} s" if code is None else f"exit code {code}"
    return {"status": "failed", "seconds": seconds, "message": f"{why}; {log}: {_tail(log)}"}


def _prepare_data(config, workdir: pathlib.Path) -> pathlib.Path:
    """The benchmark dataset: config.data.data_dir, or synthesised and built into <workdir>/data."""
    if config.data.data_dir:
        data = pathlib.Path(config.data.data_dir)
        if not (data / "dataset_card.json").is_file():
            raise FileNotFoundError(f"--config.data.data_dir={data}: no dataset_card.json there; build it first "
                                    "with python -m data_prep build (README, 'Preparing data')")
        return data.resolve()
    data, raw = workdir / "data" / "built", workdir / "data" / "raw"
    if (data / "dataset_card.json").is_file():
        return data

    def cli(options):
        return [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]

    for command, args in (("synth", [f"--out={raw}", *cli(config.data.synth.to_dict())]),
                          ("build", [f"--src={raw}", f"--out={data}", "--no-progress",
                                     *cli(config.data.build.to_dict())])):
        argv = [sys.executable, "-m", "data_prep", command, *args]
        print(f"$ {' '.join(argv[1:])}", flush=True)
        log = workdir / "data" / f"{command}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            if subprocess.run(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                raise RuntimeError(f"python -m data_prep {command} failed; see {log}: {_tail(log, 3)}")
    return data


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def run_study(config, workdir: pathlib.Path, results_path: pathlib.Path, command: str) -> dict:
    """Runs what is not finished, then writes the report; returns the results written to JSON."""
    started = time.perf_counter()
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = _prepare_data(config, workdir)
    arms_by_name = {a["name"]: a for a in config.arms}
    unavailable = {a["name"]: r for a in config.arms if (r := unavailable_reason(a, arms_by_name))}
    runs = [r for r in plan(config, workdir, data_dir) if r.arm not in unavailable]
    todo = [r for r in runs if not r.finished]
    print(f"Study: {len(runs)} runs ({len(runs) - len(todo)} already finished), "
          f"{len(unavailable)} arm(s) not available: {', '.join(sorted(unavailable)) or 'none'}", flush=True)
    cache_dir = workdir / "jax_cache"
    failed, durations = {}, {"pretrain": [], "finetune": []}
    for index, run in enumerate(todo):
        label = f"{run.arm} seed {run.seed} " + ("pre-training" if run.fraction is None
                                                 else f"fine-tuning at {run.fraction:g}")
        if run.needs is not None and run.needs in failed:
            failed[run.workdir] = f"its pre-training failed ({run.needs})"
            print(f"[{index + 1}/{len(todo)}] {label}: skipped, {failed[run.workdir]}", flush=True)
            continue
        print(f"[{index + 1}/{len(todo)}] {label} -> {run.workdir}", flush=True)
        outcome = execute(run, cache_dir, config.timeout_s)
        durations[run.kind].append(outcome["seconds"])
        if outcome["status"] == "failed":
            failed[run.workdir] = outcome["message"]
        left = todo[index + 1:]
        mean = {k: np.mean(v) if v else np.mean(sum(durations.values(), [])) for k, v in durations.items()}
        eta = sum(mean[r.kind] for r in left)
        print(f"    {outcome['status']} in {_fmt_duration(outcome['seconds'])}"
              + (f" ({outcome['message']})" if outcome["message"] else "")
              + f"; {len(left)} to go, ETA {_fmt_duration(eta)}", flush=True)
    records = collect(runs, failed)
    meta = {"command": command, "commit": _git_commit(), "machine": _machine(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "wall_seconds_this_invocation": time.perf_counter() - started,
            "run_seconds_total": sum(_run_seconds(r.workdir) for r in runs),
            "load_average_at_end": [round(x, 1) for x in os.getloadavg()],
            "data_dir": str(data_dir), "workdir": str(workdir),
            "label_fractions": list(config.label_fractions), "seeds": list(config.seeds)}
    labels = {a["name"]: a["label"] for a in config.arms}
    return write_report(records, labels, unavailable, meta, results_path)


def _run_seconds(run_dir: pathlib.Path) -> float:
    """Seconds spent in a run so far, over all the invocations that ran or resumed it."""
    path = run_dir / "study_run.json"
    return read_json(path, "study run record").get("seconds", 0.0) if path.is_file() else 0.0


def collect(runs: Sequence[Run], failed: dict) -> list[dict]:
    """One record per fine-tuning run: its test scores, or its status when it has none."""
    records = []
    for run in runs:
        if run.kind != "finetune":
            continue
        rec = {"arm": run.arm, "seed": run.seed, "label_fraction": run.fraction, "workdir": str(run.workdir),
               "seconds": _run_seconds(run.workdir)}
        if run.finished:
            results = read_json(run.workdir / "eval_results.json", "eval results")
            test = results.get("test") or {}
            rec.update(status="done", test_miou=test.get("miou"), test_oa=test.get("oa"),
                       val_miou=(results.get("val") or {}).get("miou"), best_step=results.get("best_step"),
                       class_names=test.get("class_names"), test_iou=test.get("iou"))
            if run.needs is not None:
                rec["pretrain_seconds"] = _run_seconds(run.needs)
        else:
            rec.update(status="failed" if run.workdir in failed else "not run",
                       message=failed.get(run.workdir, ""))
        records.append(rec)
    return records


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.node()}: {cpu}, {os.cpu_count()} CPU cores, {platform.platform()}"


# ----------------------------------------------------------------------------- the report

def _mean_std(values: Sequence[float]) -> tuple:
    """(mean, sample std with ddof=1 (nan for one value), n) of the finite values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan"), len(v)


def summarize(records: Sequence[dict]) -> dict:
    """{(arm, fraction): {'miou': (mean, std, n), 'oa': ..., 'diff': (mean, std, n) vs BASELINE}}, percent.

    The paired difference pairs runs of the same seed and label fraction: arm minus from-scratch U-T&T.
    """
    done = [r for r in records if r.get("status") == "done" and r.get("test_miou") is not None]
    by_cell = {}
    for r in done:
        by_cell.setdefault((r["arm"], r["label_fraction"]), {})[r["seed"]] = r
    out = {}
    for (arm, fraction), seeds in by_cell.items():
        base = by_cell.get((BASELINE, fraction), {})
        diffs = [100 * (seeds[s]["test_miou"] - base[s]["test_miou"]) for s in sorted(seeds) if s in base]
        out[(arm, fraction)] = {
            "miou": _mean_std([100 * r["test_miou"] for r in seeds.values()]),
            "oa": _mean_std([100 * r["test_oa"] for r in seeds.values() if r.get("test_oa") is not None]),
            "diff": _mean_std(diffs) if arm != BASELINE else (float("nan"), float("nan"), 0)}
    return out


def _pm(stat: tuple, digits: int = 1) -> str:
    mean, std, n = stat
    if n == 0:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else " (1 seed)")


def best_arm(summary: dict, fraction: float) -> Optional[str]:
    """The arm other than the baseline with the highest mean test mIoU at `fraction`."""
    cells = [(v["miou"][0], arm) for (arm, f), v in summary.items()
             if f == fraction and arm != BASELINE and v["miou"][2] > 0]
    return max(cells)[1] if cells else None


def per_class_iou(records: Sequence[dict], arm: str, fraction: float) -> tuple:
    """(class names, mean IoU in percent per class over seeds (nan where never present))."""
    rows = [r for r in records if r["arm"] == arm and r["label_fraction"] == fraction and r.get("status") == "done"]
    if not rows:
        return [], np.array([])
    iou = np.array([[np.nan if v is None else 100 * v for v in r["test_iou"]] for r in rows], np.float64)
    with warnings.catch_warnings():  # a class absent from the test split: nan, shown as '-'
        warnings.simplefilter("ignore", RuntimeWarning)
        return list(rows[0]["class_names"]), np.nanmean(iou, axis=0)


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


def write_report(records: Sequence[dict], labels: dict, unavailable: dict, meta: dict,
                 results_path: pathlib.Path) -> dict:
    """Writes the Markdown report, the plot and the JSON / CSV of every run; returns the JSON content."""
    results_path = pathlib.Path(results_path)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    fractions = sorted({float(f) for f in meta["label_fractions"]})
    summary = summarize(records)
    arms = [a for a in labels if a not in unavailable]

    def frac(f):
        return f"{100 * f:g}%"

    lines = ["# Label-efficiency study", "",
             f"Produced by `{meta['command']}` on {meta['date']}, commit {meta['commit']}, machine "
             f"{meta['machine']}. Wall time of this invocation {_fmt_duration(meta['wall_seconds_this_invocation'])}; "
             f"all runs together {_fmt_duration(meta['run_seconds_total'])}; load average at the end "
             f"{meta.get('load_average_at_end', 'unknown')} (above the core count: the machine was shared). "
             f"Seeds {meta['seeds']} (pre-training "
             f"and fine-tuning seeds both vary); test split = held-out zones. Every figure below comes from the "
             f"runs' eval_results.json under {meta['workdir']}.", "",
             f"## Test mIoU and OA (%), mean ± std over seeds (std with ddof=1)", "",
             "| method | " + " | ".join(f"mIoU {frac(f)} | OA {frac(f)}" for f in fractions) + " |",
             "|---|" + "---|---|" * len(fractions)]
    for arm in arms:
        cells = []
        for f in fractions:
            s = summary.get((arm, f))
            cells += [_pm(s["miou"]), _pm(s["oa"])] if s else ["-", "-"]
        lines.append(f"| {labels[arm]} | " + " | ".join(cells) + " |")
    lines += ["", f"## Paired difference to from scratch (U-T&T), test mIoU points, mean ± std over seeds", "",
              "Per seed: this method's run minus the from-scratch U-T&T run of the same seed and label fraction.",
              "", "| method | " + " | ".join(frac(f) for f in fractions) + " |", "|---|" + "---|" * len(fractions)]
    for arm in arms:
        if arm == BASELINE:
            continue
        lines.append(f"| {labels[arm]} | " + " | ".join(
            _pm(summary[(arm, f)]["diff"]) if (arm, f) in summary else "-" for f in fractions) + " |")
    target = min(fractions, key=lambda f: abs(f - 0.1))
    best = best_arm(summary, target)
    lines += ["", f"## Per-class test IoU (%) at {frac(target)} labels: best method vs from scratch", ""]
    if best is None or (BASELINE, target) not in summary:
        lines.append("Not available: no finished runs of both at this label fraction.")
    else:
        names, best_iou = per_class_iou(records, best, target)
        _, base_iou = per_class_iou(records, BASELINE, target)
        lines += [f"Best method by mean test mIoU: {labels[best]}. Means over seeds; '-': class absent "
                  "from the test split.", "", f"| class | {labels[BASELINE]} | {labels[best]} | difference |",
                  "|---|---|---|---|"]
        for name, a, b in zip(names, base_iou, best_iou):
            lines.append(f"| {name} | " + " | ".join("-" if np.isnan(v) else f"{v:.1f}" for v in (a, b, b - a)) + " |")
    lines += ["", f"![test mIoU vs label fraction]({PLOT_NAME})", ""]
    if unavailable:
        lines += ["## Not available in this trainer", ""]
        lines += [f"- {labels[a]} (`{a}`): {reason}" for a, reason in sorted(unavailable.items())]
        lines.append("")
    problems = [r for r in records if r["status"] != "done" and r["arm"] not in unavailable]
    if problems:
        lines += ["## Runs without a result", ""]
        lines += [f"- {r['arm']} seed {r['seed']} at {frac(r['label_fraction'])}: {r['status']}"
                  + (f", {r['message']}" if r.get("message") else "") for r in problems]
        lines.append("")
    lines += ["Every run (scores, status, seconds, workdir): `results_label_efficiency.json` and "
              "`results_label_efficiency.csv` beside this file.", ""]
    atomic_write_bytes(results_path, "\n".join(lines).encode())

    plot(summary, {a: labels[a] for a in arms}, fractions, results_path.parent / PLOT_NAME)
    content = {"meta": meta, "labels": labels, "not_available": unavailable, "runs": list(records),
               "summary": [{"arm": arm, "label_fraction": f, **{k: dict(zip(("mean", "std", "n"), v))
                                                                  for k, v in s.items()}}
                           for (arm, f), s in sorted(summary.items())]}
    write_json(results_path.parent / "results_label_efficiency.json", content)
    fields = ["arm", "seed", "label_fraction", "status", "test_miou", "test_oa", "val_miou", "best_step",
              "seconds", "workdir"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)
    atomic_write_bytes(results_path.parent / "results_label_efficiency.csv", buf.getvalue().encode())
    return content


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    command = " ".join(["python -m lcssl.study", *sys.argv[1:]])
    try:
        run_study(flags.FLAGS.config, pathlib.Path(flags.FLAGS.workdir), pathlib.Path(flags.FLAGS.results),
                  command)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"python -m lcssl.study: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    _define_flags()
    app.run(main)
