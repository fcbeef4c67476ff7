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

    # --- Data -------------------------------------------------------------------------------------
    card = pipeline.load_card(config.data_dir)
    num_steps, steps_per_epoch = schedule_lengths(config, card, task_module.USES_LABELS)
    reader = pipeline.choose_reader(config.input)  # 'native' where TensorFlow is absent

    def eval_batches(split):
        return pipeline.make_eval_iterator(config.data_dir, split, reader=reader,
                                           global_batch_size=config.eval_batch_size)

    # --- Task: model, state init, step, metrics, eval hooks -----------------------------------------
    ctx = task_context(config, card, mesh, num_steps, steps_per_epoch, eval_batches)
    task = task_module.build(ctx)
    label_fraction = config.label_fraction if task_module.USES_LABELS else 1.0

    def train_batches(start_step):
        it = pipeline.make_train_iterator(
            config.data_dir, config.split, global_batch_size=config.batch_size, seed=config.seed,
            start_step=start_step, label_fraction=label_fraction, label_seed=config.label_seed,
            reader=reader)
        for host_batch in it:  # only what the step reads crosses the host->device link
            yield {k: v for k, v in host_batch.items() if k in task.batch_keys}

    spec = ckpt_lib.input_spec(card, ctx.model_cfg.to_dict())
    # What a fine-tuning run loads from these checkpoints (lcssl.tasks.supervised).
    spec["transfer"] = ({"prefix": task.transfer_prefix, "keys": list(task.transfer_keys)}
                        if task.transfer_keys else None)

    # --- State (created sharded by a jitted init) or resumed ----------------------------------------
    rng = jax.random.key(config.seed + 1, impl=RNG_IMPL)
    abstract_state = jax.eval_shape(task.init, rng)
    state_shardings = sharding.state_shardings(abstract_state, mesh)
    checkpoints = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"),
                                       keep=config.keep_checkpoints)
    best_tag = task.best_metric.replace("/", "_") if task.best_metric else None
    best = None if best_tag is None else ckpt_lib.Checkpoints(os.path.join(workdir, "best"), keep=1,
                                                               best_metric=best_tag)
    progress = {"seed": config.seed, "split": config.split, "global_batch_size": config.batch_size,
                "label_fraction": config.label_fraction, "label_seed": config.label_seed,
                "num_steps": num_steps, "input": reader}
    stopper = EarlyStop(config.early_stop.metric or task.best_metric, config.early_stop.patience,
                        config.early_stop.min_delta)
    # Resume (any device count; arrays re-laid out on this mesh) only onto the same data and model.
    resumed = checkpoints.resume(ckpt_lib.abstract_like(abstract_state, state_shardings), spec,
                                 progress, config.data_dir)
    # A checkpoint saved when damaged evaluation data stopped the run: its evaluation comes first.
    evaluate_first = resumed is not None and bool(resumed[1].get("evaluate_first"))
    if best is not None:  # what a stopped run saved to best/ after its last checkpoint is redone
        best.forget_after(None if resumed is None else resumed[2] - evaluate_first)
    if resumed is not None:
        state, saved, start_step = resumed
        stopper.load(saved.get("early_stop"))
        logging.info("Resumed from %s at step %d", checkpoints.directory, start_step)
    else:
        start_step = 0
        state = sharding.init_sharded(task.init, mesh, rng)
        state, report = task.warm_start(state)
        if report is not None:
            ckpt_lib.write_json(os.path.join(workdir, "loaded_weights.json"), report)
    parameter_overview.log_parameter_overview(state.params, include_stats=jax.process_count() == 1)
    logging.info("Model: %s parameters", f"{models.count_params(state.params):,}")
    workdir_lib.write_config(workdir, config, start_step)  # config.json stays the first start's

    # --- Step -----------------------------------------------------------------------------------------
    train_step = jit_train_step(task, abstract_state, mesh)

    # --- Loop -----------------------------------------------------------------------------------------
    hooks = loop_hooks(config, workdir, writer, num_steps, start_step)
    preempted = _Preempted()
    batches = train_batches(start_step)
    pending, checked_step, wait_s, interval_t0 = None, start_step, 0.0, time.perf_counter()
    step = start_step
    step_flops = None  # model FLOPs per device, counted from the step's jaxpr at the first batch
    peak = flops.peak_flops(jax.devices()[0].device_kind, config.dtype)  # of the dtype run
    # Where this start's wall time goes (eval_results.json 'timing'): the first step (compilation),
    # evaluation, checkpoints, and the rest of the loop (training steps and input).
    timing = {"first_step_s": 0.0, "eval_s": 0.0, "checkpoint_s": 0.0, "loop_s": 0.0}
    loop_t0 = time.perf_counter()

    def keep_steps(state, step: int, evaluate_first: bool = False) -> None:
        """Damaged data stops the run: the steps trained so far are checkpointed first."""
        if checkpoints.latest_step() != step:
            checkpoints.save(step, state, spec, {**progress, "next_step": step, "early_stop":
                                                 stopper.state(), "evaluate_first": evaluate_first},
                             force=True)

    def evaluate(state, step: int) -> bool:
        """Evaluation, best/ and early stop at `step`; True when training should stop early."""
        t0 = time.perf_counter()
        checkpoints.check_finite(state, step)  # no best/ from a non-finite state
        try:
            scalars = task.evaluate(state)
        except ShardError:  # a damaged evaluation shard: the resumed run evaluates this step first
            keep_steps(state, step, evaluate_first=True)
            raise
        if scalars:
            writer.write_scalars(step, scalars)
        if best is not None and task.best_metric in scalars:
            best.save(step, state, spec, {**progress, "next_step": step},
                      metrics={best_tag: scalars[task.best_metric]}, force=True)
        timing["eval_s"] += time.perf_counter() - t0
        return stopper.update(scalars)

    try:
        if evaluate_first:
            evaluate(state, start_step)
        elif start_step == 0 and task.eval_every_steps:
            # Where every curve starts (the fine-tuned encoder before its new head has learnt, the
            # probe on a random encoder): a diagnostic, neither a best/ candidate nor an early stop.
            t0 = time.perf_counter()
            scalars = task.evaluate(state)
            if scalars:
                writer.write_scalars(0, scalars)
            timing["eval_s"] += time.perf_counter() - t0
        while step < num_steps and not stopper.stopped:
            t0 = time.perf_counter()
            try:
                host_batch = next(batches)
            except ShardError:  # a damaged training shard
                keep_steps(state, step)
                raise
            batch = sharding.host_batch_to_global(host_batch, mesh)
            wait_s += time.perf_counter() - t0
            if step_flops is None:  # an abstract trace: no compile, no device memory
                step_flops = flops.count_flops(train_step, state, batch).model / jax.device_count()
                logging.info("Train step: %.4g TFLOP per device (convolutions and matmuls).",
                             step_flops / 1e12)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, step_metrics = train_step(state, batch)
            if step == start_step:  # compilation happens here: timed apart from training
                jax.block_until_ready(state)
                timing["first_step_s"] = time.perf_counter() - t0
            step += 1
            pending = step_metrics if pending is None else pending.merge(step_metrics)
            for hook in hooks:
                hook(step)

            last = step == num_steps
            stop = preempted.check(step)  # every step, on every host (see _Preempted)
            save = last or step % config.checkpoint_every_steps == 0 or stop
            if save or step % config.log_every_steps == 0:
                # Every checkpoint is preceded by this check, so a non-finite state is never saved.
                summary = _summary(pending)
                _stop_if_not_finite(summary, checked_step, step, checkpoints)
                elapsed = time.perf_counter() - interval_t0
                summary["input_wait_fraction"] = wait_s / max(elapsed, 1e-9)
                # Achieved model throughput of the interval, pauses for eval included;
                # recomputation (GradCache's second forward, remat) is not model work.
                summary["tflops_per_device"] = (step_flops * (step - checked_step)
                                                / max(elapsed, 1e-9) / 1e12)
                if peak:
                    summary["mfu"] = summary["tflops_per_device"] * 1e12 / peak
                summary["epoch"] = step / steps_per_epoch
                writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
                if summary["input_wait_fraction"] > config.input_bound_warning:
                    logging.warning("Input-bound: %.0f%% of the time since step %d was spent waiting "
                                    "for batches.", 100 * summary["input_wait_fraction"], checked_step)
                pending, checked_step, wait_s, interval_t0 = None, step, 0.0, time.perf_counter()
            # --- Eval hooks -----------------------------------------------------------------------------
            if last or (task.eval_every_steps and step % task.eval_every_steps == 0):
                if evaluate(state, step) and not last:
                    logging.info("Early stop at step %d: %s", step, stopper.reason)
                    last = save = True
            # --- Checkpoint, preemption -----------------------------------------------------------------
            if save:
                t0 = time.perf_counter()
                if best is not None:  # best/ at this step complete first: a checkpoint at step N
                    best.wait()       # means best/ holds every evaluation up to N
                checkpoints.save(step, state, spec,
                                 {**progress, "next_step": step, "early_stop": stopper.state()},
                                 force=True)
                timing["checkpoint_s"] += time.perf_counter() - t0
            if last:
                break
            if stop:
                logging.warning("Preempted at step %d; checkpoint saved in %s.", step,
                                checkpoints.directory)
                return {}
        # --- Final evaluation: of the best checkpoint when the task keeps one -------------------------
        timing["loop_s"] = time.perf_counter() - loop_t0
        timing["steps_this_start"] = step - start_step
        timing["train_steps_s"] = max(0.0, timing["loop_s"] - timing["first_step_s"]
                                      - timing["eval_s"] - timing["checkpoint_s"])
        results = {"workdir": os.path.abspath(workdir), "step": step, "task": config.task,
                   "num_steps": num_steps, "early_stop": stopper.summary(), "timing": timing}
        final_state = state
        if best is not None:
            best.wait()
            results["best_step"] = best.best_step()
            final_state, _, _ = best.restore(
                results["best_step"], ckpt_lib.abstract_like(abstract_state, state_shardings))
        results.update(task.final(final_state))
        ckpt_lib.write_json(os.path.join(workdir, "eval_results.json"), results)
        return results
    finally:
        preempted.restore()
        checkpoints.close()
        if best is not None:
            best.close()
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
