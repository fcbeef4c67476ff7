"""tf.data input: TFRecord shards -> per-host numpy batches (DESIGN.md "Host batch").

    aerial        [b, H, W, Ca]     uint8    raw
    sits          [b, T, h, w, Cs]  float32  raw reflectance
    dates         [b, T]            int32
    sits_valid    [b, T]            bool
    label         [b, H, W]         int32    255 = ignore
    zone          [b]               int32    (train only) index of the record's zone in
                                             zone_names(card, split); -1 if the card lists none
    example_valid [b]               bool     (eval only; False marks padding)

b = global_batch_size // process_count. Normalization and augmentation are *not* done here: they run
on the device inside the jitted step (lcssl/data/normalize.py, augment.py), because uint8 crosses the
host->device link with 4x fewer bytes than float32, the 2-core hosts stay free for decoding, and the
augmentations draw from the step's explicit RNG, so a resumed run is exact.

One global order. Every host reads the same stream of serialized records: all shards of the split,
interleaved (`cycle_length` shards at a time), grouped into *global* batches of global_batch_size
records; host p keeps records [p*b, (p+1)*b) of each global batch and decodes only those. The global
batch sequence (the hosts' batches concatenated in process order, as `sharding.host_batch_to_global`
assembles them) is therefore the same for any process count, and a run resumed on another number of
hosts continues exactly. The price: every host reads (not decodes) every record, process_count times
the I/O of disjoint per-host shards.

Train order. An *epoch* is `repeats = ceil(B / n)` passes over the split's n examples (1 unless the
split is smaller than a global batch B); its order is a function of (seed, epoch) only: shard order
and the shuffle buffer are seeded with `seed * 1_000_003 + epoch`. Batches do not cross epochs (the
remainder of an epoch is dropped; different examples each epoch), so steps_per_epoch = repeats * n // B
and resuming at `start_step` starts at epoch start_step // steps_per_epoch and skips
(start_step % steps_per_epoch) * B *serialized* records of that epoch before parsing: exactly the
batches an uninterrupted run sees, at the cost of reading (not decoding) at most one epoch.

Eval order: the split once, shards in card order. Every host counts batches from the records it
actually reads (the same stream on every host), so all hosts yield the same number of batches
whatever the card says: the eval collectives cannot hang on a short shard.

Shards are checked when a dataset is opened (`load_card`): each must exist with the byte size the
card records; one that differs is walked to say how (cut inside a record, cut at a record boundary,
rewritten). `python -m data_prep verify DATA_DIR` also checks record counts and sha256. A record
damaged inside a shard of the right size is met while reading: TensorFlow's DataLossError then
becomes a `ShardError` naming the shard and the record (`_naming_damaged_shards`).

Two readers of the same shards, chosen by `reader` (`--config.input`): 'tfdata' (this module) and
'native' (lcssl/data/native.py: an index of record offsets, no TensorFlow, each host reading only its
own records). Where TensorFlow cannot be imported, 'tfdata' falls back to 'native' with one log line.
TensorFlow is imported lazily with GPUs hidden, so `lcssl` imports without it.
"""
from __future__ import annotations

import math
import os
import pathlib
from typing import Iterator, Optional

from absl import logging
import numpy as np

from lcssl.data.schema import CARD_CHECKSUM, CARD_NAME, FORMAT_VERSIONS, PLAN_NAME, card_checksum, zone_key
from lcssl.errors import UserError
from lcssl.files import read_json

READERS = ("tfdata", "native")
DEFAULT_READER = "tfdata"  # --config.input of training and of the study, predict's --input
HOST_KEYS = ("aerial", "sits", "dates", "sits_valid", "label")
_SEED_STRIDE = 1_000_003
SPLIT_FIELDS = ("num_examples", "files", "shard_examples", "shard_bytes", "shard_sha256")


def _tf():
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # already initialised; GPUs were hidden by the first call
        pass
    return tf


_FELL_BACK = []


def choose_reader(reader: str) -> str:
    """The reader that runs: `reader` ('tfdata' | 'native'), except 'tfdata' where TensorFlow
    cannot be imported: 'native', said once in the log."""
    if reader not in READERS:
        raise UserError(f"--config.input={reader!r}: expected one of {', '.join(READERS)}")
    if reader == "tfdata":
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            if not _FELL_BACK:
                logging.info(
                    "TensorFlow is not installed: reading the shards with the native reader (input=native).")
                _FELL_BACK.append(True)
            return "native"
    return reader


