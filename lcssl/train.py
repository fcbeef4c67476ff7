"""The one training loop, for every objective: data -> step -> metrics -> eval hooks -> checkpoint
-> preemption. What is trained and how (model, state, step, metrics, evaluation, what fine-tuning
loads) is the task's business: `config.task` names a module of lcssl/tasks.

    host batch (numpy, per host)  --host_batch_to_global-->  global batch sharded on 'data'
      --task.train_step (jit, pure)-->  new state (replicated), metrics (clu Collection)

Resume is exact: the state holds the step and the base RNG, each step's randomness is
fold_in(rng, step) and the input pipeline is a pure function of (seed, step).
"""
import os
import signal
import time
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import parameter_overview

from lcssl import checkpoint as ckpt_lib
from lcssl import flops, models, sharding, tasks
from lcssl import workdir as workdir_lib
from lcssl.data import normalize, pipeline
from lcssl.errors import ShardError, UserError
from lcssl.tasks.base import RNG_IMPL

# ------------------------------------------------------------------------------------------------
# Config -> derived values (pure)
# ------------------------------------------------------------------------------------------------

def model_config_for(model_cfg: ml_collections.ConfigDict, card: Mapping[str, Any]):
    """The model config with every data-dependent field taken from the dataset card."""
    cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    cfg.num_classes = len(card["classes"])
    cfg.aerial_bands = len(card["aerial"]["bands"])
    cfg.sits_bands = len(card["sits"]["bands"])
    cfg.aerial_size = int(card["aerial"]["size"])
    cfg.aerial_gsd_m = float(card["aerial"]["gsd_m"])
    cfg.sits_size = int(card["sits"]["size"])
    cfg.sits_gsd_m = float(card["sits"]["gsd_m"])
    cfg.footprint_px = cfg.aerial_size * cfg.aerial_gsd_m / cfg.sits_gsd_m
    return cfg


def schedule_lengths(config, card, uses_labels: bool) -> tuple[int, int]:
    """(num_steps, steps_per_epoch) of the training split at config.batch_size; a task that reads
    labels sees config.label_fraction of the split."""
    split = card["splits"].get(config.split)
    if split is None:
        raise UserError(f"split={config.split!r} is not in {config.data_dir}/dataset_card.json "
                         f"(splits: {sorted(card['splits'])}); set --config.split")
    fraction = config.label_fraction if uses_labels else 1.0
    examples = max(1, int(round(split["num_examples"] * fraction)))
    steps_per_epoch = max(1, examples // config.batch_size)
    num_steps = config.num_steps or int(config.num_epochs * steps_per_epoch)
    return num_steps, steps_per_epoch


def learning_rate_schedule(config, num_steps: int, steps_per_epoch: int) -> optax.Schedule:
    peak = config.optimizer.learning_rate
    warmup = (config.schedule.warmup_steps if config.schedule.get("warmup_steps") is not None
              else int(config.schedule.warmup_epochs * steps_per_epoch))
    if config.schedule.name == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(num_steps, warmup + 1))
    if config.schedule.name == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup),
                                     optax.constant_schedule(peak)], [warmup])
    raise UserError(f"schedule.name must be 'cosine' or 'constant', found {config.schedule.name!r}")


def task_context(config, card, mesh, num_steps: int, steps_per_epoch: int,
                 eval_batches=None) -> tasks.Context:
    """What a task is built from: the config with the card's shapes, the schedule, the devices."""
    model_cfg = model_config_for(config.model, card)
    augment_cfg = ml_collections.ConfigDict(config.augment.to_dict())
    augment_cfg.footprint_px = model_cfg.footprint_px
    augment_cfg.photometric_bands = tuple(
        i for i in augment_cfg.photometric_bands if i < model_cfg.aerial_bands)

    def no_eval_data(split):
        raise ValueError(f"no evaluation data given (split {split!r})")

    return tasks.Context(config=config, card=card, mesh=mesh, model_cfg=model_cfg,
                         stats=normalize.stats_from_card(card), augment_cfg=augment_cfg,
                         lr=learning_rate_schedule(config, num_steps, steps_per_epoch),
                         num_steps=num_steps,
                         eval_batches=eval_batches or no_eval_data)


