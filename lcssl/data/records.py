"""The one record schema: data_prep.build writes it, lcssl.data.pipeline reads it.

One `tf.train.Example` per patch (DESIGN.md "Record"). Arrays are stored as raw little-endian bytes
(not as int64 lists, which would inflate a 512x512x5 uint8 patch eightfold); the layout matches what
`tfds.features.Tensor(..., encoding='bytes')` writes, so the shards also load with
`tfds.builder_from_directory` (see `tfds_features`).

    patch_id, zone, domain  bytes
    aerial                  uint8  [H, W, Ca]      raw bytes
    label                   uint8  [H, W]          raw bytes, all 255 for unlabelled patches
    has_label               int64  scalar          0 or 1
    sits                    uint16 [T, h, w, Cs]   raw bytes, T = max_dates (padded)
    sits_valid              bool   [T]             int64 list (0/1)
    dates                   int32  [T]             int64 list, 0 where padded

Fixed shapes come from the dataset card (`record_shapes`). TensorFlow is imported inside the
functions so that `lcssl` imports without it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
from typing import Optional

import numpy as np

from lcssl.errors import ShardError  # noqa: F401 -- records.ShardError, as before

FIELDS = ("patch_id", "zone", "domain", "aerial", "label", "has_label", "sits", "sits_valid", "dates")


@dataclasses.dataclass(frozen=True)
class RecordShapes:
    """Static shapes of one record, read from the dataset card."""

    aerial: tuple  # (H, W, Ca)
    label: tuple  # (H, W)
    sits: tuple  # (T, h, w, Cs)

    @property
    def max_dates(self) -> int:
        return self.sits[0]


def record_shapes(card: dict) -> RecordShapes:
    """Shapes from a dataset card's `aerial` and `sits` entries."""
    try:
        size, ca = int(card["aerial"]["size"]), len(card["aerial"]["bands"])
        sits = card["sits"]
        t, s, cs = int(sits["max_dates"]), int(sits["size"]), len(sits["bands"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"dataset card lacks a field needed for the record shapes: {e!r}; "
                         "expected aerial.{size,bands} and sits.{max_dates,size,bands}") from e
    return RecordShapes(aerial=(size, size, ca), label=(size, size), sits=(t, s, s, cs))


def _check(name: str, array: np.ndarray, dtype, shape: tuple, patch_id: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != np.dtype(dtype) or tuple(array.shape) != tuple(shape):
        raise ValueError(f"record {patch_id!r}: field {name!r} expected {np.dtype(dtype)} {tuple(shape)}, "
                         f"found {array.dtype} {tuple(array.shape)}")
    return np.ascontiguousarray(array).astype(np.dtype(dtype).newbyteorder("<"), copy=False)


def encode_example(*, patch_id: str, zone: str, domain: str, aerial: np.ndarray, label: np.ndarray | None,
                   sits: np.ndarray, sits_valid: np.ndarray, dates: np.ndarray,
                   shapes: RecordShapes) -> bytes:
    """One serialized tf.train.Example. `label=None` marks an unlabelled patch (stored as all 255)."""
    import tensorflow as tf

    from lcssl.data.schema import IGNORE_LABEL

    has_label = label is not None
    if label is None:
        label = np.full(shapes.label, IGNORE_LABEL, np.uint8)
    aerial = _check("aerial", aerial, np.uint8, shapes.aerial, patch_id)
    label = _check("label", label, np.uint8, shapes.label, patch_id)
    sits = _check("sits", sits, np.uint16, shapes.sits, patch_id)
    sits_valid = _check("sits_valid", sits_valid, np.bool_, (shapes.max_dates,), patch_id)
    dates = _check("dates", dates, np.int32, (shapes.max_dates,), patch_id)

    def b(value: bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def i(values):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))

    feature = {
        "patch_id": b(patch_id.encode()),
        "zone": b(zone.encode()),
        "domain": b(domain.encode()),
        "aerial": b(aerial.tobytes()),
        "label": b(label.tobytes()),
        "has_label": i([has_label]),
        "sits": b(sits.tobytes()),
        "sits_valid": i(sits_valid.astype(np.int64)),
        "dates": i(dates.astype(np.int64)),
    }
    # deterministic=True sorts the feature map: same bytes in every process (resumable, comparable shards).
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString(deterministic=True)


def feature_spec(shapes: RecordShapes) -> dict:
    """`tf.io.parse_example` spec of a record."""
    import tensorflow as tf

    t = shapes.max_dates
    spec = {k: tf.io.FixedLenFeature([], tf.string) for k in ("patch_id", "zone", "domain", "aerial", "label", "sits")}
    spec["has_label"] = tf.io.FixedLenFeature([], tf.int64)
    spec["sits_valid"] = tf.io.FixedLenFeature([t], tf.int64)
    spec["dates"] = tf.io.FixedLenFeature([t], tf.int64)
    return spec


def decode_fn(card: dict):
    """Returns `decode(serialized) -> dict of tensors` with the record's dtypes and shapes.

    `serialized` is a scalar string (one record) or a vector [N] (a batch of records: decoded in
    one `parse_example` call, which is cheaper per record). Fields as in the module docstring;
    `has_label` is bool, `sits_valid` bool, `dates` int32.
    """
    import tensorflow as tf

    shapes = record_shapes(card)
    spec = feature_spec(shapes)

    def decode(serialized):
        serialized = tf.convert_to_tensor(serialized, tf.string)
        scalar = serialized.shape.rank == 0
        batch = tf.reshape(serialized, [-1])
        parsed = tf.io.parse_example(batch, spec)
        n = tf.shape(batch)[0]

        def raw(name, dtype, shape):
            flat = tf.io.decode_raw(parsed[name], dtype, little_endian=True)
            return tf.reshape(flat, tf.concat([[n], shape], 0))

        out = {
            "patch_id": parsed["patch_id"],
            "zone": parsed["zone"],
            "domain": parsed["domain"],
            "aerial": raw("aerial", tf.uint8, shapes.aerial),
            "label": raw("label", tf.uint8, shapes.label),
            "has_label": tf.cast(parsed["has_label"], tf.bool),
            "sits": raw("sits", tf.uint16, shapes.sits),
            "sits_valid": tf.cast(parsed["sits_valid"], tf.bool),
            "dates": tf.cast(parsed["dates"], tf.int32),
        }
        if scalar:
            out = {k: v[0] for k, v in out.items()}
        return out

    return decode


def tfds_features(shapes: RecordShapes):
    """The `tfds.features.FeaturesDict` that reads these records (used for dataset_info.json)."""
    import tensorflow_datasets as tfds

    f = tfds.features
    return f.FeaturesDict({
        "patch_id": f.Text(),
        "zone": f.Text(),
        "domain": f.Text(),
        "aerial": f.Tensor(shape=shapes.aerial, dtype=np.uint8, encoding="bytes"),
        "label": f.Tensor(shape=shapes.label, dtype=np.uint8, encoding="bytes"),
        "has_label": f.Scalar(dtype=np.int64),
        "sits": f.Tensor(shape=shapes.sits, dtype=np.uint16, encoding="bytes"),
        "sits_valid": f.Tensor(shape=(shapes.max_dates,), dtype=np.bool_),
        "dates": f.Tensor(shape=(shapes.max_dates,), dtype=np.int32),
    })


# --- shard files -------------------------------------------------------------------------------
# A TFRecord file is a sequence of [uint64 length][uint32 masked crc32c of length][data][uint32
# masked crc32c of data] (tensorflow/core/lib/io/record_writer.h). Walking the length headers counts
# the records and finds a file cut inside a record with one small read per record, without
# TensorFlow; each length is checked against its CRC, so a damaged header is told from a cut file.
# The data CRCs are checked when every byte is read anyway (`data_prep verify`).
_HEADER_BYTES, _FOOTER_BYTES = 12, 4
_CRC32C_POLY = 0x82F63B78  # Castagnoli, reflected (RFC 3720 B.4), the CRC TFRecord uses
_CRC_MASK_DELTA = 0xA282EAD8  # tensorflow/core/lib/hash/crc32c.h: Mask()
_CRC_BLOCK = 1024  # bytes per vectorized step of `crc32c`


def _crc_tables(block: int) -> tuple[np.ndarray, np.ndarray]:
    """The byte table of CRC-32C, and its slice-by-`block` extension for numpy.

    The CRC register update without its initial / final inversion is linear over GF(2): a block
    of bytes b_0..b_{n-1} moves the register s to A^n(s) xor (+)_j A^(n-1-j)(T[b_j]), with A one
    zero byte. `bytes_tab[m, b]` = A^m(T[b]); `shift_tab[k, x]` = A^n(x << 8k), the register moved
    through n bytes one byte of it at a time.
    """
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(_CRC32C_POLY), t >> 1).astype(np.uint32)

    def zero_byte(x):
        return (x >> 8) ^ t[x & 0xFF]

    bytes_tab = np.empty((block, 256), np.uint32)
    row = t.copy()
    for m in range(block):
        bytes_tab[m] = row
        row = zero_byte(row)
    shift_tab = np.empty((4, 256), np.uint32)
    for k in range(4):
        x = np.arange(256, dtype=np.uint32) << np.uint32(8 * k)
        for _ in range(block):
            x = zero_byte(x)
        shift_tab[k] = x
    return t, bytes_tab[::-1].copy(), shift_tab  # bytes_tab[j]: byte j of a block (A^(n-1-j))


