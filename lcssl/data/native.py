"""The native reader: the same host batches as the tf.data reader (lcssl/data/pipeline.py), read
from the same TFRecord shards without TensorFlow, each host reading only its own records.

    index      per shard, the byte offset and length of every record: found by walking the length
               headers (each checked by its CRC) on first open, cached beside the shard as
               `<shard>.index.npz` (temp name, then rename; keyed by the card's sha256 of the shard,
               so a rebuilt shard gets a new index; a read-only folder keeps it in memory)
    read       one `os.pread` per record; its length header and data are checked by their CRCs, a
               failing record is named in one line (shard, record number) and nothing is decoded
    decode     `tf.train.Example` parsed from its protobuf wire format here (Example -> Features ->
               map<string, Feature> -> bytes_list | float_list | int64_list, packed or not), raw
               little-endian arrays reshaped by the card's shapes (lcssl/data/records.py)
    batches    numpy host batches with pipeline's keys, dtypes and shapes, built by a background
               thread (a small pool reads and decodes the records of a batch) a few batches ahead

Train order. The split's records are numbered in card order (shard by shard, record by record). An
epoch is `repeats = ceil(B / n)` passes over the n records, in the order of a permutation of
repeats * n drawn from (seed * 1_000_003 + epoch) only; global batch s of the epoch is positions
[s*B, (s+1)*B) of it (the remainder is dropped) and host p reads positions [s*B + p*b, s*B + (p+1)*b).
So the global batch sequence is the same for any host count, each host reads only b records per step,
and a resume at `start_step` starts there without reading anything before it. The order differs from
the tf.data reader's (a shuffle buffer over interleaved shards); the examples and their decoded
values are the same.

Zone-grouped order (`zones_per_batch` = k > 0, pre-training with same-zone negatives): every global
batch is k chunks of B / k records, each chunk from one zone, so an anchor meets B / k - 1 patches of
its own zone instead of about B / (number of zones). A pass shuffles each zone's records, cuts them
into chunks (a zone's remainder sits the pass out), shuffles the chunks and takes them k at a time
(`zone_grouped_order`), all drawn from (seed * 1_000_003 + pass); global batch s is in pass
s // P, P = `zone_grouped_batches` (the same for every pass), so a resume starts there as above.
The zone of each record is read once, when the iterator opens, and cached with the shard's index.
Only this reader groups by zone (it reads records by number; the tf.data reader streams them).

Eval order: the split once, in exactly the tf.data reader's order (its deterministic interleave of
the shards in card order, `cycle_length` at a time, one record per turn), padded to whole global
batches with zero rows marked `example_valid=False`; the batch count comes from the indexes of the
files read, so every host yields the same number of batches.
"""
from __future__ import annotations

import concurrent.futures
import io
import math
import os
import pathlib
import queue
import struct
import threading
from typing import Callable, Iterator, Optional

from absl import logging
import numpy as np

from lcssl.data import pipeline
from lcssl.data.records import _FOOTER_BYTES, _HEADER_BYTES, ShardError, masked_crc32c, record_shapes
from lcssl.data.schema import zone_key
from lcssl.errors import UserError

INDEX_SUFFIX = ".index.npz"


class RecordError(ShardError, UserError):
    """A record that fails its CRC or does not decode; the message names the shard and record."""


# ------------------------------------------------------------------------------------------------
# Index of record offsets
# ------------------------------------------------------------------------------------------------

