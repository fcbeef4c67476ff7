"""tf.data input: TFRecord shards -> per-host numpy batches (DESIGN.md "Host batch").

    aerial        [b, H, W, Ca]     uint8    raw
    sits          [b, T, h, w, Cs]  float32  raw reflectance
    dates         [b, T]            int32
    sits_valid    [b, T]            bool
    label         [b, H, W]         int32    255 = ignore
    example_valid [b]               bool     (eval only; False marks padding)

b = global_batch_size // process_count. Normalization and augmentation are *not* done here: they run
on the device inside the jitted step (lcssl/data/normalize.py, augment.py), because uint8 crosses the
host->device link with 4x fewer bytes than float32, the 2-core hosts stay free for decoding, and the
augmentations draw from the step's explicit RNG, so a resumed run is exact.

Train order. Each host reads its own shards (`files[process_index::process_count]`), or, when there
are fewer shards than hosts, every host reads all shards in the same order and keeps every
process_count-th example. An *epoch* is `repeats = ceil(b / n_host)` passes over the host's n_host
examples (1 unless the host has fewer examples than a batch); its order is a function of
(seed, epoch) only: shard order and the shuffle buffer are seeded with `seed * 1_000_003 + epoch`.
Batches do not cross epochs (the remainder of an epoch is dropped; different examples each epoch),
so steps_per_epoch = repeats * n_host // b and resuming at `start_step` starts the pipeline at epoch
start_step // steps_per_epoch and skips (start_step % steps_per_epoch) * b *serialized* records of
that epoch before parsing: exactly the batches an uninterrupted run sees, at the cost of reading
(not decoding) at most one epoch.

TensorFlow is imported lazily with GPUs hidden, so `lcssl` imports without it.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Iterator, Optional

import numpy as np

from lcssl.data.schema import CARD_NAME, FORMAT_VERSIONS, PLAN_NAME
from lcssl.files import read_json

HOST_KEYS = ("aerial", "sits", "dates", "sits_valid", "label")
_SEED_STRIDE = 1_000_003


def _tf():
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # already initialised; GPUs were hidden by the first call
        pass
    return tf


def load_card(data_dir) -> dict:
    """The dataset card of `data_dir`, checked for a known format version."""
    path = pathlib.Path(data_dir) / CARD_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{data_dir}: no {CARD_NAME}; expected a directory written by "
                                "`python -m data_prep build`")
    card = read_json(path, "dataset card")
    version = card.get("format_version")
    if version not in FORMAT_VERSIONS:
        raise ValueError(f"{path}: format_version {version!r} is unknown; this code reads {FORMAT_VERSIONS}")
    return card


@dataclasses.dataclass(frozen=True)
class HostShare:
    """What one host reads of a split."""

    files: tuple  # full paths, in read order before shuffling
    example_shard: Optional[tuple]  # (process_count, process_index) when sharding examples, else None
    num_examples: int  # examples this host yields per pass
    keep_ids: Optional[tuple]  # patch ids kept by label_fraction (None: all)


def _process(process_index, process_count):
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside 0..process_count-1={process_count - 1}")
    return process_index, process_count


def labelled_subset(data_dir, split: str, label_fraction: float, label_seed: int = 0) -> Optional[tuple]:
    """Sorted patch ids of the fixed subset kept by `label_fraction` (at least 1), or None for 1.0.

    The subset depends on (label_fraction, label_seed) and the split only, not on the training seed
    nor on the number of hosts, so few-label runs compare like with like.
    """
    if not 0.0 < label_fraction <= 1.0:
        raise ValueError(f"label_fraction: expected a fraction in (0, 1], got {label_fraction}")
    if label_fraction == 1.0:
        return None
    path = pathlib.Path(data_dir) / PLAN_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{data_dir}: label_fraction needs {PLAN_NAME} (patch ids per shard); not found")
    shards = read_json(path, "build plan")["splits"][split]["shards"]
    ids = sorted(i for ids in shards.values() for i in ids)
    keep = max(1, int(round(label_fraction * len(ids))))
    pick = np.random.default_rng(label_seed).choice(len(ids), size=keep, replace=False)
    return tuple(sorted(ids[i] for i in pick))


def host_share(data_dir, card: dict, split: str, process_index: int, process_count: int,
               keep_ids: Optional[tuple] = None) -> HostShare:
    if split not in card["splits"]:
        raise KeyError(f"{data_dir}/{CARD_NAME}: no split {split!r}; splits are {sorted(card['splits'])}")
    info = card["splits"][split]
    files, counts = list(info["files"]), list(info["shard_examples"])
    if keep_ids is not None:
        plan = read_json(pathlib.Path(data_dir) / PLAN_NAME, "build plan")["splits"][split]["shards"]
        keep = set(keep_ids)
        counts = [sum(i in keep for i in plan[f]) for f in files]
    if not files:
        raise ValueError(f"{data_dir}/{CARD_NAME}: split {split!r} has no examples")
    paths = [str(pathlib.Path(data_dir) / f) for f in files]
    if len(files) >= process_count:
        mine = range(process_index, len(files), process_count)
        return HostShare(tuple(paths[i] for i in mine), None, sum(counts[i] for i in mine), keep_ids)
    total = sum(counts)
    return HostShare(tuple(paths), (process_count, process_index),
                     len(range(process_index, total, process_count)), keep_ids)


def _records(tf, files, share: HostShare, cycle_length: int):
    """Interleaved serialized records of `files` (a string dataset), filtered and example-sharded."""
    ds = files.interleave(tf.data.TFRecordDataset, cycle_length=cycle_length, block_length=1,
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if share.keep_ids is not None:
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(share.keep_ids), tf.ones(len(share.keep_ids), tf.int32)),
            default_value=0)
        spec = {"patch_id": tf.io.FixedLenFeature([], tf.string)}
        ds = ds.filter(lambda r: table.lookup(tf.io.parse_single_example(r, spec)["patch_id"]) > 0)
    if share.example_shard is not None:
        ds = ds.shard(*share.example_shard)
    return ds


def _host_batch_fn(card: dict):
    from lcssl.data.records import decode_fn

    decode = decode_fn(card)
    tf = _tf()

    def to_host(serialized):
        r = decode(serialized)
        return {
            "aerial": r["aerial"],
            "sits": tf.cast(r["sits"], tf.float32),
            "dates": r["dates"],
            "sits_valid": r["sits_valid"],
            "label": tf.cast(r["label"], tf.int32),
        }

    return to_host


def _options(tf):
    opts = tf.data.Options()
    opts.deterministic = True
    opts.experimental_optimization.map_parallelization = True
    return opts


def _host_batch(global_batch_size: int, process_index, process_count) -> tuple[int, int, int]:
    """(process_index, process_count, per-host batch size); the global batch must split evenly."""
    process_index, process_count = _process(process_index, process_count)
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}")
    return process_index, process_count, global_batch_size // process_count


def make_train_iterator(data_dir, split: str = "train", *, global_batch_size: int, seed: int, start_step: int = 0,
                        shuffle_buffer: int = 256, process_index: Optional[int] = None,
                        process_count: Optional[int] = None, label_fraction: float = 1.0, label_seed: int = 0,
                        cycle_length: int = 8) -> Iterator[dict]:
    """Infinite iterator of host batches (see the module docstring for the order and resume rule).

    shuffle_buffer holds serialized records (~2 MB each at 512 px: 256 -> ~0.5 GB per host).
    label_fraction < 1 keeps the fixed subset `labelled_subset(data_dir, split, label_fraction, label_seed)`.
    """
    tf = _tf()
    process_index, process_count, b = _host_batch(global_batch_size, process_index, process_count)
    card = load_card(data_dir)
    share = host_share(data_dir, card, split, process_index, process_count,
                       labelled_subset(data_dir, split, label_fraction, label_seed))
    if share.num_examples == 0:
        raise ValueError(f"{data_dir}: split {split!r} leaves no example to host {process_index} of {process_count}")
    repeats = math.ceil(b / share.num_examples)
    steps_per_epoch = repeats * share.num_examples // b
    start_epoch, skip_batches = divmod(int(start_step), steps_per_epoch)
    num_files = len(share.files)

    def epoch(e):
        epoch_seed = tf.constant(seed, tf.int64) * _SEED_STRIDE + e
        files = tf.data.Dataset.from_tensor_slices(list(share.files)).repeat(repeats)
        files = files.shuffle(num_files * repeats, seed=epoch_seed)
        ds = _records(tf, files, share, min(cycle_length, num_files * repeats))
        ds = ds.shuffle(shuffle_buffer, seed=epoch_seed)
        ds = ds.skip(tf.where(e == start_epoch, tf.constant(skip_batches * b, tf.int64), tf.constant(0, tf.int64)))
        return ds.batch(b, drop_remainder=True)

    ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch)
    ds = ds.map(_host_batch_fn(card), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options(tf))
    return ds.as_numpy_iterator()


def make_eval_iterator(data_dir, split: str, *, global_batch_size: int, process_index: Optional[int] = None,
                       process_count: Optional[int] = None, cycle_length: int = 8) -> Iterator[dict]:
    """Finite iterator: every example of the split exactly once over all hosts, in a fixed order.

    Every host yields the same number of batches (collectives need it): the last ones are padded
    with zero rows marked `example_valid=False`.
    """
    tf = _tf()
    process_index, process_count, b = _host_batch(global_batch_size, process_index, process_count)
    card = load_card(data_dir)
    shares = [host_share(data_dir, card, split, i, process_count) for i in range(process_count)]
    share = shares[process_index]
    num_batches = max(math.ceil(s.num_examples / b) for s in shares)
    to_host = _host_batch_fn(card)

    def pad(serialized):
        batch = to_host(serialized)
        n = tf.shape(serialized)[0]
        out = {k: tf.pad(v, [[0, b - n]] + [[0, 0]] * (len(v.shape) - 1)) for k, v in batch.items()}
        out = {k: tf.ensure_shape(v, [b] + v.shape[1:].as_list()) for k, v in out.items()}
        out["example_valid"] = tf.range(b) < n
        return out

    files = tf.data.Dataset.from_tensor_slices(list(share.files))
    ds = _records(tf, files, share, min(cycle_length, len(share.files)))
    ds = ds.batch(b).map(pad, num_parallel_calls=tf.data.AUTOTUNE)
    extra = num_batches - math.ceil(share.num_examples / b)
    if extra:
        empty = tf.data.Dataset.from_tensors(tf.constant([], tf.string)).map(pad).repeat(extra)
        ds = ds.concatenate(empty)
    ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options(tf))
    return ds.as_numpy_iterator()
