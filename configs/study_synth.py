"""The label-efficiency study: does pre-training on unlabelled patches pay when labels are few?

    python -m lcssl.study --config=configs/study_synth.py --workdir=runs/study               # 2-core CPU
    python -m lcssl.study --config=configs/study_synth.py --workdir=runs/study \
        --config.only_arms=scratch_utt,oracle                         # the floor and the ceiling first
    python -m lcssl.study --config=configs/study_synth.py:gpu --workdir=runs/study_gpu --parallel=4
    python -m lcssl.study --config=configs/study_synth.py:tiny --workdir=/tmp/study_tiny     # seconds
    python -m lcssl.study --config=configs/study_synth.py:hameln --workdir=runs/study_hameln # GPUs
    python -m lcssl.study --config=configs/study_synth.py:flair2 --workdir=runs/study_flair2 # GPUs

THE BENCHMARK, protocol 4 (`PROTOCOL`; fixed from from-scratch and oracle runs alone, before any
pre-trained arm ran on it; docs/RESULTS.md says why it replaced protocols 1 to 3): `data` and the
fine-tuning budget below. The synthetic generator in the Hameln layout with label noise and a
domain shift between zones (data_prep.synth.Realism), 20 zones of 80 patches, split by zone:
14 training zones (1,120 patches), 3 validation and 3 test zones (240 patches each, held out: other
radiometry and phenology). As in SimCLR's protocol, the labelled pool is the pre-training pool:
every training patch carries a label, pre-training ignores them, fine-tuning sees a label_fraction
of them (1% = 11 patches, 10% = 112, 100% = 1,120), a subset drawn with the seed (label_seed), so
the spread over seeds includes the choice of the labelled patches. Classes need both modalities:
grass / crop / deciduous look alike from the air and differ in their Sentinel-2 phenology;
buildings and roads share a spectrum and differ in aerial shape and texture.

Fine-tuning (every arm alike): batch 8, 20 warm-up steps then cosine to the step budget of the
label fraction (10 epochs of its labelled patches, at least 600 steps: 600 / 600 / 1,400 at
1 / 10 / 100%), no early stop, validation mIoU every 20 steps (and before the first step), the
best-validation checkpoint scored on test.

THE ARMS: from scratch (the floor), the oracle (the ceiling: the encoder of the from-scratch run
with every label, of the same seed, fine-tuned like any pre-trained encoder), and one arm per
pre-training method. An arm is data: the config module (with presets) and the `--config.x=y`
overrides of its pre-training run (or None) and of its fine-tuning run. The runner adds to every
run `--config.data_dir=<the benchmark>` and `--config.seed=<seed>`, and to every fine-tuning run
`--config.label_fraction=<fraction>` and `--config.label_seed=<seed>`; `{pretrain}` in an override
is the workdir of the arm's pre-training run of that seed, `{source}` that of the run an arm starts
from (`init_run`: another arm's fine-tuning run at a label fraction, same seed). Pre-training is
not stopped early: every method gets the same number of epochs (the online probe and the loss are
diagnostics, plotted in the report: on this benchmark the probe did not predict transfer).
An arm whose overrides the trainer's config does not know is reported as not available, never run.

Presets: default = cpu (a pre-training per seed; several sittings on a 2-core CPU, resumed from the
committed records); gpu (the same protocol on one GPU, --parallel=4); tiny (the test suite: 4 zones
of 32 px patches, one seed, one label fraction, a few steps per run); hameln / flair2 (the real
datasets, built by `python -m data_prep build`, with the model's default sizes, and the seminar's
settings as the `simclr_seed` arm so its SSL-vs-supervised result can be reproduced).
"""
import ml_collections
from ml_collections import config_dict

from lcssl.data import pipeline

# The version of the benchmark and budget that records are made under; records of another version
# are never mixed into a report (they stay in their own folder, docs/study_records/protocol<N>/).
PROTOCOL = 4

# The pre-training objectives besides SimCLR (config.task, lcssl/tasks/). An objective a trainer
# does not know is reported "not available", never run.
OBJECTIVES = ("crossmodal", "vicreg", "dense", "byol")
OBJECTIVE_LABELS = {"crossmodal": "cross-modal InfoNCE", "vicreg": "VICReg", "dense": "dense contrastive",
                    "byol": "BYOL"}


# Views that differ in their Sentinel-2 radiometry (a per-band gain and offset and a per-date gain
# drawn for each view, the way held-out zones differ) and in more of their dates.
RADIOMETRY_VIEWS = ("--config.augment.sits_view_gain=0.1", "--config.augment.sits_view_offset=0.3",
                    "--config.augment.sits_date_gain=0.05", "--config.augment.date_dropout_rate=0.5")