def jit_train_step(task: tasks.Task, abstract_state, mesh):
    """task.train_step under jit as the loop runs it: the state donated and kept on its shardings,
    the metrics replicated."""
    return jax.jit(task.train_step, donate_argnums=(0,),
                   out_shardings=(sharding.state_shardings(abstract_state, mesh),
                                  sharding.replicated(mesh)))


# ------------------------------------------------------------------------------------------------
# Side pieces of the loop
# ------------------------------------------------------------------------------------------------

def _summary(collection) -> dict[str, float]:
    return {k: float(sharding.to_host(v)) for k, v in collection.compute().items()}


class _Preempted:
    """SIGTERM -> save a checkpoint at the end of a step, then exit; `check(step)` after each step.

    One process: a Python SIGTERM handler sets the flag. Several processes (jax.distributed): a
    scheduler may signal only some hosts, and a host that stopped alone would leave the others
    waiting in the checkpoint's collectives. JAX's preemption service catches SIGTERM on whichever
    host gets it and agrees with all of them on one step at which every host saves and stops
    (`multihost_utils.reached_preemption_sync_point`); a Python handler would take SIGTERM away
    from it, so none is installed there, and every host asks at every step.
    """

    def __init__(self):
        self.requested = False
        self._multi = jax.process_count() > 1
        self._previous = None if self._multi else signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint at the end of this step, then exiting.")
        self.requested = True

    def check(self, step: int) -> bool:
        if self._multi and not self.requested:
            from jax.experimental import multihost_utils
            if multihost_utils.reached_preemption_sync_point(step):
                logging.warning("Preemption notice (SIGTERM on some host): every host saves at "
                                "step %d, then exits.", step)
                self.requested = True
        return self.requested

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)



# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------

def loop_hooks(config, workdir: str, writer, num_steps: int, start_step: int) -> list:
    """Called after every step: the progress line (steps/s, ETA) and, on process 0 with
    config.profile_steps, a profiler trace of that many steps from the 10th step of this start
    (compilation and warm-up done) into the workdir (TensorBoard's profile plugin reads it)."""
    from lcssl import writers  # noqa: F401  (clu.metric_writers importable without TensorFlow)
    from clu import periodic_actions

    hooks = [periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                             every_steps=config.log_every_steps)]
    if jax.process_index() == 0 and config.profile_steps:
        # profile_duration_ms=0: the trace ends after exactly profile_steps steps (clu's default
        # also waits 3 s, so a trace of a few fast steps was never closed nor written).
        hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=config.profile_steps,
                                              profile_duration_ms=0, first_profile=start_step + 10))
    return hooks


class _Interval:
    """The train/* scalars of one logging interval: the step metrics merged since the last check,
    the time spent waiting for batches and the model throughput (FLOPs counted once from the
    step's jaxpr, an abstract trace: no compile, no device memory)."""

    def __init__(self, config, steps_per_epoch: int, start_step: int):
        self.config, self.steps_per_epoch = config, steps_per_epoch
        self.peak = flops.peak_flops(jax.devices()[0].device_kind, config.dtype)  # of the dtype run
        self.step_flops = None  # model FLOPs per device and step
        self._reset(start_step)

    def _reset(self, step: int) -> None:
        self.pending, self.first_step, self.wait_s, self.t0 = None, step, 0.0, time.perf_counter()

    def count_flops(self, train_step, state, batch) -> None:
        if self.step_flops is None:
            self.step_flops = flops.count_flops(train_step, state, batch).model / jax.device_count()
            logging.info("Train step: %.4g TFLOP per device (convolutions and matmuls).",
                         self.step_flops / 1e12)

    def add(self, step_metrics) -> None:
        self.pending = step_metrics if self.pending is None else self.pending.merge(step_metrics)

    def close(self, step: int, checkpoints) -> dict[str, float]:
        """The interval's scalars (refused when loss or gradients are not finite, so a non-finite
        state is never checkpointed: every save is preceded by this), then a new interval."""
        summary = _summary(self.pending)
        _stop_if_not_finite(summary, self.first_step, step, checkpoints)
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        summary["input_wait_fraction"] = self.wait_s / elapsed
        # Achieved model throughput of the interval, pauses for eval included; recomputation
        # (GradCache's second forward, remat) is not model work.
        summary["tflops_per_device"] = self.step_flops * (step - self.first_step) / elapsed / 1e12
        if self.peak:
            summary["mfu"] = summary["tflops_per_device"] * 1e12 / self.peak
        summary["epoch"] = step / self.steps_per_epoch
        if summary["input_wait_fraction"] > self.config.input_bound_warning:
            logging.warning("Input-bound: %.0f%% of the time since step %d was spent waiting for "
                            "batches.", 100 * summary["input_wait_fraction"], self.first_step)
        self._reset(step)
        return {f"train/{k}": v for k, v in summary.items()}


