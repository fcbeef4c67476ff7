"""lcssl.data.native: the same examples as the tf.data reader, without TensorFlow; each host reads
only its own records; the same global batch sequence for any host count and after a resume."""
import hashlib
import json
import logging
import shutil
import struct
import sys

import numpy as np
import pytest

from lcssl.data import native, pipeline, records, schema
from lcssl.errors import UserError
from tests.data.test_pipeline import data_dir, ids  # noqa: F401  (module-scoped built dataset)


def _raw_records(path):
    offsets, lengths = native.walk_records(path)
    blob = open(path, "rb").read()
    return [blob[o + 12:o + 12 + n] for o, n in zip(offsets.tolist(), lengths.tolist())]


def test_every_record_decodes_to_tf_values(data_dir):
    card = pipeline.load_card(data_dir)
    decode, shapes = records.decode_fn(card), records.record_shapes(card)
    n = 0
    for split in ("train", "val", "test"):
        for path in pipeline.split_files(data_dir, card, split)[0]:
            for serialized in _raw_records(path):
                want = {k: v.numpy() for k, v in decode(serialized).items()}
                got = native.decode_record(serialized, shapes)
                assert set(got) == set(want) == set(records.FIELDS)
                for k in ("patch_id", "zone", "domain"):
                    assert got[k] == want[k], k
                for k in ("aerial", "label", "has_label", "sits", "sits_valid", "dates"):
                    assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
                    assert np.array_equal(got[k], want[k]), k
                n += 1
    assert n == 30


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_equal_tfdata_batches(data_dir, process_count):
    for split, batch_size in (("train", 8), ("val", 4)):
        for p in range(process_count):
            kw = dict(global_batch_size=batch_size, process_index=p, process_count=process_count)
            tf_batches = list(pipeline.make_eval_iterator(data_dir, split, **kw))
            native_batches = list(pipeline.make_eval_iterator(data_dir, split, reader="native", **kw))
            assert len(native_batches) == len(tf_batches)
            for a, b in zip(native_batches, tf_batches):
                assert set(a) == set(b)
                for k in b:
                    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
                    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_interleave_order_is_tfdatas():
    import tensorflow as tf

    counts = [2, 3, 0, 1, 2, 2, 1, 3]
    starts = np.cumsum([0] + counts)
    for cycle in (1, 2, 3, 8):
        ds = tf.data.Dataset.range(len(counts)).interleave(
            lambda k: tf.data.Dataset.range(tf.gather(starts, k), tf.gather(starts, k + 1)),
            cycle_length=cycle, block_length=1, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        assert native.interleave_order(counts, cycle).tolist() == list(ds.as_numpy_iterator()), cycle


def test_example_wire_format_packed_and_unpacked():
    import tensorflow as tf

    ex = tf.train.Example(features=tf.train.Features(feature={
        "f": tf.train.Feature(float_list=tf.train.FloatList(value=[1.5, -2.0, 3e-8])),
        "i": tf.train.Feature(int64_list=tf.train.Int64List(value=[-1, 2**40, 0, -(2**63)])),
        "b": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"a\x00b", b""])),
        "e": tf.train.Feature()}))
    got = native.parse_example(ex.SerializeToString())
    assert got["f"][0] == "float" and got["f"][1].tolist() == np.float32([1.5, -2.0, 3e-8]).tolist()
    assert got["i"][0] == "int64" and got["i"][1].tolist() == [-1, 2**40, 0, -(2**63)]
    assert got["b"][0] == "bytes" and [bytes(v) for v in got["b"][1]] == [b"a\x00b", b""]
    assert got["e"] == ("bytes", [])

    # Unpacked repeated scalars (what proto2 writers and some tools emit): same values.
    def ld(number, payload):  # a length-delimited field
        return bytes([number << 3 | 2, len(payload)]) + payload

    floats = b"".join(bytes([1 << 3 | 5]) + struct.pack("<f", x) for x in (0.25, -4.0))
    ints = b"".join(bytes([1 << 3 | 0]) + v for v in (b"\x05", b"\xff" * 9 + b"\x01"))  # 5, -1
    features = (ld(1, ld(1, b"x") + ld(2, ld(2, floats))) + ld(1, ld(1, b"y") + ld(2, ld(3, ints))))
    serialized = ld(1, features)
    ref = tf.train.Example.FromString(serialized).features.feature
    got = native.parse_example(serialized)
    assert got["x"][1].tolist() == list(ref["x"].float_list.value) == [0.25, -4.0]
    assert got["y"][1].tolist() == list(ref["y"].int64_list.value) == [5, -1]