def _arms(ssl: str, finetune: str, supervised: str, large_batch: int, large_batch_overrides=()) -> tuple:
    """The arm table. ssl / finetune / supervised: config module paths with presets. Every
    pre-training method but the seminar's runs at batch `large_batch` under the config's rule
    (LARS, lr 0.3 x batch / 256, warm-up then cosine)."""
    def scratch(name, label, variant):
        return {"name": name, "label": label, "pretrain": None,
                "finetune": {"config": supervised, "overrides": [f"--config.model.variant={variant}"]}}

    def pretrained(name, label, pretrain_overrides, note=""):
        return [
            {"name": name, "label": label, "note": note,
             "pretrain": {"config": ssl, "overrides": [f"--config.batch_size={large_batch}",
                                                      *large_batch_overrides, *pretrain_overrides]},
             "finetune": {"config": finetune, "overrides": ["--config.supervised.init_from={pretrain}"]}},
            {"name": f"{name}_linear", "label": f"{label}, linear", "pretrain_of": name,
             "finetune": {"config": finetune,
                          "overrides": ["--config.supervised.init_from={pretrain}",
                                        "--config.supervised.finetune_mode=linear"]}},
        ]

    def partial(name, label, encoder_lr_scale=0.1):
        """Fine-tuning that keeps more of what pre-training learnt: the pre-trained encoder at
        encoder_lr_scale x the learning rate, the new decoder and heads at the full rate (the arm
        `name`'s pre-training of the same seed; the fine-tuning budget is every arm's)."""
        return {"name": f"{name}_partial", "label": f"{label}, encoder at {encoder_lr_scale:g}x lr",
                "pretrain_of": name,
                "finetune": {"config": finetune,
                             "overrides": ["--config.supervised.init_from={pretrain}",
                                           "--config.supervised.finetune_mode=partial",
                                           f"--config.supervised.encoder_lr_scale={encoder_lr_scale}"]}}

    simclr_zone = f"SimCLR, batch {large_batch}, same-zone negatives"
    arms = [
        scratch("scratch_utt", "from scratch, U-T&T (fused)", "utt"),
        # The ceiling: what an encoder that already knows the task gives through the same path.
        {"name": "oracle", "label": "oracle (encoder trained with every label)", "pretrain": None,
         "init_run": {"arm": "scratch_utt", "label_fraction": 1.0}, "label_fractions": (0.01, 0.1),
         "finetune": {"config": finetune, "overrides": ["--config.supervised.init_from={source}/best"]}},
        scratch("scratch_unet", "from scratch, aerial only", "unet"),
        scratch("scratch_utae", "from scratch, Sentinel-2 only", "utae"),
        # SimCLR as its paper: LARS, lr 0.3 x batch / 256 (the config's rule), a large batch.
        *pretrained("simclr_large", f"SimCLR, batch {large_batch}", []),
        *[arm for objective in OBJECTIVES
          for arm in pretrained(objective, OBJECTIVE_LABELS[objective], [f"--config.task={objective}"])],
        # Methods tried to make pre-training pay (docs/RESULTS.md, "What was tried"): views that
        # differ in their Sentinel-2 radiometry (per band, per date) and in more of their dates, the
        # way held-out zones differ, so the encoder keeps the phenology and drops the radiometry.
        *pretrained("simclr_radiometry", f"SimCLR, batch {large_batch}, Sentinel-2 radiometry views",
                    list(RADIOMETRY_VIEWS)),
        *pretrained("crossmodal_series", "cross-modal InfoNCE + series term, radiometry views",
                    ["--config.task=crossmodal", "--config.crossmodal.sits_weight=1.0", *RADIOMETRY_VIEWS]),
        # BYOL (the first screen's leader on seed 0) with the same views.
        *pretrained("byol_radiometry", "BYOL, Sentinel-2 radiometry views",
                    ["--config.task=byol", *RADIOMETRY_VIEWS]),
        # A temporal pretext: the U-TAE reconstructs the Sentinel-2 bands of dates hidden from it
        # (Presto-style), so its map has to hold each pixel's phenology (lcssl/tasks/masked_dates.py).
        *pretrained("maskdates", "masked-date reconstruction", ["--config.task=masked_dates"]),
        # In-domain negatives (DARLING, Zhang et al. 2022): the contrastive encoders learnt to tell
        # the zones apart (docs/study_records/protocol4/NOTES.md, "What the pre-trained encoders
        # encode"): most negatives of an anchor come from other zones, told apart by the zone's
        # acquisition alone. With an anchor's negatives drawn from its own zone only, that nuisance
        # separates nothing and the land cover has to.
        *pretrained("simclr_zone", simclr_zone,
                    ["--config.simclr.negatives=same_zone"]),
        *pretrained("crossmodal_zone", "cross-modal InfoNCE, same-zone negatives",
                    ["--config.task=crossmodal", "--config.crossmodal.negatives=same_zone"]),
        # More in-domain negatives: a batch of 128 drawn from every zone holds ~9 patches of each of
        # the 14, so an anchor meets ~16 same-zone negatives; batches of 2 zones (64 patches of each,
        # native reader: lcssl/data/native.py, "Zone-grouped order") give it 126.
        *pretrained("simclr_zone2", f"{simclr_zone}, 2 zones a batch",
                    ["--config.simclr.negatives=same_zone", "--config.zones_per_batch=2", "--config.input=native"]),
        *pretrained("crossmodal_zone2", "cross-modal InfoNCE, same-zone negatives, 2 zones a batch",
                    ["--config.task=crossmodal", "--config.crossmodal.negatives=same_zone",
                     "--config.zones_per_batch=2", "--config.input=native"]),
        # Full fine-tuning of 600 steps on 11 patches (1%) may wash out what the encoder learnt
        # (its pooled Sentinel-2 embedding knows the class about as well as the supervised
        # encoder's, yet it transfers a small part of the oracle's gain): the encoder at a tenth of
        # the learning rate, for the same-zone SimCLR (both batch orders) and cross-modal encoders.
        partial("simclr_zone", simclr_zone),
        partial("simclr_zone2", f"{simclr_zone}, 2 zones a batch"),
        partial("crossmodal", OBJECTIVE_LABELS["crossmodal"]),
        # The seminar's SimCLR: batch 16, plain SGD at lr 0.001, constant schedule, tau 0.1. Kept as
        # its recipe: at this budget it barely moves its weights (the report says so).
        *pretrained("simclr_seed", "SimCLR as the seed (batch 16, SGD 1e-3)",
                    ["--config.batch_size=16", "--config.optimizer.name=sgd",
                     "--config.optimizer.learning_rate=0.001", "--config.optimizer.momentum=0.0",
                     "--config.optimizer.weight_decay=0.0", "--config.schedule.name=constant",
                     "--config.schedule.warmup_epochs=0.0", "--config.simclr.temperature=0.1"],
                    note="the seminar's recipe (plain SGD at lr 0.001): at this budget its weights "
                         "barely move, so it measures the recipe, not SimCLR"),
    ]
    return tuple(arms)


