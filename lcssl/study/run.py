"""Running the study: worker processes that each run one `lcssl.train.run` after another, the
benchmark's data made by data_prep's functions, a committable record per finished run."""
from __future__ import annotations

import contextlib
import datetime
import os
import pathlib
import platform
import subprocess
import sys
import time
from typing import Optional, Sequence

import numpy as np

from lcssl.data import pipeline
from lcssl.errors import UserError
from lcssl.files import read_json, write_json
from lcssl.study.plan import ROOT, Run, _pretrain_of, plan, records_folder, selected_arms, trainer_config, \
    unavailable_reason
from lcssl.study.report import _fmt_duration, write_results


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
           "timing": results.get("timing"), "input": results.get("input"), "device": _device(),
           "config": run.config,
           "overrides": [o for o in run.overrides if not o.startswith(("--config.data_dir=",
                                                                       "--config.supervised.init_from="))],
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


def _device() -> str:
    """The accelerator the run trained on, as JAX names it ('cpu', 'NVIDIA H100 80GB HBM3', ...)."""
    import jax

    return f"{jax.device_count()} x {jax.devices()[0].device_kind}"


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


def execute_all(todo: Sequence[Run], parallel: int, cache_dir: pathlib.Path, on_done,
                launch_until: Optional[float] = None) -> dict:
    """Runs `todo` on `parallel` worker processes, a run only once the run it starts from is
    trained, and none after time.monotonic() passes `launch_until` (the runs running then finish);
    calls on_done(run, outcome) as each ends. Returns {workdir: message} of failed runs."""
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
                if len(running) >= parallel or (launch_until is not None and time.monotonic() > launch_until):
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


def prepare_data(config, workdir: pathlib.Path) -> pathlib.Path:
    """The benchmark dataset: config.data.data_dir, or synthesised and built into <workdir>/data by
    data_prep's own command functions (the same flags as `python -m data_prep synth|build`), their
    output in <workdir>/data/<command>.log."""
    if config.data.data_dir:
        data = pathlib.Path(config.data.data_dir)
        if not (data / "dataset_card.json").is_file():
            raise UserError(f"--config.data.data_dir={data}: no dataset_card.json there; build it first "
                            "with python -m data_prep build (README, 'Preparing data')")
        return data.resolve()
    data, raw = workdir / "data" / "built", workdir / "data" / "raw"
    if (data / "dataset_card.json").is_file():
        return data
    from data_prep import __main__ as data_prep_cli

    def cli(options):
        return [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]

    for command, args in (("synth", [f"--out={raw}", *cli(config.data.synth.to_dict())]),
                          ("build", [f"--src={raw}", f"--out={data}", "--no-progress",
                                     *cli(config.data.build.to_dict())])):
        print(f"$ python -m data_prep {command} {' '.join(args)}", flush=True)
        log = workdir / "data" / f"{command}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f, contextlib.redirect_stdout(f):
            try:
                rc = data_prep_cli.main([command, *args])  # its errors are UserErrors naming the file
            except SystemExit as e:  # argparse: a flag data_prep does not take
                rc = e.code
        if rc:
            raise RuntimeError(f"python -m data_prep {command} failed (exit {rc}); see {log}: {_tail(log, 3)}")
    return data


def _todo(runs: Sequence[Run]) -> list[Run]:
    """Runs without a record, and runs whose checkpoint a run without a record needs (its
    pre-training, or the run an arm starts from) when that checkpoint is not here."""
    needed = {r.needs for r in runs if not r.finished and r.needs is not None}
    return [r for r in runs if not r.finished or (r.workdir in needed and not r.trained)]


def run_study(config, workdir: pathlib.Path, results_path: pathlib.Path, command: str,
              records_dir: Optional[pathlib.Path] = None, parallel: int = 1,
              report_only: bool = False, budget_s: float = 0.0) -> dict:
    """Runs what is not finished (launching none after `budget_s` seconds, if > 0), then writes the
    report from the records; returns the results written to JSON."""
    started = time.perf_counter()
    launch_until = time.monotonic() + budget_s if budget_s > 0 else None
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    records_dir = (records_dir or pathlib.Path(results_path).parent / "study_records").resolve()
    selected_arms(config)  # a typo fails before the data is made
    data_dir = workdir / "data" / "built" if report_only else prepare_data(config, workdir)
    arms_by_name = {a["name"]: a for a in config.arms}
    unavailable = {a["name"]: r for a in config.arms if (r := unavailable_reason(a, arms_by_name))}
    records_dir = records_folder(records_dir, config)
    # The reader every run gets: 'tfdata' becomes 'native' where TensorFlow is absent (one log line).
    reader = config.input if report_only else pipeline.choose_reader(config.input)
    runs = [r for r in plan(config, workdir, data_dir, records_dir, reader) if r.arm not in unavailable]
    todo = [] if report_only else _todo(runs)
    print(f"Study: {len(runs)} runs ({sum(r.finished for r in runs)} already finished), "
          f"{len(unavailable)} arm(s) not available: {', '.join(sorted(unavailable)) or 'none'}; "
          f"{parallel} worker(s), input={reader}", flush=True)
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

    failed = execute_all(todo, parallel, workdir / "jax_cache", on_done, launch_until) if todo else {}
    if ended[0] < len(todo):
        print(f"Budget of {budget_s:g} s: {len(todo) - ended[0]} run(s) not launched; the same command "
              "continues from the records.", flush=True)
    wall = time.perf_counter() - started
    records = collect(runs, failed, workdir)
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
    return write_results(records, labels, unavailable, meta, results_path)


def collect(runs: Sequence[Run], failed: dict, root: pathlib.Path) -> list[dict]:
    """One record per run (pre-training and fine-tuning): its saved record, or its status, with the
    run's folder relative to the study's workdir `root` (the same table from any machine's workdir)."""
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
        rec["workdir"] = run.workdir.relative_to(root).as_posix()
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