def global_batches(data_dir, process_count, steps, **kw):
    its = [pipeline.make_train_iterator(data_dir, "train", global_batch_size=8, process_index=p,
                                        process_count=process_count, reader="native", **kw)
           for p in range(process_count)]
    return [[i for it in its for i in ids(next(it))] for _ in range(steps)]


def test_global_batch_sequence_is_the_same_for_1_2_4_hosts_and_after_resume(data_dir):
    one = global_batches(data_dir, 1, 6, seed=3)  # 20 examples / 8 = 2 steps per epoch: 3 epochs
    assert len({i for b in one[:2] for i in b}) == 16 and one[0] != one[2]
    assert global_batches(data_dir, 2, 6, seed=3) == one
    assert global_batches(data_dir, 4, 6, seed=3) == one
    assert global_batches(data_dir, 4, 3, seed=3, start_step=3) == one[3:]  # stopped on 1, resumed on 4
    assert global_batches(data_dir, 1, 1, seed=4) != one[:1]
    few = dict(seed=3, label_fraction=0.5)
    assert global_batches(data_dir, 4, 3, **few) == global_batches(data_dir, 1, 3, **few)
    assert len({i for b in global_batches(data_dir, 2, 4, **few) for i in b}) == 10


def test_each_host_reads_only_its_own_records(data_dir, monkeypatch):
    asked = {}  # per iterator (its Shards, kept alive): the record numbers of each host batch, in step order
    real = native._host_batch

    def recording(shards, shapes, indices, *args, **kwargs):
        asked.setdefault(shards, []).append(list(indices))
        return real(shards, shapes, indices, *args, **kwargs)

    monkeypatch.setattr(native, "_host_batch", recording)

    def host_reads(p, count, steps=3):
        it = pipeline.make_train_iterator(data_dir, "train", global_batch_size=8, seed=0, process_index=p,
                                          process_count=count, reader="native", start_step=1)
        [next(it) for _ in range(steps)]
        it.close()
        return list(asked.values())[-1][:steps]  # this iterator's: the newest Shards

    one = host_reads(0, 1)
    assert all(len(b) == 8 for b in one)
    for p in range(4):  # host p of 4 reads its 2 rows of each global batch, nothing else
        assert host_reads(p, 4) == [b[2 * p:2 * p + 2] for b in one]


def zones_seen(data_dir, reader, steps=6, split="train"):
    """{row id: zone index} over `steps` training batches of 8 (20 examples: 3 epochs)."""
    it = pipeline.make_train_iterator(data_dir, split, global_batch_size=8, seed=1, process_index=0,
                                      process_count=1, reader=reader)
    seen = {}
    for _ in range(steps):
        batch = next(it)
        assert batch["zone"].dtype == np.int32 and batch["zone"].shape == (8,)
        seen.update(zip(ids(batch), batch["zone"].tolist()))
    it.close()
    return seen


def test_training_batches_carry_the_same_zone_index_from_both_readers(data_dir):
    card = pipeline.load_card(data_dir)
    names = pipeline.zone_names(card, "train")
    assert len(names) == 4 and names == tuple(sorted(card["splits"]["train"]["zones"]))
    # Each record's zone, as the card names it, read from the record itself.
    decode = records.decode_fn(card)
    want = {}
    for path in pipeline.split_files(data_dir, card, "train")[0]:
        for serialized in _raw_records(path):
            r = {k: v.numpy() for k, v in decode(serialized).items()}
            key = schema.zone_key(r["domain"].decode(), r["zone"].decode())
            want[hashlib.md5(r["aerial"].tobytes()).hexdigest()] = names.index(key)
    assert sorted(set(want.values())) == [0, 1, 2, 3]
    for reader in ("tfdata", "native"):
        seen = zones_seen(data_dir, reader)
        assert len(seen) == 20 and seen == want, reader