def _synth_data() -> ml_collections.ConfigDict:
    """The benchmark: `python -m data_prep synth` + `build` flags (names as the CLI's, '_' for '-')."""
    d = ml_collections.ConfigDict()
    d.synth = ml_collections.ConfigDict(dict(
        layout="hameln", num_zones=20, patches_per_zone=80, unlabelled_per_zone=0, patch_size=32,
        sits_size=16, num_dates=8, seed=14,
        # label noise: boundaries off by up to 1 px (0.2 m at 512 px would be 3 px: a 32 px patch
        # has 3.2 m pixels), 5% of regions mislabelled; domain shift between zones and regions.
        boundary_jitter_px=1, wrong_region_share=0.05, zone_gain=0.1, zone_offset=0.03, date_gain=0.05,
        phenology_shift_days=15.0))
    # 20 zones: 3 val, 3 test (held out), 14 train -> 1,120 training patches, all labelled, which
    # pre-training reads without their labels.
    d.build = ml_collections.ConfigDict(dict(
        layout="hameln", expect_size=32, sits_size=16, val_fraction=0.15, test_fraction=0.15, seed=14,
        max_dates=8))
    d.data_dir = config_dict.placeholder(str)   # None: synthesised and built into <workdir>/data
    return d


TRAINING_PATCHES = 14 * 80   # the benchmark's training split (labelled pool = pre-training pool)
PRETRAIN_BATCH = 128