def walk_records(path) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, lengths) int64 [n] of the records of a TFRecord file: offset of each record's
    length header, length of its data. Raises RecordError for a length header that fails its CRC
    or a file cut inside a record."""
    offsets, lengths = [], []
    size = os.path.getsize(path)
    offset = 0
    with open(path, "rb") as f:
        while offset < size:
            header = f.read(_HEADER_BYTES)
            where = f"{path}: record {len(offsets)} (counting from 0)"
            if len(header) < _HEADER_BYTES:
                raise RecordError(f"{where}: the file ends inside its length header; {_REBUILD}")
            (length,) = struct.unpack("<Q", header[:8])
            if masked_crc32c(header[:8]) != struct.unpack("<I", header[8:])[0]:
                raise RecordError(f"{where}: its length header fails its CRC; {_REBUILD}")
            if offset + _HEADER_BYTES + length + _FOOTER_BYTES > size:
                raise RecordError(f"{where}: the file ends inside this record; {_REBUILD}")
            offsets.append(offset)
            lengths.append(length)
            offset += _HEADER_BYTES + length + _FOOTER_BYTES
            f.seek(offset)
    return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)


_REBUILD = ("`python -m data_prep verify DATA_DIR` lists every damaged shard; re-running the "
            "`python -m data_prep build` command that made the dataset rewrites them")


def _index_matches(index, sha256: str, num_records: int, num_bytes: int) -> bool:
    offsets, lengths = index["offsets"], index["lengths"]
    return (str(index["sha256"]) == sha256 and len(offsets) == len(lengths) == num_records
            and (num_records == 0 and num_bytes == 0
                 or num_records > 0 and int(offsets[-1] + lengths[-1]) + _HEADER_BYTES + _FOOTER_BYTES == num_bytes))


def shard_index(shard, *, sha256: str, num_records: int, num_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, lengths) of `shard`'s records: from its cached index when that was made from the
    same shard (sha256 and counts of the card), else walked and cached (atomically)."""
    from lcssl import files

    shard = pathlib.Path(shard)
    cache = shard.with_name(shard.name + INDEX_SUFFIX)
    if cache.is_file():
        try:
            with np.load(cache) as index:
                if _index_matches(index, sha256, num_records, num_bytes):
                    return index["offsets"], index["lengths"]
        except (OSError, ValueError, KeyError):  # an unreadable cache is rebuilt
            pass
    offsets, lengths = walk_records(shard)
    if len(offsets) != num_records:
        raise RecordError(f"{shard}: holds {len(offsets)} records, the dataset card records {num_records}; "
                          f"{_REBUILD}")
    buffer = io.BytesIO()
    np.savez(buffer, offsets=offsets, lengths=lengths, sha256=np.asarray(sha256))
    try:
        files.atomic_write_bytes(cache, buffer.getvalue())
    except OSError as e:  # a read-only dataset folder: the index lives in memory for this run
        logging.info("Record index of %s kept in memory (cannot write %s: %s)", shard, cache, e.strerror)
    return offsets, lengths


def write_indexes(data_dir) -> int:
    """Builds (or checks) the record index of every shard of `data_dir`; returns the record count."""
    card = pipeline.load_card(data_dir)
    return sum(len(Shards(data_dir, card, split)) for split in card["splits"] if card["splits"][split]["files"])


# ------------------------------------------------------------------------------------------------
# tf.train.Example from its wire format (tensorflow/core/example/{example,feature}.proto)
# ------------------------------------------------------------------------------------------------

def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")


