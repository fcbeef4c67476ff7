"""The study's plan (pure): arms x label fractions x seeds -> `Run`s, and which arms the trainer
cannot run. A run's flags are those `python -m lcssl.main` would take."""
from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Optional, Sequence

from absl import flags
from ml_collections import config_flags

from lcssl import configs
from lcssl.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[2]
BASELINE = "scratch_utt"
ORACLE = "oracle"
PRETRAIN_PLACEHOLDER = "{pretrain}"
SOURCE_PLACEHOLDER = "{source}"


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
         records: Optional[pathlib.Path] = None, reader: Optional[str] = None) -> list[Run]:
    """Every run of the study, each after the run it starts from (its pre-training, or for an arm
    with `init_run` another arm's fine-tuning run of the same seed); seeds outermost, so a partial
    study already has every cell at one seed. Without config.pretrain_per_seed, each arm pre-trains
    once (with the first seed) and every fine-tuning seed starts from it. Records go to
    <records>/<arm>/...; `records` is the protocol's own folder (see `records_folder`). Every run
    reads the shards with `reader` (default config.input; the study passes the one that runs here)."""
    arms_by_name = {a["name"]: a for a in config.arms}
    only = selected_arms(config)
    reader = reader or config.input
    runs, pretrains, finetunes = [], {}, {}
    for seed in config.seeds:
        common = [f"--config.data_dir={data_dir}", f"--config.seed={seed}", f"--config.input={reader}",
                  *config.run_overrides]
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
                                  f"--config.input={reader}", *config.run_overrides]
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
    """The locked trainer config that `lcssl.main` would build from these flags (raises on a bad one,
    a UserError naming the new flag for a field that moved)."""
    moved = next(filter(None, map(configs.moved_flag, overrides)), None)
    if moved:
        raise UserError(moved)
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