def _steps_per_epoch(batch: int) -> int:
    return max(1, TRAINING_PATCHES // batch)


FINETUNE_BATCH = 8
# The real-data presets (a dataset built by `python -m data_prep build` in data/<preset>), each with
# the seminar's SimCLR preset of that dataset's configs as the `simclr_seed` arm.
SEMINAR_SIMCLR = {"hameln": "ssl2", "flair2": "ssl1"}


def finetune_steps(fractions, min_steps: int = 600, epochs: int = 10) -> tuple:
    """((label fraction, step cap), ...): `epochs` epochs of the fraction's labelled patches, at
    least `min_steps`. Protocol 2 capped every fraction at 400 steps: with 100% of the labels that
    is under 3 epochs, and its from-scratch run scored below the 10% one (43.8 vs 50.2 test mIoU,
    seed 0), which made the oracle's encoder a weak ceiling."""
    return tuple((f, max(min_steps, -(-int(round(epochs * f * TRAINING_PATCHES)) // FINETUNE_BATCH)))
                 for f in fractions)


def _budget(pretrain_epochs: int, finetune_steps: int) -> tuple[list, list]:
    """(pre-training, fine-tuning) overrides, the same for every arm (an arm's own flags come after).

    Pre-training: `pretrain_epochs` epochs of the training patches, 4 of them warm-up, no early stop;
    the online probe every 5 epochs (a diagnostic). Fine-tuning: `finetune_steps` steps
    (config.finetune_steps replaces it per label fraction), warm-up then cosine to the last step, no
    early stop (protocol 3's, after 5 evaluations of 20 steps without improvement, stopped a run
    with every label at step 320 of 1,400 on a noisy validation plateau); validation mIoU every 20
    steps picks the checkpoint scored on test.
    """
    # num_steps=0: the epochs decide (the tiny configs set num_steps, which would win).
    pretrain = ["--config.split=train", "--config.num_steps=0", f"--config.num_epochs={pretrain_epochs}",
                "--config.schedule.warmup_epochs=4.0",
                f"--config.probe.every_steps={5 * _steps_per_epoch(PRETRAIN_BATCH)}",
                "--config.probe.examples=1024", "--config.early_stop.patience=0",
                "--config.checkpoint_every_steps=100000", "--config.keep_checkpoints=1"]
    finetune = [f"--config.num_steps={finetune_steps}", f"--config.batch_size={FINETUNE_BATCH}",
                "--config.schedule.warmup_steps=20", "--config.eval_every_steps=20",
                "--config.early_stop.patience=0", "--config.checkpoint_every_steps=100000",
                "--config.keep_checkpoints=1", "--config.probe.examples=1024"]
    return pretrain, finetune


def get_config(arg=None):
    preset = arg or "default"
    if preset not in ("default", "cpu", "gpu", "tiny", *SEMINAR_SIMCLR):
        raise ValueError(f"Unknown study preset {preset!r}; expected one of default (= cpu), gpu, tiny, "
                         "hameln, flair2 (e.g. --config=configs/study_synth.py:tiny).")
    c = ml_collections.ConfigDict()
    c.protocol = PROTOCOL
    c.label_fractions = (0.01, 0.1, 1.0)
    c.seeds = (0, 1, 2, 3, 4)
    c.data = _synth_data()
    c.run_overrides = ["--config.log_every_steps=20"]
    # A pre-training per seed: the spread between pre-trainings is part of what a method gives.
    c.pretrain_per_seed = True
    c.pretrain_overrides, c.finetune_overrides = _budget(pretrain_epochs=40, finetune_steps=600)
    # The fine-tuning step cap per label fraction (added after finetune_overrides): 600 / 600 / 1400.
    c.finetune_steps = finetune_steps(c.label_fractions)
    c.arms = _arms("configs/ssl_hameln.py:tiny", "configs/finetune_hameln.py:tiny",
                   "configs/sup_hameln.py:tiny", large_batch=PRETRAIN_BATCH)
    c.only_arms = ""       # comma-separated arm names to run (others skipped); '' = all
    # Every run's --config.input (tfdata | native); 'tfdata' becomes 'native' where TensorFlow is not
    # installed, said once in the study's log. Each record says which reader ran.
    c.input = pipeline.DEFAULT_READER
    if preset == "gpu":
        # The same protocol and budget on one GPU (16 cores) with --parallel=4: records compare.
        pass
    elif preset == "tiny":
        c.label_fractions = (0.5,)
        c.seeds = (0,)
        c.data.synth.update(num_zones=4, patches_per_zone=2, unlabelled_per_zone=2, num_dates=4)
        c.data.build.update(val_fraction=0.25, test_fraction=0.25, max_dates=4)
        c.pretrain_overrides = ["--config.num_steps=2", "--config.split=unlabelled",
                                "--config.probe.every_steps=2", "--config.checkpoint_every_steps=2"]
        c.finetune_steps = ()
        c.finetune_overrides = ["--config.num_steps=4", "--config.batch_size=8",
                                "--config.eval_every_steps=2", "--config.checkpoint_every_steps=4",
                                "--config.early_stop.patience=1"]
        c.arms = _arms("configs/ssl_hameln.py:tiny", "configs/finetune_hameln.py:tiny",
                       "configs/sup_hameln.py:tiny", large_batch=8)
        for arm in c.arms:
            if arm["name"] == "oracle":
                arm["init_run"]["label_fraction"] = 0.5
                arm["label_fractions"] = (0.5,)
    elif preset in SEMINAR_SIMCLR:
        # Real data on GPUs: the configs' own defaults (model sizes, epochs, optimizers, and the
        # pre-training split, their layout's: data_prep.layouts); the seed's SimCLR is the configs'
        # seminar preset.
        seed_preset = SEMINAR_SIMCLR[preset]
        c.data.data_dir = f"data/{preset}"
        c.pretrain_overrides = []
        c.finetune_overrides = []
        c.finetune_steps = ()
        c.run_overrides = []
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