def _fields(buf, start: int, end: int):
    """(field number, wire type, value) of the message buf[start:end]; value: an int (varint), a
    (start, end) span (length-delimited) or the span of a fixed 32/64-bit value."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value = (pos, pos + n)
            pos += n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value = (pos, pos + n)
            pos += n
        else:
            raise ValueError(f"field {number}: wire type {wire} is not used by tf.train.Example")
        if pos > end:
            raise ValueError(f"field {number} runs past the end of its message")
        yield number, wire, value


def _int64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _feature(buf, start: int, end: int):
    """One Feature: ('bytes', [memoryview]) | ('float', float32 [n]) | ('int64', int64 [n]).
    Several kinds in one message: the last wins (protobuf's oneof rule)."""
    kind, values = "bytes", []  # a Feature with no kind set reads as an empty list
    for number, wire, span in _fields(buf, start, end):
        if wire != 2 or number not in (1, 2, 3):
            continue
        kind = {1: "bytes", 2: "float", 3: "int64"}[number]
        values = []
        for n2, w2, v in _fields(buf, *span):
            if n2 != 1:
                continue
            if kind == "bytes" and w2 == 2:
                values.append(buf[v[0]:v[1]])
            elif kind == "float" and w2 == 2:  # packed
                values.extend(np.frombuffer(buf[v[0]:v[1]], "<f4").tolist())
            elif kind == "float" and w2 == 5:
                values.append(struct.unpack("<f", buf[v[0]:v[1]])[0])
            elif kind == "int64" and w2 == 2:  # packed varints
                pos, stop = v
                while pos < stop:
                    x, pos = _varint(buf, pos)
                    values.append(_int64(x))
            elif kind == "int64" and w2 == 0:
                values.append(_int64(v))
            else:
                raise ValueError(f"{kind}_list value with wire type {w2}")
    if kind == "float":
        return kind, np.asarray(values, np.float32)
    if kind == "int64":
        return kind, np.asarray(values, np.int64)
    return kind, values


def parse_example(serialized) -> dict:
    """{name: (kind, values)} of a serialized tf.train.Example (see `_feature`); a name given twice:
    the last wins, as in protobuf's map parsing."""
    buf = memoryview(serialized)
    out = {}
    for number, wire, span in _fields(buf, 0, len(buf)):
        if number != 1 or wire != 2:  # Example.features
            continue
        for n2, w2, entry in _fields(buf, *span):
            if n2 != 1 or w2 != 2:  # Features.feature (map entries)
                continue
            key, value = b"", (0, 0)
            for n3, w3, v in _fields(buf, *entry):
                if n3 == 1 and w3 == 2:
                    key = bytes(buf[v[0]:v[1]])
                elif n3 == 2 and w3 == 2:
                    value = v
            out[key.decode()] = _feature(buf, *value)
    return out


def _one_bytes(features: dict, name: str) -> bytes:
    """The single bytes value of feature `name` (a ValueError saying what is wrong otherwise)."""
    if name not in features:
        raise ValueError(f"no feature {name!r}")
    found, values = features[name]
    if found != "bytes" or len(values) != 1:
        raise ValueError(f"feature {name!r}: expected one bytes value, found {len(values)} {found}")
    return bytes(values[0])


def decode_record(serialized, shapes) -> dict:
    """A record as numpy arrays with records.decode_fn's fields, dtypes and shapes (one example)."""
    features = parse_example(serialized)

    def get(name, kind):
        if name not in features:
            raise ValueError(f"no feature {name!r}")
        found, values = features[name]
        if found != kind or (kind == "bytes" and len(values) != 1):
            raise ValueError(f"feature {name!r}: expected one {kind} value, found {len(values)} {found}")
        return values[0] if kind == "bytes" else values

    def raw(name, dtype, shape):
        data = get(name, "bytes")
        dtype = np.dtype(dtype).newbyteorder("<")
        if len(data) != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"feature {name!r}: {len(data)} bytes, expected {shape} {dtype.name}")
        return np.frombuffer(data, dtype).reshape(shape)

    def ints(name, n):
        values = get(name, "int64")
        if len(values) != n:
            raise ValueError(f"feature {name!r}: {len(values)} values, expected {n}")
        return values

    has_label = ints("has_label", 1)
    return {
        "patch_id": bytes(get("patch_id", "bytes")),
        "zone": bytes(get("zone", "bytes")),
        "domain": bytes(get("domain", "bytes")),
        "aerial": raw("aerial", np.uint8, shapes.aerial),
        "label": raw("label", np.uint8, shapes.label),
        "has_label": np.bool_(has_label[0]),
        "sits": raw("sits", np.uint16, shapes.sits),
        "sits_valid": ints("sits_valid", shapes.max_dates).astype(bool),
        "dates": ints("dates", shapes.max_dates).astype(np.int32),
    }


# ------------------------------------------------------------------------------------------------
# Random access to a split
# ------------------------------------------------------------------------------------------------

