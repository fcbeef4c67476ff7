"""Pieces shared by every experiment config: one base ConfigDict and the presets that edit it.

An experiment config (configs/<name>.py) calls `build(dataset=..., task=..., arg=arg, presets={...})`;
`arg` is the text after the colon in `--config=configs/ssl_hameln.py:ssl3,tiny` and names presets
applied left to right. Every field a user may override exists in the base, so
`--config.simclr.temperature=0.2` works and a typo (`--config.simclr.temprature=0.2`) fails: the
returned config is locked.

Field reference (units in the names):
  task                 the objective, a module of lcssl/tasks: 'supervised' (from scratch or
                       fine-tuning) | 'simclr' (pre-training); pre-training configs take any
                       pre-training task (`--config.task=...`)
  data_dir, split      dataset built by `python -m data_prep build`; training split ('train',
                       'unlabelled', ...); val_split / test_split for evaluation
  input                reader of the shards: 'tfdata' (tf.data) | 'native' (lcssl/data/native.py,
                       no TensorFlow, each host reads only its records); 'tfdata' becomes 'native'
                       where TensorFlow is not installed
  zones_per_batch      0: batches drawn from every zone; k > 0: each global batch is k chunks of
                       batch_size / k patches of one zone each (with <task>.negatives='same_zone',
                       more in-domain negatives per anchor); needs input='native'
  batch_size           global batch over all devices and hosts (pre-training: patches per step)
  num_epochs|num_steps num_steps wins when set; epochs are over the training split
  optimizer            name 'sgd' | 'lars' | 'adamw'; learning_rate is the peak value
  schedule             name 'constant' | 'cosine'; warmup_epochs of linear warm-up, or warmup_steps
                       (wins when set: fine-tuning on 1% or 100% of the labels warms up alike)
  <task>.*             each task's own hyperparameters (its default_config()), e.g. simclr.*:
                       temperature, loss_impl 'naive'|'blockwise'|'gradcache', block_size (rows of
                       the logits per block), num_chunks (gradcache), negatives 'all'|'same_zone'
  probe.*              online linear probe of every pre-training task: every_steps, train_split,
                       eval_split, examples, ridge
  supervised.*         the supervised task's (lcssl/tasks/supervised.py, default_config()); they
                       were top-level fields once, and an old flag (`--config.init_from=X`) fails
                       naming the new one (MOVED):
    init_from          a pre-training workdir (or its checkpoints/ dir); finetune_mode 'linear'
                       (frozen encoder) | 'partial' (encoder at encoder_lr_scale x lr) | 'full'
    init_encoder_from  published weights instead: a torchvision/timm ResNet34 state dict
                       (.safetensors; .pth/.pt/.ckpt with torch) into the aerial encoder, or an smp
                       Unet('resnet34') (IGN's FLAIR U-Nets) into encoder, decoder and head; bands by
                       name, other bands zero (lcssl/pretrained.py); not with init_from
    adapt_bands        fine-tuning from a checkpoint of other bands (e.g. Hameln's 4 -> FLAIR #2's
                       5): map the first convolutions' input channels by band name, new bands
                       zero-initialised (False: refuse, naming both band lists)
    class_weights      'card' (from dataset_card.json) | 'none' | comma-separated floats
    aux_loss_weight    weight of the time-series branch loss on aux_logits
    grad_accum_steps   the global batch is split into this many micro-batches
  label_fraction       share of labelled training patches used (few-label experiments); with
                       label_seed at the top level, not under supervised.*: the loop reads both
                       (lcssl/train.py: the epoch's length, the input pipeline's subset, the
                       checkpoint's data position) for any task that uses labels
  label_seed           which patches that share is (a seeded draw; vary it with the seed so the
                       spread over seeds includes the choice of labelled patches)
  early_stop           metric ('' = the task's best metric), patience (evaluations without an
                       improvement > min_delta before stopping; 0 = off), min_delta
"""
from __future__ import annotations

from typing import Callable, Mapping

import ml_collections
from ml_collections import config_dict

from lcssl.errors import UserError

# The seminar's setup (Project Seminar 2024, "Setup"): SGD, learning rate 0.001, batch 8 or 16,
# 2-layer projection head. Momentum is not stated there, so the seed presets use plain SGD.
SEED_LEARNING_RATE = 0.001

Preset = Callable[[ml_collections.ConfigDict], None]

# Fields that left the top level: old name -> new path. An old command's override of one fails
# naming the new flag (`moved_flag`: lcssl.main's flag parser, the study's trainer configs).
MOVED = {name: f"supervised.{name}" for name in (
    "init_from", "init_encoder_from", "finetune_mode", "adapt_bands", "encoder_lr_scale",
    "class_weights", "aux_loss_weight", "grad_accum_steps")}


def moved_flag(flag: str) -> str | None:
    """What to say about an override of a field that moved (`--config.init_from=X`), else None."""
    name = flag.split("=", 1)[0]
    root, _, old = name.lstrip("-").partition(".")
    if root != "config" or old not in MOVED:
        return None
    return f"{name} is now --config.{MOVED[old]} (supervised settings moved under config.supervised)"


