"""The label-efficiency study (issue 14): does pre-training on unlabelled patches pay when labels are few?

    python -m lcssl.study --config=configs/study_synth.py --workdir=runs/study --parallel=2  # 2-core CPU
    python -m lcssl.study --config=configs/study_synth.py:gpu --workdir=runs/study_gpu --parallel=4
    python -m lcssl.study --config=configs/study_synth.py:tiny --workdir=/tmp/study_tiny     # seconds
    python -m lcssl.study --config=configs/study_synth.py:hameln --workdir=runs/study_hameln # GPUs
    python -m lcssl.study --config=configs/study_synth.py:flair2 --workdir=runs/study_flair2 # GPUs

THE BENCHMARK (fixed before any result was seen; change it only with a rerun of everything and a
note in docs/RESULTS.md saying why) is `data` below: the synthetic generator in the Hameln layout
(unique zone names, so the build splits by zone), with label noise and a domain shift between zones
(data_prep.synth.Realism), split by zone into train / val / test (held-out zones, other radiometry
and phenology), and the unlabelled patches of the training zones for pre-training (10x the labelled
training patches). Its classes need both modalities: grass / crop / deciduous look alike from the
air and differ only in their Sentinel-2 phenology; buildings and roads share a spectrum and differ
only in aerial shape and texture.

THE STUDY: every arm x label fraction x seed. An arm is data: the config module (with presets) and
the `--config.x=y` overrides of its pre-training run (or None: from scratch) and of its fine-tuning
run; when the trainer's config keys change, only this table changes. The runner adds to every run
`--config.data_dir=<the benchmark>` and `--config.seed=<seed>`, and to every fine-tuning run
`--config.label_fraction=<fraction>`; `{pretrain}` in an override is the workdir of the arm's
pre-training run of the same seed (one per arm and seed, shared by all label fractions). So both
the pre-training and the fine-tuning seed vary with the seed. `run_overrides` and
`pretrain_overrides` / `finetune_overrides` (the presets' compute budget) come before the arm's own.
An arm whose overrides the trainer's config does not know (e.g. `--config.task=vicreg` before that
objective exists) is reported as not available, never run.

Presets: default = cpu (<= 90 min on a 2-core CPU with --parallel=2, one pre-training per
method shared by the fine-tuning seeds; docs/BENCHMARKS.md has the measured times); gpu (one
H200, --parallel=4: a pre-training per seed, a larger budget, the same benchmark); tiny (the test
suite: 4 zones of 32 px patches, one seed, one label fraction, a few steps per run); hameln / flair2
(the real datasets, built by `python -m data_prep build`, with the model's default sizes, and the
seminar's settings as the `simclr_seed` arm so its SSL-vs-supervised result can be reproduced).
"""
import ml_collections
from ml_collections import config_dict

# The pre-training objectives besides SimCLR (config.task, lcssl/tasks/). An objective a trainer
# does not know is reported "not available", never run.
OBJECTIVES = ("crossmodal", "vicreg", "dense", "byol")