class Shards:
    """The records of a split, numbered in card order: `read(i)` -> the serialized record, checked
    by its CRCs. Thread-safe (positional reads)."""

    def __init__(self, data_dir, card: dict, split: str):
        files, _ = pipeline.split_files(data_dir, card, split)
        info = card["splits"][split]
        self.files = files
        self.counts = []
        self._offsets, self._lengths = [], []
        self._card_facts = [dict(sha256=info["shard_sha256"][k], num_records=info["shard_examples"][k],
                                 num_bytes=info["shard_bytes"][k]) for k in range(len(files))]
        for k, path in enumerate(files):
            offsets, lengths = shard_index(path, **self._card_facts[k])
            self._offsets.append(offsets)
            self._lengths.append(lengths)
            self.counts.append(len(offsets))
        self._starts = np.cumsum([0] + self.counts)
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """(shard number, record number in that shard) of record i."""
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return k, int(i - self._starts[k])

    def _fd(self, k: int) -> int:
        with self._lock:
            if k not in self._fds:
                self._fds[k] = os.open(self.files[k], os.O_RDONLY)
            return self._fds[k]

    def read(self, i: int) -> bytes:
        k, j = self.locate(i)
        offset, length = int(self._offsets[k][j]), int(self._lengths[k][j])
        data = os.pread(self._fd(k), _HEADER_BYTES + length + _FOOTER_BYTES, offset)
        where = f"{self.files[k]}: record {j} (counting from 0)"
        if len(data) != _HEADER_BYTES + length + _FOOTER_BYTES:
            raise RecordError(f"{where}: the file ends inside it (changed since the dataset was opened); {_REBUILD}")
        header, payload, footer = data[:8], data[_HEADER_BYTES:-_FOOTER_BYTES], data[-_FOOTER_BYTES:]
        if (struct.unpack("<Q", header)[0] != length
                or masked_crc32c(header) != struct.unpack("<I", data[8:_HEADER_BYTES])[0]):
            raise RecordError(f"{where}: its length header fails its CRC; {_REBUILD}")
        if masked_crc32c(payload) != struct.unpack("<I", footer)[0]:
            raise RecordError(f"{where}: its data fails its CRC; {_REBUILD}")
        return payload

    def decode(self, i: int, shapes) -> dict:
        payload = self.read(i)
        try:
            return decode_record(payload, shapes)
        except (ValueError, IndexError) as e:
            k, j = self.locate(i)
            raise RecordError(f"{self.files[k]}: record {j} (counting from 0) is not a record of this dataset "
                              f"({e}); {_REBUILD}") from None

    def zones(self) -> list:
        """The zone of every record (schema.zone_key of its domain and zone), card order: from each
        shard's cached index where it holds them, else read from the shard's records once (a pass
        over its bytes) and added to that cache (atomically; kept in memory where it cannot be
        written)."""
        from lcssl import files

        out = []
        for k, shard in enumerate(self.files):
            cache = pathlib.Path(shard).with_name(pathlib.Path(shard).name + INDEX_SUFFIX)
            try:
                with np.load(cache) as index:
                    if _index_matches(index, **self._card_facts[k]) and "zones" in index.files:
                        out.extend(str(z) for z in index["zones"])
                        continue
            except (OSError, ValueError, KeyError):  # an unreadable cache is rewritten
                pass
            zones = []
            for j in range(self.counts[k]):
                features = parse_example(self.read(int(self._starts[k]) + j))
                try:
                    zones.append(zone_key(*(_one_bytes(features, name).decode() for name in ("domain", "zone"))))
                except ValueError as e:
                    raise RecordError(f"{shard}: record {j} (counting from 0) is not a record of this "
                                      f"dataset ({e}); {_REBUILD}") from None
            buffer = io.BytesIO()
            np.savez(buffer, offsets=self._offsets[k], lengths=self._lengths[k],
                     sha256=np.asarray(self._card_facts[k]["sha256"]), zones=np.asarray(zones, dtype=str))
            try:
                files.atomic_write_bytes(cache, buffer.getvalue())
            except OSError as e:
                logging.info("Record zones of %s kept in memory (cannot write %s: %s)", shard, cache, e.strerror)
            out.extend(zones)
        return out

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def interleave_order(counts: list, cycle_length: int) -> np.ndarray:
    """Record numbers (card order) in the order of tf.data's deterministic
    `Dataset.interleave(cycle_length, block_length=1)` over the shards: `cycle_length` shards open,
    one record from each in turn; a turn that finds its shard exhausted closes it and passes, and
    the next turn at that slot opens the next shard and reads from it
    (tensorflow/core/kernels/data/interleave_dataset_op.cc)."""
    starts = np.cumsum([0] + list(counts))
    slots: list = [None] * max(1, cycle_length)  # [next record, end] per slot
    next_shard, order, i = 0, [], 0
    while next_shard < len(counts) or any(s is not None for s in slots):
        slot = slots[i]
        if slot is None and next_shard < len(counts):
            slot = slots[i] = [int(starts[next_shard]), int(starts[next_shard + 1])]
            next_shard += 1
        if slot is not None:
            if slot[0] < slot[1]:
                order.append(slot[0])
                slot[0] += 1
                i = (i + 1) % len(slots)
                continue
            slots[i] = None  # exhausted: the slot takes the next shard when the turn comes back
        i = (i + 1) % len(slots)
    return np.asarray(order, np.int64)