def load_card(data_dir, check_shards: bool = True, check_content: bool = True) -> dict:
    """The dataset card of `data_dir`, checked for a known format version, for content that its
    checksum still covers (a hand edit or damage is named; `check_content=False` leaves that to the
    caller: `data_prep verify`), for shard names inside `data_dir` and, by default, for
    shards that are missing or whose size differs from the card (`records.ShardError`, naming the
    shard and what to do): a damaged dataset fails at start-up, not hours into training."""
    path = pathlib.Path(data_dir) / CARD_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{data_dir}: no {CARD_NAME}; expected a directory written by "
                                "`python -m data_prep build`")
    card = read_json(path, "dataset card")
    if not isinstance(card, dict):
        raise ValueError(f"{path}: a dataset card is a JSON object, this one is a {type(card).__name__}; "
                         "re-run the `python -m data_prep build` command that made it")
    version = card.get("format_version")
    if version in (1, 2):
        what = "no shard sizes or hashes, so its shards" if version == 1 else "no checksum of its own, so edits"
        raise ValueError(f"{path}: format_version {version} records {what} cannot be checked; re-run the "
                         "`python -m data_prep build` command that made it (same --src, --out and options): it "
                         f"{'rewrites the shards and ' if version == 1 else 'keeps the shards and '}writes a "
                         f"version {FORMAT_VERSIONS[-1]} card")
    if version not in FORMAT_VERSIONS:
        raise ValueError(f"{path}: format_version {version!r} is unknown; this code reads {FORMAT_VERSIONS}")
    problem = card_structure_problem(card)
    if problem is None and check_content:
        problem = card_checksum_problem(card)
    if problem:
        raise ValueError(f"{path}: {problem}")
    if check_shards:
        check_shard_files(data_dir, card)
    return card


_REBUILD = ("re-run the `python -m data_prep build` command that made it (it keeps the shards that match and "
            "rewrites the card); `python -m data_prep verify` names what disagrees with the shards")


def card_checksum_problem(card: dict) -> Optional[str]:
    """None when the card's CARD_CHECKSUM matches its content, else what is wrong and what to do."""
    stored = card.get(CARD_CHECKSUM)
    if stored is None:
        return f"no {CARD_CHECKSUM} (the checksum `data_prep build` writes); {_REBUILD}"
    if stored != card_checksum(card):
        return (f"its content differs from what `data_prep build` wrote ({CARD_CHECKSUM} does not match): edited "
                f"by hand or damaged, so its counts and statistics cannot be trusted; {_REBUILD}")
    return None


def card_structure_problem(card: dict) -> Optional[str]:
    """None when every split has the fields the reader needs, one entry per shard, and shard names
    that stay inside the dataset folder (plain file names: no '/', no '..'), else what is wrong."""
    splits = card.get("splits")
    if not isinstance(splits, dict):
        return f"no 'splits' object; {_REBUILD}"
    for split, info in splits.items():
        missing = [k for k in SPLIT_FIELDS if not isinstance(info, dict) or k not in info]
        if missing:
            return f"split {split!r} lacks {missing}; {_REBUILD}"
        if not all(isinstance(info[k], list) for k in SPLIT_FIELDS[1:]) or len(
                {len(info[k]) for k in SPLIT_FIELDS[1:]}) != 1:
            return f"split {split!r}: {', '.join(SPLIT_FIELDS[1:])} are not lists of one entry per shard; {_REBUILD}"
        for name in info["files"]:
            if not _plain_file_name(name):
                return (f"split {split!r} names the shard {name!r}, which is not a plain file name inside the "
                        f"dataset folder; shard names are written by `data_prep build` (e.g. "
                        f"{split}-00000-of-00001.tfrecord); {_REBUILD}")
    return None


def _plain_file_name(name) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and pathlib.PurePath(name).name == name)