def _arms(ssl: str, finetune: str, supervised: str, large_batch: int, large_batch_overrides=(),
          steps_per_epoch=None) -> tuple:
    """The arm table. ssl / finetune / supervised: config module paths with presets."""
    def scratch(name, label, variant):
        return {"name": name, "label": label, "pretrain": None,
                "finetune": {"config": supervised, "overrides": [f"--config.model.variant={variant}"]}}

    def pretrained(name, label, pretrain_overrides, finetune_overrides=()):
        return [
            {"name": name, "label": label,
             "pretrain": {"config": ssl, "overrides": list(pretrain_overrides)},
             "finetune": {"config": finetune,
                          "overrides": ["--config.init_from={pretrain}", *finetune_overrides]}},
            {"name": f"{name}_linear", "label": f"{label}, linear", "pretrain_of": name,
             "finetune": {"config": finetune,
                          "overrides": ["--config.init_from={pretrain}", "--config.finetune_mode=linear",
                                        *finetune_overrides]}},
        ]

    arms = [
        scratch("scratch_utt", "from scratch, U-T&T (fused)", "utt"),
        scratch("scratch_unet", "from scratch, aerial only", "unet"),
        scratch("scratch_utae", "from scratch, Sentinel-2 only", "utae"),
        # The seminar's SimCLR: batch 16, plain SGD at lr 0.001, constant schedule, tau 0.1.
        *pretrained("simclr_seed", "SimCLR as the seed (batch 16, SGD 1e-3)",
                    ["--config.batch_size=16", "--config.optimizer.name=sgd",
                     "--config.optimizer.learning_rate=0.001", "--config.optimizer.momentum=0.0",
                     "--config.optimizer.weight_decay=0.0", "--config.schedule.name=constant",
                     "--config.schedule.warmup_epochs=0.0", "--config.simclr.temperature=0.1"]),
        # SimCLR as its paper: LARS, lr 0.3 x batch / 256 (the config's rule), a large batch.
        *pretrained("simclr_large", f"SimCLR, batch {large_batch}",
                    [f"--config.batch_size={large_batch}", *large_batch_overrides,
                     # the probe (and early stop) once an epoch at this batch size too
                     *([f"--config.probe.every_steps={steps_per_epoch(large_batch)}"]
                       if steps_per_epoch else [])]),
    ]
    for objective in OBJECTIVES:
        arms += pretrained(objective, {"crossmodal": "cross-modal InfoNCE", "vicreg": "VICReg",
                                       "dense": "dense contrastive", "byol": "BYOL"}[objective],
                           [f"--config.task={objective}"])
    return tuple(arms)


def _synth_data() -> ml_collections.ConfigDict:
    """The benchmark: `python -m data_prep synth` + `build` flags (names as the CLI's, '_' for '-')."""
    d = ml_collections.ConfigDict()
    d.synth = ml_collections.ConfigDict(dict(
        layout="hameln", num_zones=20, patches_per_zone=8, unlabelled_per_zone=80, patch_size=32,
        sits_size=16, num_dates=8, seed=14,
        # label noise: boundaries off by up to 1 px (0.2 m at 512 px would be 3 px: a 32 px patch
        # has 3.2 m pixels), 5% of regions mislabelled; domain shift between zones and regions.
        boundary_jitter_px=1, wrong_region_share=0.05, zone_gain=0.1, zone_offset=0.03, date_gain=0.05,
        phenology_shift_days=15.0))
    # 20 zones: 3 val, 3 test (held out), 14 train -> 112 labelled training patches (1% = 1 patch,
    # 10% = 11) and 1120 unlabelled ones from the training zones (10x) for pre-training.
    d.build = ml_collections.ConfigDict(dict(
        layout="hameln", expect_size=32, sits_size=16, val_fraction=0.15, test_fraction=0.15, seed=14,
        max_dates=8))
    d.data_dir = config_dict.placeholder(str)   # None: synthesised and built into <workdir>/data
    return d


# The benchmark's unlabelled split (20 zones x 80, of which the 14 training zones') and the
# pre-training batch of the tiny configs: one epoch of unlabelled patches in steps.
UNLABELLED_PATCHES = 14 * 80
PRETRAIN_BATCH = 16