# ------------------------------------------------------------------------------------------------
# Host batches
# ------------------------------------------------------------------------------------------------

def _host_batch(shards: Shards, shapes, indices, workers: concurrent.futures.Executor,
                expect_ids: Optional[dict] = None, with_zone: bool = False) -> dict:
    """pipeline's host batch of records `indices` (card order numbers); with_zone: also their
    'domain' and 'zone' strings, for pipeline.zone_indexer."""
    b = len(indices)
    out = {"aerial": np.empty((b, *shapes.aerial), np.uint8), "sits": np.empty((b, *shapes.sits), np.float32),
           "dates": np.empty((b, shapes.max_dates), np.int32), "sits_valid": np.empty((b, shapes.max_dates), bool),
           "label": np.empty((b, *shapes.label), np.int32)}
    if with_zone:
        out.update(domain=np.empty(b, object), zone=np.empty(b, object))

    def fill(row_index):
        row, i = row_index
        r = shards.decode(int(i), shapes)
        if expect_ids is not None and r["patch_id"].decode() != expect_ids[int(i)]:
            k, j = shards.locate(int(i))
            raise RecordError(f"{shards.files[k]}: record {j} holds patch {r['patch_id'].decode()!r}, "
                              f"{pipeline.PLAN_NAME} lists {expect_ids[int(i)]!r} there; {_REBUILD}")
        for key in out:
            out[key][row] = r[key]

    for _ in workers.map(fill, enumerate(indices)):
        pass
    return out


def _prefetched(make: Callable[[int], dict], first: int, last: Optional[int], depth: int) -> Iterator[dict]:
    """make(k) for k = first, first + 1, ... (< last when given), computed by a background thread up
    to `depth` batches ahead. Its errors are raised here; abandoning the iterator stops the thread."""
    results: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def work():
        k = first
        try:
            while not stop.is_set() and (last is None or k < last):
                item = ("batch", make(k))
                while not stop.is_set():
                    try:
                        results.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
                k += 1
            item = ("end", None)
        except BaseException as e:  # raised in the consumer
            item = ("error", e)
        while not stop.is_set():
            try:
                results.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    thread = threading.Thread(target=work, name="native-reader", daemon=True)
    thread.start()
    try:
        while True:
            what, value = results.get()
            if what == "end":
                return
            if what == "error":
                raise value
            yield value
    finally:
        stop.set()