def check_shard_files(data_dir, card: dict, splits=None, check_sha256: bool = False) -> list:
    """Every shard of `splits` (default: all) against the card.

    Without `check_sha256` (one stat per shard): returns [] or raises `records.ShardError` naming the
    first damaged shard and what to do. With it (reads every byte, `data_prep verify`): returns
    [(shard path, problem)] for every damaged shard.
    """
    from lcssl.data.records import ShardError, shard_problem

    problems = []
    for split in (card["splits"] if splits is None else splits):
        info = card["splits"][split]
        for k, name in enumerate(info["files"]):
            shard = pathlib.Path(data_dir) / name
            problem = _outside(data_dir, shard) or shard_problem(
                shard, num_examples=info["shard_examples"][k], num_bytes=info["shard_bytes"][k],
                sha256=info["shard_sha256"][k], check_sha256=check_sha256)
            if problem is None:
                continue
            if check_sha256:
                problems.append((str(shard), problem))
                continue
            raise ShardError(
                f"{shard}: {problem}. The dataset in {data_dir} is damaged: `python -m data_prep verify "
                f"{data_dir}` lists every damaged shard, and re-running the `python -m data_prep build` command "
                "that made it rewrites them")
    return problems


def _outside(data_dir, shard: pathlib.Path) -> Optional[str]:
    """What is wrong with a shard that is a link to a file outside the dataset folder, else None."""
    real, root = os.path.realpath(shard), os.path.realpath(data_dir)
    if os.path.commonpath([real, root]) == root:
        return None
    return (f"a link to {real}, outside the dataset folder; a shard is a file inside {data_dir} (written "
            "there by `python -m data_prep build`): copy the file in, or re-run the build")


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


def split_files(data_dir, card: dict, split: str, keep_ids: Optional[tuple] = None) -> tuple[list, int]:
    """(shard paths in card order, number of examples kept) of a split; keep_ids: see labelled_subset."""
    if split not in card["splits"]:
        raise KeyError(f"{data_dir}/{CARD_NAME}: no split {split!r}; splits are {sorted(card['splits'])}")
    info = card["splits"][split]
    if not info["files"]:
        raise ValueError(f"{data_dir}/{CARD_NAME}: split {split!r} has no examples")
    num_examples = sum(info["shard_examples"]) if keep_ids is None else len(keep_ids)
    return [str(pathlib.Path(data_dir) / f) for f in info["files"]], num_examples


def _records(tf, files, keep_ids: Optional[tuple], cycle_length: int):
    """Interleaved serialized records of `files` (a string dataset), filtered to keep_ids."""
    ds = files.interleave(tf.data.TFRecordDataset, cycle_length=cycle_length, block_length=1,
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if keep_ids is not None:
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(keep_ids), tf.ones(len(keep_ids), tf.int32)),
            default_value=0)
        spec = {"patch_id": tf.io.FixedLenFeature([], tf.string)}
        ds = ds.filter(lambda r: table.lookup(tf.io.parse_single_example(r, spec)["patch_id"]) > 0)
    return ds


def _mine(global_batch_size: int, lo: int, hi: int):
    """filter(i, record): True for the records in this host's slots [lo, hi) of their global batch."""
    def keep(i, record):
        slot = i % global_batch_size
        return (slot >= lo) & (slot < hi)

    return keep


def _host_batch_fn(card: dict, with_zone: bool = False):
    """serialized records -> the host batch; with_zone: also their 'domain' and 'zone' strings,
    which zone_indexer turns into the `zone` index."""
    from lcssl.data.records import decode_fn

    decode = decode_fn(card)
    tf = _tf()

    def to_host(serialized):
        r = decode(serialized)
        out = {
            "aerial": r["aerial"],
            "sits": tf.cast(r["sits"], tf.float32),
            "dates": r["dates"],
            "sits_valid": r["sits_valid"],
            "label": tf.cast(r["label"], tf.int32),
        }
        if with_zone:
            out.update(domain=r["domain"], zone=r["zone"])
        return out

    return to_host


def zone_names(card: dict, split: str) -> Optional[tuple]:
    """The zones the card lists for `split` (as schema.zone_key names them), sorted: a training
    batch's `zone` field is an index into them. None for a card that lists no zones for the split
    (its batches then carry zone -1 in every row)."""
    zones = card["splits"][split].get("zones")
    return None if zones is None else tuple(sorted(zones))