def _with_card(data_dir, tmp_path, change):
    copy = shutil.copytree(data_dir, tmp_path / "ds")
    card = json.loads((copy / schema.CARD_NAME).read_text())
    change(card["splits"]["train"])
    (copy / schema.CARD_NAME).write_text(json.dumps(schema.seal_card(card)))
    return copy


def test_a_zone_missing_from_the_card_is_named_and_a_card_without_zones_gives_minus_one(data_dir, tmp_path):
    copy = _with_card(data_dir, tmp_path / "missing", lambda split: split["zones"].pop(0))
    for reader in ("tfdata", "native"):
        with pytest.raises(UserError, match=rf"^{copy}/dataset_card.json: split 'train' holds patches of "
                                            r"zones \['D1/Z\d'\], which the card does not list"):
            zones_seen(copy, reader)
    copy = _with_card(data_dir, tmp_path / "none", lambda split: split.pop("zones"))
    for reader in ("tfdata", "native"):
        assert set(zones_seen(copy, reader, steps=2).values()) == {-1}, reader


def test_index_is_cached_beside_the_shard_and_rebuilt_when_stale(data_dir, tmp_path):
    copy = shutil.copytree(data_dir, tmp_path / "ds")
    card = pipeline.load_card(copy)
    shards = native.Shards(copy, card, "val")
    first = copy / (card["splits"]["val"]["files"][0] + native.INDEX_SUFFIX)
    assert first.is_file() and len(shards) == 5
    info = card["splits"]["val"]
    offsets, lengths = native.walk_records(copy / info["files"][0])
    np.savez(first, offsets=offsets[:1], lengths=lengths[:1], sha256=np.asarray(info["shard_sha256"][0]))
    again = native.Shards(copy, card, "val")  # a stale index (wrong count) is walked again
    assert again.counts == shards.counts
    with np.load(first) as index:
        assert len(index["offsets"]) == info["shard_examples"][0]


def test_index_of_a_read_only_dataset_stays_in_memory(data_dir, tmp_path):
    copy = shutil.copytree(data_dir, tmp_path / "ro")
    for path in copy.glob("*" + native.INDEX_SUFFIX):
        path.unlink()
    copy.chmod(0o555)
    try:
        batches = list(pipeline.make_eval_iterator(copy, "val", global_batch_size=4, process_index=0,
                                                   process_count=1, reader="native"))
        assert sum(int(b["example_valid"].sum()) for b in batches) == 5
    finally:
        copy.chmod(0o755)


def test_corrupt_record_is_named_by_shard_and_record(data_dir, tmp_path):
    copy = shutil.copytree(data_dir, tmp_path / "bad")
    card = pipeline.load_card(copy)
    name = card["splits"]["val"]["files"][0]
    offsets, lengths = native.walk_records(copy / name)
    blob = bytearray((copy / name).read_bytes())
    blob[int(offsets[1]) + 12 + 100] ^= 0xFF  # a byte of record 1's data; the size stays the same
    (copy / name).write_bytes(bytes(blob))
    it = pipeline.make_eval_iterator(copy, "val", global_batch_size=8, process_index=0, process_count=1,
                                     reader="native")
    with pytest.raises(native.RecordError) as e:
        list(it)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{copy / name}: record 1 (counting from 0)")
    assert "fails its CRC" in message


def test_tfdata_falls_back_to_native_without_tensorflow(monkeypatch, caplog):
    assert pipeline.choose_reader("native") == "native"
    with pytest.raises(ValueError, match="--config.input='tfrecord'"):
        pipeline.choose_reader("tfrecord")
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    monkeypatch.setattr(pipeline, "_FELL_BACK", [])
    with caplog.at_level(logging.INFO):
        assert pipeline.choose_reader("tfdata") == "native"
        assert pipeline.choose_reader("tfdata") == "native"
    said = [r.getMessage() for r in caplog.records if "native reader" in r.getMessage()]
    assert len(said) == 1 and "TensorFlow is not installed" in said[0]