def _workers(num_workers: Optional[int]) -> concurrent.futures.ThreadPoolExecutor:
    n = num_workers or min(8, os.cpu_count() or 1)
    return concurrent.futures.ThreadPoolExecutor(max_workers=n, thread_name_prefix="native-decode")


def _plan_ids(data_dir, split: str, shards: Shards) -> list:
    """Patch id of every record (card order), from the build plan."""
    from lcssl.files import read_json

    path = pathlib.Path(data_dir) / pipeline.PLAN_NAME
    plan = read_json(path, "build plan")["splits"][split]["shards"]
    ids = []
    for path_k, count in zip(shards.files, shards.counts):
        listed = plan.get(pathlib.Path(path_k).name)
        if listed is None or len(listed) != count:
            raise UserError(f"{path}: lists {None if listed is None else len(listed)} patches for "
                            f"{path_k}, which holds {count} records; {_REBUILD}")
        ids.extend(listed)
    return ids


def zone_grouped_order(zones: np.ndarray, global_batch_size: int, zones_per_batch: int,
                       rng: np.random.Generator) -> np.ndarray:
    """One pass of zone-grouped batches: positions into `zones` (the zone of each record), global
    batch after global batch, each made of `zones_per_batch` chunks of global_batch_size /
    zones_per_batch records of one zone. Every zone's records are shuffled and cut into chunks (its
    remainder sits this pass out), the chunks shuffled and taken zones_per_batch at a time (the
    last incomplete group sits out too), so a batch holds at most zones_per_batch zones (fewer
    when two chunks of one zone meet) and every pass has the same number of batches,
    `zone_grouped_batches(zones, ...)`."""
    size = global_batch_size // zones_per_batch
    chunks = []
    for z in np.unique(zones):
        members = np.flatnonzero(zones == z)
        members = members[rng.permutation(len(members))]
        chunks.extend(members[i * size:(i + 1) * size] for i in range(len(members) // size))
    order = rng.permutation(len(chunks))[:zone_grouped_batches(zones, global_batch_size, zones_per_batch)
                                         * zones_per_batch]
    return np.concatenate([chunks[i] for i in order]) if len(order) else np.empty(0, np.int64)


def zone_grouped_batches(zones: np.ndarray, global_batch_size: int, zones_per_batch: int) -> int:
    """Global batches in one pass of zone_grouped_order."""
    size = global_batch_size // zones_per_batch
    _, counts = np.unique(zones, return_counts=True)
    return int(sum(c // size for c in counts)) // zones_per_batch


def make_train_iterator(data_dir, split: str = "train", *, global_batch_size: int, seed: int, start_step: int = 0,
                        process_index: Optional[int] = None, process_count: Optional[int] = None,
                        label_fraction: float = 1.0, label_seed: int = 0, prefetch: int = 2,
                        num_workers: Optional[int] = None, zones_per_batch: int = 0) -> Iterator[dict]:
    """Infinite iterator of host batches in the order of the module docstring; zones_per_batch > 0:
    zone-grouped batches (the docstring's "Zone-grouped order")."""
    process_index, process_count, b = pipeline._host_batch(global_batch_size, process_index, process_count)
    card = pipeline.load_card(data_dir)
    keep_ids = pipeline.labelled_subset(data_dir, split, label_fraction, label_seed)
    shards = Shards(data_dir, card, split)
    shapes = record_shapes(card)
    expect_ids = None
    records = np.arange(len(shards), dtype=np.int64)
    if keep_ids is not None:
        ids = _plan_ids(data_dir, split, shards)
        keep = set(keep_ids)
        records = np.asarray([i for i, p in enumerate(ids) if p in keep], np.int64)
        expect_ids = dict(enumerate(ids))
    if not len(records):
        raise UserError(f"{data_dir}: split {split!r} has no records to train on")
    n, B = len(records), global_batch_size
    repeats = math.ceil(B / n)
    steps_per_epoch = repeats * n // B
    if zones_per_batch:
        record_zones = _zone_indices(data_dir, card, split, shards)[records]
        steps_per_epoch = _check_zone_groups(data_dir, split, record_zones, B, zones_per_batch)
    epoch_cache: dict = {}

    def epoch_order(e: int) -> np.ndarray:
        if e not in epoch_cache:
            epoch_cache.clear()
            rng = np.random.default_rng((int(seed) * pipeline._SEED_STRIDE + e) % (1 << 63))
            epoch_cache[e] = (records[zone_grouped_order(record_zones, B, zones_per_batch, rng)] if zones_per_batch
                              else records[rng.permutation(repeats * n) % n])
        return epoch_cache[e]

    workers = _workers(num_workers)
    indexed = pipeline.zone_indexer(data_dir, card, split)

    def batch(step: int) -> dict:
        e, s = divmod(step, steps_per_epoch)
        lo = s * B + process_index * b
        return indexed(_host_batch(shards, shapes, epoch_order(e)[lo:lo + b], workers, expect_ids,
                                   with_zone=True))

    return _prefetched(batch, int(start_step), None, prefetch)


def _zone_indices(data_dir, card: dict, split: str, shards: Shards) -> np.ndarray:
    """The index (into pipeline.zone_names) of every record's zone, card order."""
    names = pipeline.zone_names(card, split)
    if names is None:
        raise UserError(f"{data_dir}/{pipeline.CARD_NAME}: zones_per_batch needs the zones of split {split!r}, "
                        "which the card does not list (a dataset built before cards listed them: rebuild it "
                        "with `python -m data_prep build`)")
    return pipeline.zone_indices(data_dir, card, split, shards.zones()).astype(np.int64)


def _check_zone_groups(data_dir, split: str, zones: np.ndarray, global_batch_size: int, zones_per_batch: int) -> int:
    """Global batches per pass of zone-grouped batches; a UserError when there are none."""
    if zones_per_batch < 0 or global_batch_size % zones_per_batch:
        raise UserError(f"zones_per_batch={zones_per_batch} must divide the global batch size "
                        f"{global_batch_size} (each batch takes batch / zones_per_batch patches of each zone)")
    steps = zone_grouped_batches(zones, global_batch_size, zones_per_batch)
    if not steps:
        _, counts = np.unique(zones, return_counts=True)
        raise UserError(f"{data_dir}: split {split!r} cannot make one batch of {global_batch_size} patches from "
                        f"{zones_per_batch} zone(s) of {global_batch_size // zones_per_batch} patches each: its "
                        f"{len(counts)} zone(s) hold at most {counts.max()} patches; lower the batch size or "
                        "raise zones_per_batch")
    return steps


def make_eval_iterator(data_dir, split: str, *, global_batch_size: int, process_index: Optional[int] = None,
                       process_count: Optional[int] = None, cycle_length: int = 8, prefetch: int = 2,
                       num_workers: Optional[int] = None) -> Iterator[dict]:
    """Finite iterator: every example of the split once over all hosts, in the tf.data reader's
    order; rows past the last example are zeros with example_valid=False."""
    process_index, process_count, b = pipeline._host_batch(global_batch_size, process_index, process_count)
    card = pipeline.load_card(data_dir)
    shards = Shards(data_dir, card, split)
    shapes = record_shapes(card)
    order = interleave_order(shards.counts, min(cycle_length, len(shards.counts)))
    n, B = len(order), global_batch_size
    workers = _workers(num_workers)

    def batch(s: int) -> dict:
        lo = min(n, s * B + process_index * b)
        hi = min(n, s * B + (process_index + 1) * b)
        out = _host_batch(shards, shapes, order[lo:hi], workers)
        rows = hi - lo
        out = {k: np.concatenate([v, np.zeros((b - rows, *v.shape[1:]), v.dtype)]) for k, v in out.items()}
        out["example_valid"] = np.arange(b) < rows
        return out

    return _prefetched(batch, 0, math.ceil(n / B), prefetch)