def zone_indices(data_dir, card: dict, split: str, keys) -> np.ndarray:
    """int32 [n]: the index in zone_names(card, split) of each zone key (schema.zone_key), -1 for
    every one where the card lists no zones. A zone the card does not list for the split is an
    error: the card does not describe the shards."""
    names = zone_names(card, split)
    if names is None:
        return np.full(len(keys), -1, np.int32)
    index = {name: i for i, name in enumerate(names)}
    missing = sorted(set(keys) - index.keys())
    if missing:
        raise UserError(f"{data_dir}/{CARD_NAME}: split {split!r} holds patches of zones {missing}, which "
                        f"the card does not list for it ({list(names)}): the card does not describe these "
                        f"shards; {_REBUILD}")
    return np.asarray([index[k] for k in keys], np.int32)


def zone_indexer(data_dir, card: dict, split: str):
    """indexed(batch) -> the batch with its records' 'domain' and 'zone' strings [b] replaced by
    `zone` int32 [b], their `zone_indices`. Both readers call it, so they give the same indices."""
    def indexed(batch: dict) -> dict:
        domains, zones = batch.pop("domain"), batch.pop("zone")
        keys = [zone_key(bytes(d).decode(), bytes(z).decode()) for d, z in zip(domains, zones)]
        batch["zone"] = zone_indices(data_dir, card, split, keys)
        return batch

    return indexed


def _each(fn, batches: Iterator[dict]) -> Iterator[dict]:
    """fn(batch) for each batch; closing this iterator closes `batches`."""
    try:
        for batch in batches:
            yield fn(batch)
    finally:
        batches.close()


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
                        cycle_length: int = 8, reader: str = "tfdata", zones_per_batch: int = 0) -> Iterator[dict]:
    """Infinite iterator of host batches (see the module docstring for the order and resume rule;
    reader='native': lcssl/data/native.py's order, which ignores shuffle_buffer and cycle_length;
    zones_per_batch > 0: batches of that many zones each, native.py's "Zone-grouped order", which
    only the native reader gives).

    shuffle_buffer holds serialized records (~2 MB each at 512 px: 256 -> ~0.5 GB per host).
    label_fraction < 1 keeps the fixed subset `labelled_subset(data_dir, split, label_fraction, label_seed)`.
    """
    if choose_reader(reader) == "native":
        from lcssl.data import native

        return native.make_train_iterator(data_dir, split, global_batch_size=global_batch_size, seed=seed,
                                          start_step=start_step, process_index=process_index,
                                          process_count=process_count, label_fraction=label_fraction,
                                          label_seed=label_seed, zones_per_batch=zones_per_batch)
    if zones_per_batch:
        raise UserError(f"zones_per_batch={zones_per_batch} needs the native reader (--config.input=native): "
                        "the tf.data reader streams the shards and cannot group their records by zone")
    tf = _tf()
    process_index, process_count, b = _host_batch(global_batch_size, process_index, process_count)
    card = load_card(data_dir)
    keep_ids = labelled_subset(data_dir, split, label_fraction, label_seed)
    files, num_examples = split_files(data_dir, card, split, keep_ids)
    repeats = math.ceil(global_batch_size / num_examples)
    steps_per_epoch = repeats * num_examples // global_batch_size
    start_epoch, skip_batches = divmod(int(start_step), steps_per_epoch)
    num_files = len(files)
    mine = _mine(global_batch_size, process_index * b, (process_index + 1) * b)

    def epoch(e):
        epoch_seed = tf.constant(seed, tf.int64) * _SEED_STRIDE + e
        names = tf.data.Dataset.from_tensor_slices(files).repeat(repeats)
        names = names.shuffle(num_files * repeats, seed=epoch_seed)
        ds = _records(tf, names, keep_ids, min(cycle_length, num_files * repeats))
        ds = ds.shuffle(shuffle_buffer, seed=epoch_seed)
        # Whole global batches only (the epoch's remainder is dropped); resume skips whole ones, so
        # a record's position in the epoch, counted after the skip, still gives its global batch slot.
        skip = tf.where(e == start_epoch, tf.constant(skip_batches * global_batch_size, tf.int64),
                        tf.constant(0, tf.int64))
        ds = ds.take(steps_per_epoch * global_batch_size).skip(skip)
        return ds.enumerate().filter(mine).map(lambda i, r: r).batch(b, drop_remainder=True)

    ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch)
    ds = ds.map(_host_batch_fn(card, with_zone=True), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options(tf))
    return _each(zone_indexer(data_dir, card, split),
                 _naming_damaged_shards(ds.as_numpy_iterator(), data_dir, split, files))