_TABLES = None


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`; numpy does whole blocks of 1024 bytes at a time."""
    global _TABLES
    if _TABLES is None:
        _TABLES = _crc_tables(_CRC_BLOCK)
    table, bytes_tab, shift_tab = _TABLES
    buf = np.frombuffer(data, np.uint8)
    n_blocks = len(buf) // _CRC_BLOCK
    crc = 0xFFFFFFFF
    if n_blocks:
        cols = np.arange(_CRC_BLOCK)
        blocks = buf[:n_blocks * _CRC_BLOCK].reshape(n_blocks, _CRC_BLOCK)
        parts = []
        for lo in range(0, n_blocks, 4096):  # <= 16 MiB of uint32 at a time
            parts.append(np.bitwise_xor.reduce(bytes_tab[cols, blocks[lo:lo + 4096]], axis=1))
        shift = [row.tolist() for row in shift_tab]
        for part in np.concatenate(parts).tolist():
            crc = (shift[0][crc & 0xFF] ^ shift[1][(crc >> 8) & 0xFF] ^ shift[2][(crc >> 16) & 0xFF]
                   ^ shift[3][crc >> 24] ^ part)
    tab = table.tolist()
    for b in buf[n_blocks * _CRC_BLOCK:].tolist():
        crc = (crc >> 8) ^ tab[(crc ^ b) & 0xFF]
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The CRC as TFRecord stores it: rotated right by 15 bits plus a constant (crc32c.h Mask)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF



@dataclasses.dataclass(frozen=True)
class ShardFacts:
    """What a shard file holds: complete records, bytes, whether it ends inside a record, and the
    first record (0-based) whose length header or data fails its CRC (None: none; once one is
    corrupt the records after it cannot be told apart, so the walk stops there)."""

    num_records: int
    num_bytes: int
    cut_mid_record: bool
    sha256: Optional[str] = None
    corrupt_record: Optional[int] = None
    corrupt_what: str = ""


def shard_facts(path, *, with_sha256: bool = False, check_data: bool = False) -> ShardFacts:
    """Counts the records of a TFRecord file by its length headers, checking each length's CRC;
    `check_data` also reads every record and checks its data CRC; sha256 of the whole file on request."""
    size = os.path.getsize(path)
    offset = records = 0
    cut = False
    corrupt, what = None, ""
    with open(path, "rb") as f:
        while offset < size:
            header = f.read(_HEADER_BYTES)
            if len(header) < _HEADER_BYTES:
                cut = True
                break
            (length,) = struct.unpack("<Q", header[:8])
            if masked_crc32c(header[:8]) != struct.unpack("<I", header[8:])[0]:
                corrupt, what = records, "its length header fails its CRC"
                break
            end = offset + _HEADER_BYTES + length + _FOOTER_BYTES
            if end > size:
                cut = True
                break
            if check_data:
                data = f.read(length)
                (stored,) = struct.unpack("<I", f.read(_FOOTER_BYTES))
                if masked_crc32c(data) != stored:
                    corrupt, what = records, "its data fails its CRC"
                    break
            offset = end
            records += 1
            f.seek(offset)
    digest = file_sha256(path) if with_sha256 else None
    return ShardFacts(records, size, cut, digest, corrupt, what)


def file_sha256(path, chunk_bytes: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_problem(path, *, num_examples: int, num_bytes: Optional[int], sha256: Optional[str] = None,
                  check_sha256: bool = False) -> Optional[str]:
    """None when the shard at `path` matches what the card records, else what is wrong with it.

    The size check is one stat; a shard whose size differs is walked to say how it differs (a record
    whose length header fails its CRC, cut inside a record, cut at a record boundary, or rewritten
    with other content). `check_sha256` reads the whole file (`python -m data_prep verify`): sha256
    and every record's data CRC; a shard whose bytes and sha256 match the card but whose record
    count does not is intact, and the card is named instead.
    """
    if not os.path.exists(path):
        return "missing"
    size = os.path.getsize(path)
    if num_bytes is not None and size == num_bytes and not check_sha256:
        return None
    facts = shard_facts(path, with_sha256=check_sha256, check_data=check_sha256)
    intact = check_sha256 and sha256 is not None and facts.sha256 == sha256 and size == num_bytes
    if intact:
        if facts.num_records != num_examples:
            return (f"intact (its bytes and sha256 match the card) with {facts.num_records} records, but the "
                    f"card's shard_examples says {num_examples}: the card was edited, not the shard")
        return None
    if facts.corrupt_record is not None:
        return (f"corrupt record {facts.corrupt_record} (counting from 0; {facts.corrupt_what}): the file "
                f"is damaged inside, not truncated ({size} bytes, the card records {num_bytes})")
    if facts.cut_mid_record:
        return (f"truncated inside a record: {facts.num_records} complete records in {size} bytes, "
                f"the card records {num_examples} records in {num_bytes} bytes")
    if facts.num_records != num_examples:
        shorter = facts.num_records < num_examples and (num_bytes is None or size < num_bytes)
        return (f"holds {facts.num_records} records, the card records {num_examples} "
                f"({'cut at a record boundary' if shorter else 'other content'}; "
                f"{size} bytes, the card records {num_bytes})")
    if num_bytes is not None and size != num_bytes:
        return f"{size} bytes, the card records {num_bytes}: rewritten with other content"
    if check_sha256 and sha256 is not None and facts.sha256 != sha256:
        return f"content differs from the card (sha256 {facts.sha256[:12]}..., the card records {sha256[:12]}...)"
    return None