def _steps_per_epoch(batch: int) -> int:
    return max(1, UNLABELLED_PATCHES // batch)


def _budget(max_pretrain_epochs: int, finetune_steps: int) -> tuple[list, list]:
    """(pre-training, fine-tuning) overrides, the same for every arm.

    Pre-training runs until its own health says it has learnt what it can: the online probe (once
    an epoch) has not improved by more than 0.01 for 4 epochs, or max_pretrain_epochs. Fine-tuning
    runs until validation mIoU (every 20 steps) has not improved for 4 evaluations, or
    finetune_steps; the best-validation checkpoint is scored on test, for every arm alike.
    """
    # num_steps=0: the epochs decide (the tiny configs set num_steps, which would win).
    pretrain = ["--config.split=unlabelled", "--config.num_steps=0",
                f"--config.num_epochs={max_pretrain_epochs}",
                f"--config.probe.every_steps={_steps_per_epoch(PRETRAIN_BATCH)}",
                "--config.probe.examples=1024", "--config.early_stop.metric=probe/accuracy",
                "--config.early_stop.patience=4", "--config.early_stop.min_delta=0.01",
                "--config.checkpoint_every_steps=100000", "--config.keep_checkpoints=1"]
    finetune = [f"--config.num_steps={finetune_steps}", "--config.batch_size=8",
                "--config.eval_every_steps=20", "--config.early_stop.patience=4",
                "--config.checkpoint_every_steps=100000", "--config.keep_checkpoints=1",
                "--config.probe.examples=1024"]
    return pretrain, finetune


def get_config(arg=None):
    preset = arg or "default"
    if preset not in ("default", "cpu", "gpu", "tiny", "hameln", "flair2"):
        raise ValueError(f"Unknown study preset {preset!r}; expected one of default (= cpu), gpu, tiny, "
                         "hameln, flair2 (e.g. --config=configs/study_synth.py:tiny).")
    c = ml_collections.ConfigDict()
    c.label_fractions = (0.01, 0.1, 1.0)
    c.seeds = (0, 1, 2)
    c.data = _synth_data()
    c.run_overrides = ["--config.log_every_steps=20"]
    # Compute budget, the same for every arm (the cpu preset: <= 90 min on 2 cores with
    # --parallel=2; docs/BENCHMARKS.md, "study"). One pre-training per method, shared by the
    # fine-tuning seeds: the 2-core CPU cannot afford one per seed.
    c.pretrain_per_seed = False
    c.pretrain_overrides, c.finetune_overrides = _budget(max_pretrain_epochs=16, finetune_steps=300)
    c.arms = _arms("configs/ssl_hameln.py:tiny", "configs/finetune_hameln.py:tiny",
                   "configs/sup_hameln.py:tiny", large_batch=128, steps_per_epoch=_steps_per_epoch)
    c.only_arms = ""       # comma-separated arm names to run (others skipped); '' = all
    if preset == "gpu":
        # One H200 (16 cores): a pre-training per seed, 4x the epochs, 2x the fine-tuning steps,
        # --parallel=4. The benchmark (data) is the same as the cpu preset's.
        c.pretrain_per_seed = True
        c.pretrain_overrides, c.finetune_overrides = _budget(max_pretrain_epochs=64, finetune_steps=600)
    elif preset == "tiny":
        c.label_fractions = (0.5,)
        c.seeds = (0,)
        c.data.synth.update(num_zones=4, patches_per_zone=2, unlabelled_per_zone=2, num_dates=4)
        c.data.build.update(val_fraction=0.25, test_fraction=0.25, max_dates=4)
        c.pretrain_overrides = ["--config.num_steps=2", "--config.split=unlabelled", "--config.batch_size=8",
                                "--config.probe.every_steps=2", "--config.checkpoint_every_steps=2"]
        c.finetune_overrides = ["--config.num_steps=4", "--config.batch_size=8",
                                "--config.eval_every_steps=2", "--config.checkpoint_every_steps=4",
                                "--config.early_stop.patience=1"]
        c.arms = _arms("configs/ssl_hameln.py:tiny", "configs/finetune_hameln.py:tiny",
                       "configs/sup_hameln.py:tiny", large_batch=16)
    elif preset in ("hameln", "flair2"):
        # Real data on GPUs: the configs' own defaults (model sizes, epochs, optimizers); the seed's
        # SimCLR is the configs' seminar preset (ssl2 on Hameln, ssl1 on FLAIR #2).
        seed_preset = "ssl2" if preset == "hameln" else "ssl1"
        c.data.data_dir = f"data/{preset}"
        c.pretrain_overrides = [] if preset == "flair2" else ["--config.split=unlabelled"]
        c.finetune_overrides = []
        c.run_overrides = []
        c.pretrain_per_seed = True
        c.arms = _arms(f"configs/ssl_{preset}.py", f"configs/finetune_{preset}.py",
                       f"configs/sup_{preset}.py", large_batch=4096,
                       # README recipe: blockwise loss + gradient caching beyond a device's batch
                       large_batch_overrides=["--config.simclr.loss_impl=gradcache", "--config.simclr.num_chunks=32",
                                              "--config.dtype=bfloat16"])
        for arm in c.arms:
            if arm["name"] == "simclr_seed":
                arm["pretrain"] = {"config": f"configs/ssl_{preset}.py:{seed_preset}", "overrides": []}
            if arm["name"] in ("simclr_seed", "simclr_seed_linear"):
                arm["finetune"]["config"] = f"configs/finetune_{preset}.py:{seed_preset}"
    c.lock()
    return c