def make_eval_iterator(data_dir, split: str, *, global_batch_size: int, process_index: Optional[int] = None,
                       process_count: Optional[int] = None, cycle_length: int = 8,
                       reader: str = "tfdata") -> Iterator[dict]:
    """Finite iterator: every example of the split exactly once over all hosts, in a fixed order
    (the same for both readers).

    Every host yields the same number of batches (collectives need it), counted from the records
    read: the rows past the end of the last global batch are zeros marked `example_valid=False`.
    """
    if choose_reader(reader) == "native":
        from lcssl.data import native

        return native.make_eval_iterator(data_dir, split, global_batch_size=global_batch_size,
                                         process_index=process_index, process_count=process_count,
                                         cycle_length=cycle_length)
    tf = _tf()
    process_index, process_count, b = _host_batch(global_batch_size, process_index, process_count)
    card = load_card(data_dir)
    files, _ = split_files(data_dir, card, split)
    to_host = _host_batch_fn(card)
    mine = _mine(global_batch_size, process_index * b, (process_index + 1) * b)

    def pad(serialized, is_pad):
        n = tf.reduce_sum(tf.cast(~is_pad, tf.int32))  # padding comes after every record
        batch = to_host(serialized[:n])
        out = {k: tf.pad(v, [[0, b - n]] + [[0, 0]] * (len(v.shape) - 1)) for k, v in batch.items()}
        out = {k: tf.ensure_shape(v, [b] + v.shape[1:].as_list()) for k, v in out.items()}
        out["example_valid"] = ~is_pad
        return out

    names = tf.data.Dataset.from_tensor_slices(files)
    ds = _records(tf, names, None, min(cycle_length, len(files))).map(lambda r: (r, False))
    # The stream is padded to whole global batches without knowing its length: B - 1 padding entries
    # at most, up to the first one that would open a new global batch. Every host sees the same
    # stream, hence the same number of global batches, and takes b entries of each.
    padding = tf.data.Dataset.from_tensors((tf.constant(b""), True)).repeat(global_batch_size)
    ds = ds.concatenate(padding).enumerate()

    def before_padding_batch(i, x):  # named functions: AutoGraph warns about lambdas on one line
        return ~(x[1] & (i % global_batch_size == 0))

    def record(i, x):
        return x

    ds = ds.take_while(before_padding_batch)
    ds = ds.filter(mine).map(record).batch(b)
    ds = ds.map(pad, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options(tf))
    return _naming_damaged_shards(ds.as_numpy_iterator(), data_dir, split, files)


def _naming_damaged_shards(batches, data_dir, split: str, files: list) -> Iterator[dict]:
    """`batches`, with TensorFlow's DataLossError (a record whose length or data fails its CRC; its
    message names neither shard nor record) turned into a ShardError naming both: the split's
    shards are walked, checking every record's CRC, until the damaged one is found."""
    from lcssl.data.records import ShardError, shard_facts

    tf = _tf()
    try:
        yield from batches
    except tf.errors.DataLossError as e:
        found = None
        for shard in dict.fromkeys(files):
            facts = shard_facts(shard, check_data=True)
            if facts.corrupt_record is not None or facts.cut_mid_record:
                found = (shard, f"corrupt record {facts.corrupt_record} (counting from 0; {facts.corrupt_what})"
                         if facts.corrupt_record is not None else
                         f"cut inside a record after {facts.num_records} complete records")
                break
        where = f"{found[0]}: {found[1]}" if found else (
            f"a shard of split {split!r} in {data_dir} is damaged (TensorFlow: {e.message.splitlines()[-1]})")
        raise ShardError(
            f"{where}, met while reading split {split!r}. `python -m data_prep verify {data_dir}` lists every "
            "damaged shard; re-running the `python -m data_prep build` command that made the dataset rewrites "
            "them, then the same training command resumes") from None