class _Saved:
    """What a run keeps on disk and decides from its evaluations: checkpoints/ (resume), best/
    (the state the final evaluation reads), early stop, and where the wall time went
    (eval_results.json 'timing': the first step with its compilation, evaluation, checkpoints,
    the rest of the loop)."""

    def __init__(self, config, workdir: str, task, spec: dict, progress: dict, writer):
        self.task, self.spec, self.progress, self.writer = task, spec, progress, writer
        self.checkpoints = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"),
                                                keep=config.keep_checkpoints)
        self.best_tag = task.best_metric.replace("/", "_") if task.best_metric else None
        self.best = None if self.best_tag is None else ckpt_lib.Checkpoints(
            os.path.join(workdir, "best"), keep=1, best_metric=self.best_tag,
            resumes_from=self.checkpoints)  # a failed best/ save names checkpoints/' steps
        self.stopper = EarlyStop(config.early_stop.metric or task.best_metric,
                                 config.early_stop.patience, config.early_stop.min_delta)
        self.timing = {"first_step_s": 0.0, "eval_s": 0.0, "checkpoint_s": 0.0, "loop_s": 0.0}

    def resume(self, abstract_state, data_dir):
        """(state, step, evaluate_first) of the last checkpoint, or None. Any device count (arrays
        re-laid out on this mesh), only onto the same data and model."""
        resumed = self.checkpoints.resume(abstract_state, self.spec, self.progress, data_dir)
        # A checkpoint saved when damaged evaluation data stopped the run: its evaluation first.
        evaluate_first = resumed is not None and bool(resumed[1].get("evaluate_first"))
        if self.best is not None:  # what a stopped run saved to best/ after its last checkpoint is redone
            self.best.forget_after(None if resumed is None else resumed[2] - evaluate_first)
        if resumed is None:
            return None
        state, saved, start_step = resumed
        self.stopper.load(saved.get("early_stop"))
        logging.info("Resumed from %s at step %d", self.checkpoints.directory, start_step)
        return state, start_step, evaluate_first

    def save(self, state, step: int, **extra) -> None:
        t0 = time.perf_counter()
        if self.best is not None:  # best/ at this step complete first: a checkpoint at step N
            self.best.wait()       # means best/ holds every evaluation up to N
        self.checkpoints.save(step, state, self.spec, {**self.progress, "next_step": step,
                                                       "early_stop": self.stopper.state(), **extra},
                              force=True)
        self.timing["checkpoint_s"] += time.perf_counter() - t0

    def keep_steps(self, state, step: int, evaluate_first: bool = False) -> None:
        """Damaged data stops the run: the steps trained so far are checkpointed first."""
        if self.checkpoints.latest_step() != step:
            self.save(state, step, evaluate_first=evaluate_first)

    def diagnostic(self, state) -> None:
        """Where every curve starts (the fine-tuned encoder before its new head has learnt, the
        probe on a random encoder): an evaluation at step 0, neither a best/ candidate nor an
        early stop."""
        t0 = time.perf_counter()
        scalars = self.task.evaluate(state)
        if scalars:
            self.writer.write_scalars(0, scalars)
        self.timing["eval_s"] += time.perf_counter() - t0

    def evaluate(self, state, step: int) -> bool:
        """Evaluation, best/ and early stop at `step`; True when training should stop early."""
        t0 = time.perf_counter()
        self.checkpoints.check_finite(state, step)  # no best/ from a non-finite state
        try:
            scalars = self.task.evaluate(state)
        except ShardError:  # a damaged evaluation shard: the resumed run evaluates this step first
            self.keep_steps(state, step, evaluate_first=True)
            raise
        if scalars:
            self.writer.write_scalars(step, scalars)
        if self.best is not None and self.task.best_metric in scalars:
            self.best.save(step, state, self.spec, {**self.progress, "next_step": step},
                           metrics={self.best_tag: scalars[self.task.best_metric]}, force=True)
        self.timing["eval_s"] += time.perf_counter() - t0
        return self.stopper.update(scalars)

    def final(self, state, abstract_state, step: int, start_step: int, loop_t0: float) -> dict:
        """The final evaluation (of the best checkpoint when the task keeps one), with the run's
        timing: eval_results.json's content."""
        t = self.timing
        t["loop_s"] = time.perf_counter() - loop_t0
        t["steps_this_start"] = step - start_step
        t["train_steps_s"] = max(0.0, t["loop_s"] - t["first_step_s"] - t["eval_s"] - t["checkpoint_s"])
        results = {"step": step, "early_stop": self.stopper.summary(), "timing": t}
        if self.best is not None:
            self.best.wait()
            results["best_step"] = self.best.best_step()
            state, _, _ = self.best.restore(results["best_step"], abstract_state)
        return {**results, **self.task.final(state)}

    def close(self) -> None:
        self.checkpoints.close()
        if self.best is not None:
            self.best.close()


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains as `config` says, writing logs, checkpoints and eval_results.json to `workdir`."""
    task_module = tasks.get(config.task)
    os.makedirs(workdir, exist_ok=True)
    lock = workdir_lib.lock(workdir)  # one run per workdir; released in the final `finally`
    # Here, not at the top: clu's writers import TensorFlow where it is installed (lcssl/writers.py
    # writes the same event files without it), which the step functions must not need.
    from lcssl import writers

    writer = writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    mesh = sharding.make_mesh()
    sharding.check_batch_divisible(config.batch_size, mesh, "batch_size")
    logging.info("Mesh %s over %d processes", dict(mesh.shape), jax.process_count())

    # --- Data and task: model, state init, step, metrics, eval hooks --------------------------------
    card = pipeline.load_card(config.data_dir)
    num_steps, steps_per_epoch = schedule_lengths(config, card, task_module.USES_LABELS)
    reader = pipeline.choose_reader(config.input)  # 'native' where TensorFlow is absent

    def eval_batches(split):
        return pipeline.make_eval_iterator(config.data_dir, split, reader=reader,
                                           global_batch_size=config.eval_batch_size)

    ctx = task_context(config, card, mesh, num_steps, steps_per_epoch, eval_batches)
    task = task_module.build(ctx)

    def train_batches(start_step):
        it = pipeline.make_train_iterator(
            config.data_dir, config.split, global_batch_size=config.batch_size, seed=config.seed,
            start_step=start_step, reader=reader, label_seed=config.label_seed,
            label_fraction=config.label_fraction if task_module.USES_LABELS else 1.0,
            zones_per_batch=config.zones_per_batch)
        for host_batch in it:  # only what the step reads crosses the host->device link
            yield {k: v for k, v in host_batch.items() if k in task.batch_keys}

    spec = ckpt_lib.input_spec(card, ctx.model_cfg.to_dict())
    # What a fine-tuning run loads from these checkpoints (lcssl.tasks.supervised).
    spec["transfer"] = ({"prefix": task.transfer_prefix, "keys": list(task.transfer_keys)}
                        if task.transfer_keys else None)
    progress = {"seed": config.seed, "split": config.split, "global_batch_size": config.batch_size,
                "label_fraction": config.label_fraction, "label_seed": config.label_seed,
                "num_steps": num_steps, "input": reader, "zones_per_batch": config.zones_per_batch}

    # --- State (created sharded by a jitted init) or resumed ----------------------------------------
    rng = jax.random.key(config.seed + 1, impl=RNG_IMPL)
    abstract_state = jax.eval_shape(task.init, rng)
    abstract_state = ckpt_lib.abstract_like(abstract_state, sharding.state_shardings(abstract_state, mesh))
    saved = _Saved(config, workdir, task, spec, progress, writer)
    preempted = None
    try:
        resumed = saved.resume(abstract_state, config.data_dir)
        state, start_step, evaluate_first = resumed or (None, 0, False)
        if resumed is None:
            state, report = task.warm_start(sharding.init_sharded(task.init, mesh, rng))
            if report is not None:
                ckpt_lib.write_json(os.path.join(workdir, "loaded_weights.json"), report)
        parameter_overview.log_parameter_overview(state.params, include_stats=jax.process_count() == 1)
        logging.info("Model: %s parameters", f"{models.count_params(state.params):,}")
        workdir_lib.write_config(workdir, config, start_step)  # config.json stays the first start's

        # --- Loop: step -> metrics -> eval -> checkpoint -> preemption -----------------------------
        train_step = jit_train_step(task, abstract_state, mesh)
        hooks = loop_hooks(config, workdir, writer, num_steps, start_step)
        preempted, interval = _Preempted(), _Interval(config, steps_per_epoch, start_step)
        batches, step, loop_t0 = train_batches(start_step), start_step, time.perf_counter()
        if evaluate_first:
            saved.evaluate(state, start_step)
        elif start_step == 0 and task.eval_every_steps:
            saved.diagnostic(state)
        while step < num_steps and not saved.stopper.stopped:
            t0 = time.perf_counter()
            try:
                host_batch = next(batches)
            except ShardError:  # a damaged training shard
                saved.keep_steps(state, step)
                raise
            batch = sharding.host_batch_to_global(host_batch, mesh)
            interval.wait_s += time.perf_counter() - t0
            interval.count_flops(train_step, state, batch)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, step_metrics = train_step(state, batch)
            if step == start_step:  # compilation happens here: timed apart from training
                jax.block_until_ready(state)
                saved.timing["first_step_s"] = time.perf_counter() - t0
            step += 1
            interval.add(step_metrics)
            for hook in hooks:
                hook(step)
            last = step == num_steps
            stop = preempted.check(step)  # every step, on every host (see _Preempted)
            save = last or step % config.checkpoint_every_steps == 0 or stop
            if save or step % config.log_every_steps == 0:
                writer.write_scalars(step, interval.close(step, saved.checkpoints))
            if last or (task.eval_every_steps and step % task.eval_every_steps == 0):
                if saved.evaluate(state, step) and not last:
                    logging.info("Early stop at step %d: %s", step, saved.stopper.reason)
                    last = save = True
            if save:
                saved.save(state, step)
            if last:
                break
            if stop:
                logging.warning("Preempted at step %d; checkpoint saved in %s.", step,
                                saved.checkpoints.directory)
                return {}
        results = {"workdir": os.path.abspath(workdir), "task": config.task, "num_steps": num_steps,
                   "input": reader, **saved.final(state, abstract_state, step, start_step, loop_t0)}
        ckpt_lib.write_json(os.path.join(workdir, "eval_results.json"), results)
        return results
    finally:
        if preempted is not None:
            preempted.restore()
        saved.close()
        writer.flush()
        lock.release()


class EarlyStop:
    """Stops training when `metric` (a tag of task.evaluate's output) has not improved by more than
    `min_delta` for `patience` evaluations in a row (patience 0: never). Its state is saved with
    each checkpoint, so a resumed run stops where an uninterrupted one would."""

    def __init__(self, metric: str | None, patience: int, min_delta: float):
        self.metric, self.patience, self.min_delta = metric, int(patience), float(min_delta)
        self.best, self.best_eval, self.evals, self.stopped, self.reason = None, 0, 0, False, ""

    def update(self, scalars: Mapping[str, float]) -> bool:
        """Records one evaluation; True when training should stop now."""
        if not self.patience or not self.metric or self.metric not in scalars:
            return False
        value = float(scalars[self.metric])
        self.evals += 1
        if self.best is None or value > self.best + self.min_delta:
            self.best, self.best_eval = value, self.evals
        elif self.evals - self.best_eval >= self.patience:
            self.stopped = True
            self.reason = (f"{self.metric} has not improved on {self.best:.4f} by more than "
                           f"{self.min_delta} in {self.patience} evaluations")
        return self.stopped

    def state(self) -> dict:
        return {"best": self.best, "best_eval": self.best_eval, "evals": self.evals,
                "stopped": self.stopped, "reason": self.reason}

    def load(self, saved: Mapping[str, Any] | None) -> None:
        if saved:
            self.best, self.best_eval, self.evals = saved["best"], saved["best_eval"], saved["evals"]
            self.stopped, self.reason = saved.get("stopped", False), saved.get("reason", "")

    def summary(self) -> dict:
        return {"metric": self.metric, "patience": self.patience, **self.state()}


def _stop_if_not_finite(summary, first_step, step, checkpoints) -> None:
    bad = sorted(k for k in ("loss", "grad_norm") if not np.isfinite(summary.get(k, 0.0)))
    if bad:
        raise checkpoints.not_finite(
            f"Training stopped: {', '.join(bad)} became NaN or inf between steps {first_step} and "
            f"{step}.", "raising simclr.temperature, using dtype=float32, or checking the input data "
            "for NaNs (data_prep build's QA report)")