def base(dataset: str, task: str) -> ml_collections.ConfigDict:
    """The modern default for `dataset` (a layout of data_prep/layouts.py) and `task` (a name in lcssl.tasks):
    pre-training defaults for every task but 'supervised'."""
    from lcssl import models, tasks
    from lcssl.data import augment, pipeline
    from lcssl.tasks import base as task_base

    tasks.get(task)  # a clear error for an unknown task
    pretrain = task != "supervised"
    c = ml_collections.ConfigDict()
    c.task = task
    c.dataset = dataset
    c.data_dir = f"data/{dataset}"
    c.split = "train"
    c.val_split = "val"
    c.test_split = "test"
    c.label_fraction = 1.0
    c.label_seed = 0
    c.input = pipeline.DEFAULT_READER
    c.zones_per_batch = 0

    c.batch_size = 256 if pretrain else 64
    c.eval_batch_size = 64
    c.num_epochs = 100 if pretrain else 50
    c.num_steps = config_dict.placeholder(int)

    c.optimizer = ml_collections.ConfigDict()
    if pretrain:
        # SimCLR (Chen et al. 2020, sec. B.6): LARS, lr = 0.3 x batch / 256, weight decay 1e-6.
        # A reference, not a number: `--config.batch_size=4096` also scales the learning rate (to
        # 4.8); `--config.optimizer.learning_rate=X` replaces the rule. (The float comes first so
        # the reference is a float one and accepts such an override.)
        c.optimizer.name = "lars"
        c.optimizer.learning_rate = ml_collections.FieldReference(0.3 / 256) * c.get_ref("batch_size")
        c.optimizer.weight_decay = 1e-6
    else:
        c.optimizer.name = "sgd"
        c.optimizer.learning_rate = 0.01
        c.optimizer.weight_decay = 1e-4
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = False
    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "cosine"
    c.schedule.warmup_epochs = 10.0 if pretrain else 1.0
    c.schedule.warmup_steps = config_dict.placeholder(int)

    # Every task's hyperparameters, whichever task runs: `--config.task=X --config.X.y=...` works
    # with any experiment config, and the config stays locked.
    for name in tasks.NAMES:
        c[name] = tasks.get(name).default_config()
    c.probe = task_base.probe_config()

    c.dtype = "float32"  # compute dtype of the model: 'float32' | 'bfloat16' (params stay fp32)
    c.model = models.default_config()
    c.model.dtype = c.get_ref("dtype")
    c.augment = augment.default_config()

    # Stop when early_stop.metric ('' = the task's best metric, e.g. val/miou; pre-training:
    # e.g. probe/accuracy) has not improved by more than min_delta in `patience` evaluations.
    c.early_stop = ml_collections.ConfigDict(dict(metric="", patience=0, min_delta=0.0))

    c.log_every_steps = 50
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.profile_steps = 5  # steps traced by clu's Profile once, early on (0 = off)
    c.input_bound_warning = 0.3  # warn when the host waits on input this share of the time
    c.seed = 0
    if pretrain:
        from data_prep import layouts

        c.split = layouts.get(dataset).pretrain_split
    return c


def tiny(c: ml_collections.ConfigDict) -> None:
    """Tiny model, a few steps on `python -m data_prep synth` data: tests and the demo (seconds)."""
    from lcssl import models

    c.model = models.tiny_config()
    c.model.dtype = c.get_ref("dtype")
    c.data_dir = f"demo/data/{c.dataset}"
    c.batch_size = 16
    c.eval_batch_size = 16
    c.num_steps = 6
    if c.task == "supervised":
        c.optimizer.learning_rate = 0.05
    # Pre-training keeps its rule (LARS, 0.3 x batch / 256): `--config.batch_size=128` on a tiny
    # config still gives 0.15, so an arm labelled "lr 0.3 x batch / 256" runs at that rate.
    c.schedule.warmup_epochs = 0.0
    c.simclr.block_size = 8
    c.simclr.num_chunks = 2
    c.probe.every_steps = 3
    c.probe.examples = 32
    c.log_every_steps = 2
    c.eval_every_steps = 3
    c.checkpoint_every_steps = 3
    c.keep_checkpoints = 2
    c.profile_steps = 0


def seed_setup(*, epochs: int, batch_size: int, temperature: float | None = None) -> Preset:
    """A row of the seminar's experiment tables: plain SGD at lr 0.001, constant schedule."""

    def apply(c: ml_collections.ConfigDict) -> None:
        c.num_epochs = epochs
        c.batch_size = batch_size
        c.optimizer.name = "sgd"
        c.optimizer.learning_rate = SEED_LEARNING_RATE
        c.optimizer.momentum = 0.0
        c.optimizer.weight_decay = 0.0
        c.schedule.name = "constant"
        c.schedule.warmup_epochs = 0.0
        if temperature is not None:
            c.simclr.temperature = temperature

    return apply


def build(*, dataset: str, task: str, arg: str | None,
          presets: Mapping[str, Preset] | None = None,
          modify: Preset | None = None) -> ml_collections.ConfigDict:
    """Base config, then `modify` (the experiment's own edits), then the presets named in `arg`."""
    c = base(dataset, task)
    if modify is not None:
        modify(c)
    available = {"tiny": tiny, **(presets or {})}
    for name in filter(None, (arg or "").split(",")):
        if name not in available:
            raise UserError(
                f"Unknown config preset {name!r}; this config knows {sorted(available)} "
                f"(use e.g. --config=configs/<experiment>.py:{sorted(available)[0]}).")
        available[name](c)
    c.lock()
    return c