def test_zone_grouped_order_cuts_each_zone_into_chunks_of_batch_over_k():
    zones = np.asarray([0] * 10 + [1] * 7 + [2] * 3)  # chunks of 3: three, two and one
    rng = np.random.default_rng(0)
    order = native.zone_grouped_order(zones, 6, 2, rng)
    assert native.zone_grouped_batches(zones, 6, 2) == 3 and len(order) == 18
    assert len(set(order.tolist())) == 18  # no record twice in a pass
    chunks = zones[order].reshape(6, 3)
    assert (chunks == chunks[:, :1]).all()  # each chunk is one zone
    assert sorted(chunks[:, 0].tolist()) == [0, 0, 0, 1, 1, 2]
    assert not np.array_equal(order, native.zone_grouped_order(zones, 6, 2, np.random.default_rng(1)))
    assert native.zone_grouped_batches(zones, 6, 1) == 2 and native.zone_grouped_batches(zones, 6, 3) == 3


def test_zone_grouped_batches_hold_k_zones_are_the_same_on_1_2_4_hosts_and_resume(data_dir, tmp_path):
    copy = shutil.copytree(data_dir, tmp_path / "ds")  # its indexes gain the records' zones
    card = pipeline.load_card(copy)
    names = pipeline.zone_names(card, "train")
    grouped = dict(seed=3, zones_per_batch=2)  # 4 zones of 5 records: a chunk of 4 each, 2 batches a pass
    one = global_batches(copy, 1, 6, **grouped)
    assert global_batches(copy, 2, 6, **grouped) == one
    assert global_batches(copy, 4, 3, start_step=3, **grouped) == one[3:]  # stopped on 1, resumed on 4
    assert len({i for b in one[:2] for i in b}) == 16 and one[:2] != one[2:4]
    assert global_batches(copy, 1, 6, seed=4, zones_per_batch=2) != one
    zone_of = {}
    for k, size in ((2, 4), (4, 2)):
        it = pipeline.make_train_iterator(copy, "train", global_batch_size=8, seed=3, process_index=0,
                                          process_count=1, reader="native", zones_per_batch=k)
        for _ in range(6):
            batch = next(it)
            chunks = batch["zone"].reshape(k, size)
            assert (chunks == chunks[:, :1]).all(), batch["zone"]  # k chunks of one zone each
            zone_of.update(zip(ids(batch), batch["zone"].tolist()))
        it.close()
    assert set(zone_of.values()) == set(range(len(names)))
    assert zone_of.items() <= zones_seen(data_dir, "native", steps=9).items()  # the records' own zones
    for shard in card["splits"]["train"]["files"]:
        with np.load(copy / (shard + native.INDEX_SUFFIX)) as index:
            assert set(index["zones"].tolist()) <= set(names)


def test_zone_grouped_batches_refuse_what_they_cannot_make(data_dir, tmp_path):
    def first(d, **kw):
        it = pipeline.make_train_iterator(d, "train", global_batch_size=kw.pop("batch", 4), seed=0, process_index=0,
                                          process_count=1, **kw)
        try:
            return next(it)
        finally:
            it.close()

    with pytest.raises(UserError, match=r"^zones_per_batch=3 must divide the global batch size 4 "):
        first(data_dir, reader="native", zones_per_batch=3)
    with pytest.raises(UserError, match=rf"^{data_dir}: split 'train' cannot make one batch of 16 patches from 2 "
                                        r"zone\(s\) of 8 patches each: its 4 zone\(s\) hold at most 5 patches"):
        first(data_dir, reader="native", zones_per_batch=2, batch=16)
    with pytest.raises(UserError, match=r"^zones_per_batch=2 needs the native reader \(--config.input=native\)"):
        first(data_dir, reader="tfdata", zones_per_batch=2)
    copy = _with_card(data_dir, tmp_path / "none", lambda split: split.pop("zones"))
    with pytest.raises(UserError, match=rf"^{copy}/dataset_card.json: zones_per_batch needs the zones of split "
                                        "'train', which the card does not list"):
        first(copy, reader="native", zones_per_batch=2)
    ro = shutil.copytree(data_dir, tmp_path / "ro")  # a read-only dataset keeps the zones in memory
    ro.chmod(0o555)
    try:
        assert first(ro, reader="native", zones_per_batch=2)["zone"].shape == (4,)
    finally:
        ro.chmod(0o755)
