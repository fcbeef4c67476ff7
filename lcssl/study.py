"""The label-efficiency study: arms x label fractions x seeds -> a results table, a plot, raw results.

    python -m lcssl.study --config=configs/study_synth.py --workdir=runs/study
    python -m lcssl.study --config=configs/study_synth.py:tiny --workdir=/tmp/study --results=/tmp/R.md

    python -m lcssl.study --config=configs/study_synth.py --workdir=runs/study --parallel=2

Each run is what `python -m lcssl.main --config=<arm's config> --workdir=<run dir> <overrides>`
does (the same config flags, `lcssl.train.run`), executed inside one of --parallel worker
processes that each import JAX and TensorFlow once and run one run after another (one log file
per run: `<run dir>/log.txt`); the workers share the host's cores between them (CPU affinity) and
the persistent compilation cache, so the study's time goes into training, not start-up. Layout of
--workdir:

    data/                          the benchmark, synthesised and built once (unless data.data_dir)
    runs/<arm>/seed<S>/pretrain/   one pre-training per arm and seed (config.pretrain_per_seed), or
    runs/<arm>/pretrain/           one per arm shared by every fine-tuning seed
    runs/<arm>/seed<S>/frac<F>/    fine-tuning at label fraction F (eval_results.json: test scores)
    jax_cache/                     compiled programs, shared by all runs (same program, no recompile)

Every finished run leaves a small record (scores, curves, seconds, command, commit, machine) in
`<--records>/protocol<N>/` (--records default: `study_records/` beside --results; N the config's
protocol version: records of different versions are never mixed), meant to be committed: a run with a record
is never run again, on this machine or another, and the report is made from the records alone
(checkpoints stay in --workdir, out of git). A run whose checkpoint another run starts from (a
pre-training, the oracle's source) is run again only when a run that needs it has no record yet. Any other run resumes from its checkpoints.
`--report_only` writes the report from the records as they are; a hand-written `NOTES.md` beside
them becomes the report's "What was tried". An arm whose overrides the trainer's config rejects (a field it
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

from lcssl.errors import UserError
from lcssl.files import atomic_write_bytes, read_json, write_json

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASELINE = "scratch_utt"
ORACLE = "oracle"
PRETRAIN_PLACEHOLDER = "{pretrain}"
SOURCE_PLACEHOLDER = "{source}"
PLOT_NAME = "results_label_efficiency.png"
# A learning-quality figure in the report is a mean +- std over at least this many seeds; cells
# with fewer show as pending (every run is still in the JSON / CSV).
MIN_SEEDS = 3



def _define_flags():
    """The command's flags, defined when it runs, not on import: tests import this module beside
    lcssl.main, whose absl flags have the same names."""
    config_flags.DEFINE_config_file("config", None, "Study config: configs/study_synth.py[:preset]",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Where the data, every run and its logs go.")
    flags.DEFINE_string("results", "docs/RESULTS.md",
                        "The report; the plot, JSON and CSV are written beside it.")
    flags.DEFINE_string("records", "", "Where finished runs' records go ('' = study_records/ beside "
                        "--results); commit them to resume the study elsewhere.")
    flags.DEFINE_integer("parallel", 1, "Runs side by side, each in its own worker process with "
                         "1/N of the host's cores (and of the GPU's memory).")
    flags.DEFINE_bool("report_only", False, "Write the report from the records as they are, "
                      "running nothing (runs without a record show as 'not run').")
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
    needs: Optional[pathlib.Path] = None  # the workdir of the run it starts from (pre-training or other)
    record: Optional[pathlib.Path] = None  # its record (study_records/...), once finished
    protocol: int = 0               # the study config's protocol (benchmark + budget) version

    @property
    def trained(self) -> bool:
        """Its training finished in this workdir (checkpoints and eval_results.json are here)."""
        return (self.workdir / "eval_results.json").is_file()

    @property
    def finished(self) -> bool:
        """Its record exists (here or committed from another machine)."""
        return self.record is not None and self.record.is_file()

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


def _record_path(records: Optional[pathlib.Path], arm: str, name: str) -> Optional[pathlib.Path]:
    return None if records is None else records / arm / f"{name}.json"


def selected_arms(config) -> list[str]:
    """The arm names of --config.only_arms ([] = all); a ValueError naming an unknown one."""
    only = [n for n in config.only_arms.split(",") if n]
    unknown = sorted(set(only) - {a["name"] for a in config.arms})
    if unknown:
        raise ValueError(f"--config.only_arms: unknown arm(s) {unknown}; arms are "
                         f"{sorted(a['name'] for a in config.arms)}")
    return only


def plan(config, workdir: pathlib.Path, data_dir: pathlib.Path,
         records: Optional[pathlib.Path] = None) -> list[Run]:
    """Every run of the study, each after the run it starts from (its pre-training, or for an arm
    with `init_run` another arm's fine-tuning run of the same seed); seeds outermost, so a partial
    study already has every cell at one seed. Without config.pretrain_per_seed, each arm pre-trains
    once (with the first seed) and every fine-tuning seed starts from it. Records go to
    <records>/<arm>/...; `records` is the protocol's own folder (see `records_folder`)."""
    arms_by_name = {a["name"]: a for a in config.arms}
    only = selected_arms(config)
    runs, pretrains, finetunes = [], {}, {}
    for seed in config.seeds:
        common = [f"--config.data_dir={data_dir}", f"--config.seed={seed}", *config.run_overrides]
        for arm in config.arms:
            if only and arm["name"] not in only:
                continue
            source = _pretrain_of(arm, arms_by_name)
            pre_dir = None
            if source is not None:
                pre_seed = seed if config.pretrain_per_seed else config.seeds[0]
                pre_name = f"seed{pre_seed}_pretrain" if config.pretrain_per_seed else "pretrain"
                pre_dir = workdir / "runs" / source["name"] / (
                    f"seed{pre_seed}/pretrain" if config.pretrain_per_seed else "pretrain")
                if pre_dir not in pretrains:
                    pre_common = [f"--config.data_dir={data_dir}", f"--config.seed={pre_seed}",
                                  *config.run_overrides]
                    pretrains[pre_dir] = Run(source["name"], "pretrain", pre_seed, None, pre_dir,
                                             source["pretrain"]["config"],
                                             [*pre_common, *config.pretrain_overrides,
                                              *source["pretrain"]["overrides"]],
                                             record=_record_path(records, source["name"], pre_name))
                    runs.append(pretrains[pre_dir])
            init_dir = None
            if arm.get("init_run"):  # another arm's fine-tuning run of this seed, planned first
                init = arm["init_run"]
                init_dir = workdir / "runs" / init["arm"] / f"seed{seed}" / _fraction_dir(init["label_fraction"])
                if init_dir not in finetunes:
                    init_arm = arms_by_name[init["arm"]]
                    finetunes[init_dir] = _finetune_run(init_arm, seed, float(init["label_fraction"]),
                                                        init_dir, common, config, None, None, records)
                    runs.append(finetunes[init_dir])
            for fraction in arm.get("label_fractions") or config.label_fractions:
                run_dir = workdir / "runs" / arm["name"] / f"seed{seed}" / _fraction_dir(fraction)
                if run_dir in finetunes:
                    continue  # already planned as another arm's starting point
                finetunes[run_dir] = _finetune_run(arm, seed, float(fraction), run_dir, common, config,
                                                   pre_dir, init_dir, records)
                runs.append(finetunes[run_dir])
    for run in runs:
        run.protocol = config.protocol
    return runs


def _finetune_run(arm: dict, seed: int, fraction: float, run_dir: pathlib.Path, common: list, config,
                  pre_dir: Optional[pathlib.Path], init_dir: Optional[pathlib.Path],
                  records: Optional[pathlib.Path]) -> Run:
    """One fine-tuning run of `arm`: the label subset drawn with the seed, {pretrain} / {source}
    replaced by the workdir it starts from (which it then `needs`)."""
    overrides = [o.replace(PRETRAIN_PLACEHOLDER, str(pre_dir)).replace(SOURCE_PLACEHOLDER, str(init_dir))
                 for o in arm["finetune"]["overrides"]]
    cap = [f"--config.num_steps={steps}" for f, steps in config.get("finetune_steps", ())
           if abs(f - fraction) < 1e-9]
    return Run(arm["name"], "finetune", seed, fraction, run_dir, arm["finetune"]["config"],
               [*common, *config.finetune_overrides, *cap, f"--config.label_fraction={fraction}",
                f"--config.label_seed={seed}", *overrides],
               needs=pre_dir or init_dir,
               record=_record_path(records, arm["name"], f"seed{seed}_{_fraction_dir(fraction)}"))


def records_folder(records_dir: pathlib.Path, config) -> pathlib.Path:
    """Where this protocol's records live: records of another protocol are never mixed in."""
    return pathlib.Path(records_dir) / f"protocol{config.protocol}"


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
        overrides = [o.replace(PRETRAIN_PLACEHOLDER, "runs/pretrain").replace(SOURCE_PLACEHOLDER, "runs/x")
                     for o in step["overrides"]]
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


_CURVE_TAGS = ("train/loss", "train/epoch", "probe/accuracy", "probe/baseline_accuracy", "val/miou")


def _curves(workdir: pathlib.Path) -> dict:
    """{tag: [[step, value], ...]} of the run's TensorBoard scalars in _CURVE_TAGS."""
    from lcssl import report

    return {tag: [[step, round(v, 5)] for step, v in points]
            for tag, points in report.read_scalars(str(workdir)).items() if tag in _CURVE_TAGS}


def make_record(run: Run, seconds: float) -> dict:
    """The committable record of a finished run: what the report needs, nothing of the checkpoints."""
    results = read_json(run.workdir / "eval_results.json", "eval results")
    rec = {"arm": run.arm, "kind": run.kind, "seed": run.seed, "label_fraction": run.fraction,
           "protocol": run.protocol, "status": "done", "seconds": seconds, "steps": results.get("step"),
           "num_steps": results.get("num_steps"), "early_stop": results.get("early_stop"),
           "timing": results.get("timing"), "config": run.config,
           "overrides": [o for o in run.overrides if not o.startswith(("--config.data_dir=",
                                                                       "--config.init_from="))],
           "commit": _git_commit(), "machine": _machine(),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if run.kind == "pretrain":
        rec["probe"] = results.get("probe")
        rec["curves"] = _curves(run.workdir)
    else:
        test, val = results.get("test") or {}, results.get("val") or {}
        rec.update(test_miou=test.get("miou"), test_oa=test.get("oa"), val_miou=val.get("miou"),
                   test_miou_official=test.get("miou_official"),
                   best_step=results.get("best_step"), class_names=test.get("class_names"),
                   test_iou=test.get("iou"), probe=results.get("probe"))
    return rec


def execute(run: Run, cache_dir: str) -> dict:
    """Runs (or resumes) one run in this process, its logs to <workdir>/log.txt; writes its record.
    Returns {'status': 'done'|'failed', 'seconds', 'message', 'train_steps_s'}."""
    import traceback

    from absl import logging as absl_logging

    run.workdir.mkdir(parents=True, exist_ok=True)
    log_path = run.workdir / "log.txt"
    t0 = time.perf_counter()
    status, message = "failed", ""
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds = os.dup(1), os.dup(2)
    with open(log_path, "a") as log:
        log.write(f"\n$ python -m lcssl.main --config={run.config} --workdir={run.workdir} "
                  f"{' '.join(run.overrides)}\n")
        log.flush()
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            absl_logging.set_verbosity(absl_logging.INFO)
            from lcssl import train

            if not run.trained:
                train.run(trainer_config(run.config, run.overrides), str(run.workdir))
            status = "done" if run.trained else "failed"
            message = "" if run.trained else "no eval_results.json (preempted?)"
        except Exception as e:  # noqa: BLE001 - one run's failure is reported, the study goes on
            traceback.print_exc()
            message = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            for fd in saved_fds:
                os.close(fd)
    seconds = time.perf_counter() - t0
    previous = read_json(run.workdir / "study_run.json", "study run record") \
        if (run.workdir / "study_run.json").is_file() else {}
    total = previous.get("seconds", 0.0) + seconds
    write_json(run.workdir / "study_run.json", {"seconds": total})
    train_steps_s = 0.0
    if status == "done":
        rec = make_record(run, total)
        train_steps_s = (rec.get("timing") or {}).get("train_steps_s", 0.0)
        if run.record is not None:
            run.record.parent.mkdir(parents=True, exist_ok=True)
            write_json(run.record, rec)
    else:
        message = f"{message}; {log_path}: {_tail(log_path)}"
    return {"status": status, "seconds": seconds, "message": message, "train_steps_s": train_steps_s}


def _init_worker(cpu_sets, cache_dir: str) -> None:
    """A worker process: its share of the host's cores, the shared compilation cache; on Linux it
    is killed when the study process dies, however that dies (no orphan keeps training)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    cpus = cpu_sets.get()
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    from lcssl import cli

    cli.quiet_native_logs()
    import jax

    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _cpu_sets(parallel: int) -> list:
    """The host's cores split into `parallel` disjoint sets (one per worker)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if parallel <= 1 or len(cores) < parallel:
        return [set(cores)] * parallel
    return [set(int(c) for c in part) for part in np.array_split(cores, parallel)]


def execute_all(todo: Sequence[Run], parallel: int, cache_dir: pathlib.Path, on_done) -> dict:
    """Runs `todo` on `parallel` worker processes, a run only once the run it starts from is
    trained; calls on_done(run, outcome) as each ends. Returns {workdir: message} of failed runs."""
    import concurrent.futures as cf
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    cpu_sets = ctx.Queue()
    for cpus in _cpu_sets(parallel):
        cpu_sets.put(cpus)
    if parallel > 1:  # each worker's share of an accelerator's memory (XLA preallocates)
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / parallel:.3f}")
    pending_dirs = {r.workdir for r in todo}  # a run waits while the run it starts from is in here
    failed, waiting, running = {}, list(todo), {}
    with cf.ProcessPoolExecutor(max_workers=parallel, mp_context=ctx, initializer=_init_worker,
                                initargs=(cpu_sets, str(cache_dir))) as pool:
        while waiting or running:
            for run in list(waiting):
                if len(running) >= parallel:
                    break
                if run.needs is not None and run.needs in failed:
                    waiting.remove(run)
                    failed[run.workdir] = f"the run it starts from failed ({run.needs})"
                    on_done(run, {"status": "skipped", "seconds": 0.0, "message": failed[run.workdir]})
                    continue
                if run.needs in pending_dirs:
                    continue  # the run it starts from is still to run (discarded when done)
                waiting.remove(run)
                running[pool.submit(execute, run, str(cache_dir))] = run
            if not running:
                break
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in done:
                run = running.pop(future)
                try:
                    outcome = future.result()
                except Exception as e:  # noqa: BLE001 - a worker died (e.g. out of memory)
                    outcome = {"status": "failed", "seconds": 0.0, "message": f"worker died: {e!r}"}
                if outcome["status"] == "done":
                    pending_dirs.discard(run.workdir)
                else:
                    failed[run.workdir] = outcome["message"]
                on_done(run, outcome)
    return failed


def _prepare_data(config, workdir: pathlib.Path) -> pathlib.Path:
    """The benchmark dataset: config.data.data_dir, or synthesised and built into <workdir>/data."""
    if config.data.data_dir:
        data = pathlib.Path(config.data.data_dir)
        if not (data / "dataset_card.json").is_file():
            raise UserError(f"--config.data.data_dir={data}: no dataset_card.json there; build it first "
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


def _todo(runs: Sequence[Run]) -> list[Run]:
    """Runs without a record, and runs whose checkpoint a run without a record needs (its
    pre-training, or the run an arm starts from) when that checkpoint is not here."""
    needed = {r.needs for r in runs if not r.finished and r.needs is not None}
    return [r for r in runs if not r.finished or (r.workdir in needed and not r.trained)]


def run_study(config, workdir: pathlib.Path, results_path: pathlib.Path, command: str,
              records_dir: Optional[pathlib.Path] = None, parallel: int = 1,
              report_only: bool = False) -> dict:
    """Runs what is not finished, then writes the report from the records; returns the results
    written to JSON."""
    started = time.perf_counter()
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    records_dir = (records_dir or pathlib.Path(results_path).parent / "study_records").resolve()
    selected_arms(config)  # a typo fails before the data is made
    data_dir = workdir / "data" / "built" if report_only else _prepare_data(config, workdir)
    arms_by_name = {a["name"]: a for a in config.arms}
    unavailable = {a["name"]: r for a in config.arms if (r := unavailable_reason(a, arms_by_name))}
    records_dir = records_folder(records_dir, config)
    runs = [r for r in plan(config, workdir, data_dir, records_dir) if r.arm not in unavailable]
    todo = [] if report_only else _todo(runs)
    print(f"Study: {len(runs)} runs ({sum(r.finished for r in runs)} already finished), "
          f"{len(unavailable)} arm(s) not available: {', '.join(sorted(unavailable)) or 'none'}; "
          f"{parallel} worker(s)", flush=True)
    durations, train_steps_s, ended = {"pretrain": [], "finetune": []}, [], [0]  # ended: a counter

    def on_done(run, outcome):
        ended[0] += 1
        label = f"{run.arm} seed {run.seed} " + ("pre-training" if run.fraction is None
                                                 else f"fine-tuning at {run.fraction:g}")
        if outcome["status"] == "done":
            durations[run.kind].append(outcome["seconds"])
            train_steps_s.append(outcome.get("train_steps_s", 0.0))
        seconds = sum(durations.values(), [])
        eta = (len(todo) - ended[0]) * (np.mean(seconds) if seconds else 0.0) / parallel
        print(f"[{ended[0]}/{len(todo)}] {label}: {outcome['status']} in {_fmt_duration(outcome['seconds'])}"
              + (f" ({outcome['message']})" if outcome["message"] else "")
              + f"; ETA {_fmt_duration(eta)}", flush=True)

    failed = execute_all(todo, parallel, workdir / "jax_cache", on_done) if todo else {}
    wall = time.perf_counter() - started
    records = collect(runs, failed)
    meta = {"command": command, "commit": _git_commit(), "machine": _machine(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "wall_seconds_this_invocation": wall, "parallel": parallel,
            "runs_this_invocation": len(train_steps_s),
            "train_steps_seconds_this_invocation": sum(train_steps_s),
            "run_seconds_total": sum(r.get("seconds", 0.0) for r in records if r["status"] == "done"),
            "load_average_at_end": [round(x, 1) for x in os.getloadavg()],
            "records": str(records_dir), "workdir": str(workdir), "protocol": config.protocol,
            "label_fractions": list(config.label_fractions), "seeds": list(config.seeds),
            "only_arms": selected_arms(config),
            "pretrain_per_seed": bool(config.pretrain_per_seed),
            "pretrained_arms": sorted(a["name"] for a in config.arms if _pretrain_of(a, arms_by_name)),
            "notes": {a["name"]: a.get("note", "") for a in config.arms if a.get("note")},
            "budget": {"pretrain": list(config.pretrain_overrides),
                       "finetune": list(config.finetune_overrides),
                       "finetune_steps": [list(x) for x in config.get("finetune_steps", ())]}}
    only = selected_arms(config)
    labels = {a["name"]: a["label"] for a in config.arms if not only or a["name"] in only}
    unavailable = {a: r for a, r in unavailable.items() if a in labels}
    return write_report(records, labels, unavailable, meta, results_path)


def collect(runs: Sequence[Run], failed: dict) -> list[dict]:
    """One record per run (pre-training and fine-tuning): its saved record, or its status."""
    records = []
    for run in runs:
        if run.finished:
            rec = read_json(run.record, "study record")
            if rec.get("protocol") != run.protocol:
                raise UserError(f"{run.record}: a record of protocol {rec.get('protocol')} in the folder of "
                                f"protocol {run.protocol}; records of different protocols are never mixed "
                                "(move it to its own protocol's folder)")
        else:
            rec = {"arm": run.arm, "kind": run.kind, "seed": run.seed, "label_fraction": run.fraction,
                   "status": "failed" if run.workdir in failed else "not run",
                   "message": failed.get(run.workdir, "")}
        rec["workdir"] = str(run.workdir)
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


def paired_ci(diffs: Sequence[float], level: float = 0.95) -> tuple:
    """(low, high) of the `level` confidence interval of the mean of paired differences (Student's
    t with n - 1 degrees of freedom); (nan, nan) for fewer than 2."""
    v = np.asarray([x for x in diffs if x is not None and np.isfinite(x)], np.float64)
    if len(v) < 2:
        return float("nan"), float("nan")
    from scipy import stats

    half = stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean() - half), float(v.mean() + half)


def summarize(records: Sequence[dict]) -> dict:
    """{(arm, fraction): {'miou': (mean, std, n), 'oa': ..., 'diff': (mean, std, n) vs BASELINE,
    'ci': (low, high) of diff's 95% interval, 'gap': share of the oracle's gain}}, percent.

    The paired difference pairs runs of the same seed and label fraction: arm minus from-scratch
    U-T&T. 'gap' is the arm's mean paired difference over the oracle's (ORACLE, the ceiling): 1.0
    = as good as an encoder trained with every label, 0 = no better than from scratch.
    """
    done = [r for r in records if r.get("status") == "done" and r.get("test_miou") is not None
            and r.get("kind", "finetune") == "finetune"]
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
            "diff": _mean_std(diffs) if arm != BASELINE else (float("nan"), float("nan"), 0),
            "ci": paired_ci(diffs) if arm != BASELINE else (float("nan"), float("nan"))}
    for (arm, fraction), cell in out.items():
        oracle = out.get((ORACLE, fraction))
        gain = oracle["diff"][0] if oracle and oracle["diff"][2] else float("nan")
        cell["gap"] = (cell["diff"][0] / gain if np.isfinite(gain) and gain > 0 and cell["diff"][2]
                       else float("nan"))
    return out


def _pm_ci(cell: dict) -> str:
    """'+mean ± std [low, high]' of a paired difference; pending under MIN_SEEDS."""
    mean, std, n = cell["diff"]
    if n < MIN_SEEDS:
        return _pm(cell["diff"])
    low, high = cell["ci"]
    return f"{mean:+.1f} ± {std:.1f} [{low:+.1f}, {high:+.1f}]"


def _pm(stat: tuple, digits: int = 1) -> str:
    """'mean ± std' over >= MIN_SEEDS values; fewer: pending, without a figure."""
    mean, std, n = stat
    if n == 0:
        return "-"
    if n < MIN_SEEDS:
        return f"pending ({n} of {MIN_SEEDS} seeds)"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def best_arm(summary: dict, fraction: float, candidates=None) -> Optional[str]:
    """The arm other than the baseline (among `candidates`, e.g. the pre-trained ones, when given)
    with the highest mean test mIoU at `fraction`."""
    cells = [(v["miou"][0], arm) for (arm, f), v in summary.items()
             if f == fraction and arm not in (BASELINE, ORACLE) and v["miou"][2] > 0
             and (candidates is None or arm in candidates)]
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
GOAL_POINTS, GOAL_GAP, HEADLINE_SEEDS = 5.0, 0.6, 5


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
             f"0, over >= {HEADLINE_SEEDS} seeds, and closes >= {100 * GOAL_GAP:.0f}% of the oracle's "
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
        met = (c["diff"][0] >= GOAL_POINTS and c["ci"][0] > 0 and c["diff"][2] >= HEADLINE_SEEDS
               and (f != 0.1 or (np.isfinite(c["gap"]) and c["gap"] >= GOAL_GAP)))
        gap = f"{100 * c['gap']:.0f}%" if np.isfinite(c["gap"]) else "-"
        lines.append(f"| {100 * f:g}% | {labels.get(arm, arm)} | {c['diff'][2]} | {_pm_ci(c)}{oracle_txt} | "
                     f"{gap} | {'met' if met else 'not met'} |")
    return lines


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
    lines = ["# Label-efficiency study", "",
             f"Produced by `{meta['command']}` on {meta['date']}, commit {meta['commit']}, machine "
             f"{meta['machine']}. Wall time of this invocation {_fmt_duration(wall)} with {par} worker(s); "
             f"all runs together {_fmt_duration(meta['run_seconds_total'])}; load average at the end "
             f"{meta.get('load_average_at_end', 'unknown')}.{share} "
             f"Seeds {meta['seeds']} ({seeds_note}); test split = held-out zones. Every figure below "
             f"comes from the runs' records in {meta.get('records', meta['workdir'])}.", "",
             f"## Test mIoU and OA (%), mean ± std over seeds (std with ddof=1)", "",
             "| method | " + " | ".join(f"mIoU {frac(f)} | OA {frac(f)}" for f in fractions) + " |",
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
              "| method | " + " | ".join(frac(f) for f in fractions) + " |", "|---|" + "---|" * len(fractions)]
    for arm in arms:
        if arm == BASELINE:
            continue
        lines.append(f"| {labels[arm]} | " + " | ".join(
            _pm_ci(summary[(arm, f)]) if (arm, f) in summary else "-" for f in fractions) + " |")
    few = [f for f in fractions if f < 1.0 and (ORACLE, f) in summary]
    if few:
        lines += ["", "## Share of the oracle's gain (%)", "",
                  "A method's mean paired difference over the oracle's: 100% = as good as the encoder "
                  "trained with every label, 0% = no better than from scratch.", "",
                  "| method | " + " | ".join(frac(f) for f in few) + " |", "|---|" + "---|" * len(few)]
        for arm in arms:
            if arm in (BASELINE, ORACLE):
                continue
            lines.append(f"| {labels[arm]} | " + " | ".join(
                f"{100 * summary[(arm, f)]['gap']:.0f}%" if (arm, f) in summary and
                summary[(arm, f)]["diff"][2] >= MIN_SEEDS and np.isfinite(summary[(arm, f)]["gap"])
                else "-" for f in few) + " |")
    notes = {a: n for a, n in (meta.get("notes") or {}).items() if a in arms and n}
    if notes:
        lines += ["", *[f"- {labels[a]}: {n}." for a, n in notes.items()]]
    lines += _budget_section(records, meta)
    lines += _answer(summary, labels, meta, fractions)
    target = min(fractions, key=lambda f: abs(f - 0.1))
    shown = {k: v for k, v in summary.items() if v["miou"][2] >= MIN_SEEDS}  # cells with a figure
    best = best_arm(shown, target, meta.get("pretrained_arms"))
    lines += ["", f"## Per-class test IoU (%) at {frac(target)} labels: best method vs from scratch", ""]
    if best is None or (BASELINE, target) not in shown:
        lines.append(f"Not available: no method has {MIN_SEEDS} finished seeds beside from scratch at "
                     "this label fraction.")
    else:
        names, best_iou = per_class_iou(records, best, target)
        _, base_iou = per_class_iou(records, BASELINE, target)
        ahead = shown[(best, target)]["miou"][0] > shown[(BASELINE, target)]["miou"][0]
        kind = "pre-trained method" if meta.get("pretrained_arms") else "other method"
        verdict = ((f"The best {kind} by mean test mIoU, {labels[best]}, is ahead of from scratch"
                    if ahead else f"From scratch (U-T&T) is ahead of every {kind}; the best of them "
                                  f"is {labels[best]}")
                   + f" (paired difference {_pm_ci(shown[(best, target)])} points).")
        lines += [f"{verdict} Means over seeds; '-': class absent from the test split.", "",
                  f"| class | {labels[BASELINE]} | {labels[best]} | difference |",
                  "|---|---|---|---|"]
        for name, a, b in zip(names, base_iou, best_iou):
            lines.append(f"| {name} | " + " | ".join("-" if np.isnan(v) else f"{v:.1f}" for v in (a, b, b - a)) + " |")
    lines += ["", f"![test mIoU vs label fraction]({PLOT_NAME})", ""]
    lines += _pretraining_section(records, labels)
    if unavailable:
        lines += ["## Not available in this trainer", ""]
        lines += [f"- {labels[a]} (`{a}`): {reason}" for a, reason in sorted(unavailable.items())]
        lines.append("")
    problems = [r for r in records if r["status"] not in ("done", "not run") and r["arm"] not in unavailable]
    not_run = {}
    for r in records:
        if r["status"] == "not run" and r["arm"] not in unavailable:
            not_run[r["arm"]] = not_run.get(r["arm"], 0) + 1
    if not_run:
        lines += ["## Not run yet", "", "Runs without a record (the same command runs them, and only them):",
                  ", ".join(f"{labels.get(a, a)}: {n}" for a, n in not_run.items()) + ".", ""]
    if problems:
        lines += ["## Runs without a result", ""]
        lines += [f"- {r['arm']} seed {r['seed']} "
                  + ("pre-training" if r.get("label_fraction") is None else f"at {frac(r['label_fraction'])}")
                  + f": {r['status']}"
                  + (f", {r['message']}" if r.get("message") else "") for r in problems]
        lines.append("")
    notes = pathlib.Path(meta.get("records", "")) / "NOTES.md"
    if meta.get("records") and notes.is_file():  # hand-written, committed with the records
        lines += ["## What was tried, and what the figures say", "", notes.read_text().strip(), ""]
    lines += ["Every run (scores, status, seconds, workdir): `results_label_efficiency.json` and "
              "`results_label_efficiency.csv` beside this file.", ""]
    atomic_write_bytes(results_path, "\n".join(lines).encode())

    plot(shown, {a: labels[a] for a in arms}, fractions, results_path.parent / PLOT_NAME)
    content = {"meta": meta, "labels": labels, "not_available": unavailable, "runs": list(records),
               "summary": [{"arm": arm, "label_fraction": f,
                            **{k: dict(zip(("mean", "std", "n"), s[k])) for k in ("miou", "oa", "diff")},
                            "diff_ci95": list(s["ci"]), "share_of_oracle_gain": s["gap"]}
                           for (arm, f), s in sorted(summary.items())]}
    write_json(results_path.parent / "results_label_efficiency.json", content)
    fields = ["arm", "kind", "seed", "label_fraction", "status", "test_miou", "test_miou_official", "test_oa", "val_miou",
              "best_step", "steps", "seconds", "workdir"]
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
    from lcssl.files import refuse_remote

    for name in ("workdir", "results", "records"):
        refuse_remote(flags.FLAGS[name].value, f"--{name}")
    refuse_remote(flags.FLAGS.config.data.data_dir, "--config.data.data_dir")
    if flags.FLAGS.parallel < 1:
        raise UserError(f"--parallel={flags.FLAGS.parallel}: at least 1 worker")
    try:
        run_study(flags.FLAGS.config, pathlib.Path(flags.FLAGS.workdir), pathlib.Path(flags.FLAGS.results),
                  command, pathlib.Path(flags.FLAGS.records) if flags.FLAGS.records else None,
                  flags.FLAGS.parallel, flags.FLAGS.report_only)
    except (ValueError, RuntimeError) as e:  # the plan's and the data preparation's own errors
        raise UserError(f"python -m lcssl.study: {e}") from e
    return 0


if __name__ == "__main__":
    from lcssl import cli

    _define_flags()
    app.run(cli.user_errors(main), flags_parser=cli.parse_flags)
