"""Shard integrity: the card records each shard's records, bytes and sha256; the pipeline refuses a
damaged dataset when it opens it, `data_prep verify` checks every byte, a build re-run rewrites it."""
import json
import os
import re
import shutil
import struct

import pytest

from data_prep import build
from data_prep.__main__ import main as data_prep_main
from lcssl.data import pipeline, records, schema
from tests.data.test_build import fake_patches, fake_reader, options


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    patches = fake_patches(num_zones=3, per_zone=4, unlabelled_per_zone=0)
    out = tmp_path_factory.mktemp("shards") / "ds"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build, "_reader", lambda layout: fake_reader(patches))
        build.build("/raw", out, layout="flair2", options=options())
    return out, patches


@pytest.fixture
def dataset(built, tmp_path):
    out, _ = built
    return shutil.copytree(out, tmp_path / "ds")


def first_train_shard(data_dir):
    card = json.loads((data_dir / "dataset_card.json").read_text())
    return data_dir / card["splits"]["train"]["files"][0], card


def rewrite_records(path, transform):
    import tensorflow as tf

    recs = [r.numpy() for r in tf.data.TFRecordDataset(str(path))]
    with tf.io.TFRecordWriter(str(path)) as w:
        for r in transform(recs):
            w.write(r)
    return len(recs)


def test_card_records_each_shard_and_verify_passes(dataset, capsys):
    shard, card = first_train_shard(dataset)
    info = card["splits"]["train"]
    assert card["format_version"] == 3 and card["content_sha256"] == schema.card_checksum(card)
    assert info["shard_bytes"][0] == shard.stat().st_size
    assert info["shard_sha256"][0] == records.file_sha256(shard)
    facts = records.shard_facts(shard)
    assert facts.num_records == info["shard_examples"][0] and not facts.cut_mid_record
    assert data_prep_main(["verify", str(dataset)]) == 0
    assert "match (checksum, records and their CRCs" in capsys.readouterr().out


def test_truncated_mid_record_is_named_when_the_dataset_is_opened(dataset):
    shard, _ = first_train_shard(dataset)
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(records.ShardError, match=rf"{shard.name}: truncated inside a record.*data_prep verify"):
        pipeline.load_card(dataset)
    with pytest.raises(records.ShardError, match=shard.name):  # before the first batch
        pipeline.make_train_iterator(dataset, global_batch_size=2, seed=0, process_index=0, process_count=1)


def test_truncated_at_a_record_boundary_is_named(dataset):
    shard, _ = first_train_shard(dataset)
    n = rewrite_records(shard, lambda recs: recs[:-1])
    with pytest.raises(records.ShardError, match=rf"{shard.name}: holds {n - 1} records, the card records {n} "
                                                 r"\(cut at a record boundary"):
        pipeline.load_card(dataset)


def test_missing_shard_is_named(dataset, capsys):
    shard, _ = first_train_shard(dataset)
    shard.unlink()
    with pytest.raises(records.ShardError, match=rf"{shard.name}: missing"):
        pipeline.make_eval_iterator(dataset, "val", global_batch_size=2, process_index=0, process_count=1)
    assert data_prep_main(["verify", str(dataset)]) == 1
    assert f"{shard}: missing" in capsys.readouterr().out


def test_rebuilt_shard_with_other_content_fails_verify_and_a_build_rerun_rewrites_it(dataset, built, capsys,
                                                                                        monkeypatch):
    shard, _ = first_train_shard(dataset)
    original = shard.read_bytes()
    rewrite_records(shard, lambda recs: recs[::-1])  # same records, same size, other order
    assert shard.stat().st_size == len(original) and shard.read_bytes() != original
    pipeline.load_card(dataset)  # the size check at start-up cannot see it ...
    assert data_prep_main(["verify", str(dataset)]) == 1  # ... the sha256 does
    assert f"{shard}: content differs from the card" in capsys.readouterr().out

    monkeypatch.setattr(build, "_reader", lambda layout: fake_reader(built[1]))
    summary = build.build("/raw", dataset, layout="flair2", options=options())
    assert [r["file"] for r in summary["shards"]["replaced"]] == [shard.name]
    assert summary["shards"]["written"] == 1 and shard.read_bytes() == original
    assert data_prep_main(["verify", str(dataset)]) == 0


def test_shard_written_without_an_index_entry_is_rewritten(dataset, built, monkeypatch):
    # An interrupted build can leave a renamed shard it did not get to record: it is not trusted.
    shard, _ = first_train_shard(dataset)
    index = json.loads((dataset / "shard_index.json").read_text())
    del index[shard.name]
    (dataset / "shard_index.json").write_text(json.dumps(index))
    shard.write_bytes(b"")
    monkeypatch.setattr(build, "_reader", lambda layout: fake_reader(built[1]))
    summary = build.build("/raw", dataset, layout="flair2", options=options())
    assert [r["file"] for r in summary["shards"]["replaced"]] == [shard.name]
    assert data_prep_main(["verify", str(dataset)]) == 0


def test_format_1_card_is_refused_with_the_way_out(dataset):
    card = json.loads((dataset / "dataset_card.json").read_text())
    (dataset / "dataset_card.json").write_text(json.dumps({**card, "format_version": 1}))
    with pytest.raises(ValueError, match="format_version 1 records no shard sizes.*re-run the `python -m "
                                         "data_prep build`"):
        pipeline.load_card(dataset)


# --- The card protects itself; records carry CRCs ------------------------------------------------


def edit_card(data_dir, edit, reseal=False):
    path = data_dir / "dataset_card.json"
    card = json.loads(path.read_text())
    edit(card)
    path.write_text(json.dumps(schema.seal_card(card) if reseal else card))
    return card


@pytest.mark.parametrize("edit, named", [
    (lambda c: c["splits"]["train"].update(num_examples=c["splits"]["train"]["num_examples"] + 1),
     "splits.train.num_examples is"),
    (lambda c: c["class_histogram"].__setitem__(0, c["class_histogram"][0] + 1), None),
    (lambda c: c.pop("aerial"), None),
])
def test_a_hand_edited_card_is_refused_at_open_and_named_by_verify(dataset, capsys, edit, named):
    edit_card(dataset, edit)
    with pytest.raises(ValueError, match=r"dataset_card.json: its content differs from what `data_prep build` "
                                         r"wrote .*edited by hand"):
        pipeline.load_card(dataset)
    assert data_prep_main(["verify", str(dataset)]) == 1
    out = capsys.readouterr()
    assert f"{dataset / 'dataset_card.json'}: its content differs" in out.out
    assert named is None or named in out.out
    assert "dataset_card.json was edited (the shards are intact)" in out.err  # no shard is blamed
    assert " of " not in out.err


def test_a_card_without_its_checksum_or_of_format_2_is_refused_with_the_way_out(dataset, built, monkeypatch):
    edit_card(dataset, lambda c: c.pop("content_sha256"))
    with pytest.raises(ValueError, match="no content_sha256.*re-run the `python -m data_prep build`"):
        pipeline.load_card(dataset)
    edit_card(dataset, lambda c: c.update(format_version=2))
    with pytest.raises(ValueError, match="format_version 2 records no checksum.*keeps the shards"):
        pipeline.load_card(dataset)
    monkeypatch.setattr(build, "_reader", lambda layout: fake_reader(built[1]))
    summary = build.build("/raw", dataset, layout="flair2", options=options())  # the upgrade
    assert summary["shards"]["written"] == 0
    assert pipeline.load_card(dataset)["format_version"] == schema.FORMAT_VERSION


def test_an_edited_shard_count_blames_the_card_not_the_intact_shard(dataset, capsys):
    shard, _ = first_train_shard(dataset)
    edit_card(dataset, lambda c: c["splits"]["train"]["shard_examples"].__setitem__(0, c["splits"]["train"][
        "shard_examples"][0] + 1), reseal=True)  # even a card whose checksum was redone
    assert data_prep_main(["verify", str(dataset)]) == 1
    out, err = capsys.readouterr()
    assert f"{shard}: intact (its bytes and sha256 match the card)" in out and "the card was edited" in out
    assert "cut at a record boundary" not in out
    assert "was edited (the shards are intact)" in err and "shards damaged" not in err


@pytest.mark.parametrize("name", ["/etc/hostname", "../x", "..", "sub/x.tfrecord"])
def test_shard_names_must_stay_inside_the_dataset_folder(dataset, name):
    edit_card(dataset, lambda c: c["splits"]["train"]["files"].__setitem__(0, name), reseal=True)
    with pytest.raises(ValueError, match=rf"names the shard {re.escape(repr(name))}, which is not a plain file"):
        pipeline.load_card(dataset, check_shards=False)


def test_masked_crc32c_is_tfrecords_own(tmp_path):
    assert records.crc32c(b"123456789") == 0xE3069283  # RFC 3720 B.4 check value
    import tensorflow as tf

    data = bytes(range(256)) * 9 + b"tail"  # whole 1024-byte blocks and a remainder
    path = tmp_path / "one.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as w:
        w.write(data)
    raw = path.read_bytes()
    assert raw[8:12] == struct.pack("<I", records.masked_crc32c(raw[:8]))
    assert raw[-4:] == struct.pack("<I", records.masked_crc32c(data))


def flip(path, offset):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def record_offsets(path):
    raw, offsets, at = path.read_bytes(), [], 0
    while at < len(raw):
        offsets.append(at)
        at += 16 + struct.unpack("<Q", raw[at:at + 8])[0]
    return offsets


def test_a_flipped_length_header_is_a_corrupt_record_not_a_truncation(dataset, capsys):
    shard, _ = first_train_shard(dataset)
    flip(shard, 1)  # the first record's length grows by 256: the walk would end "inside a record"
    assert data_prep_main(["verify", str(dataset)]) == 1
    out = capsys.readouterr().out
    assert f"{shard}: corrupt record 0 (counting from 0; its length header fails its CRC)" in out
    assert "truncated inside a record" not in out


def test_a_flipped_data_byte_names_its_record(dataset, capsys):
    shard, _ = first_train_shard(dataset)
    second = record_offsets(shard)[1]
    flip(shard, second + 12 + 100)
    pipeline.load_card(dataset)  # same size: the start-up stat cannot see it ...
    assert data_prep_main(["verify", str(dataset)]) == 1  # ... verify's data CRCs do
    assert f"{shard}: corrupt record 1 (counting from 0; its data fails its CRC)" in capsys.readouterr().out


def test_a_shard_of_the_same_record_count_but_another_size_is_named_rewritten(dataset):
    shard, card = first_train_shard(dataset)
    rewrite_records(shard, lambda recs: [recs[0] + b"\0", *recs[1:]])  # one record a byte longer
    with pytest.raises(records.ShardError, match=rf"{shard.name}: {card['splits']['train']['shard_bytes'][0] + 1} "
                                                 r"bytes, the card records \d+: rewritten with other content"):
        pipeline.load_card(dataset)


def test_a_shard_linked_to_a_file_outside_the_dataset_folder_is_refused(dataset, tmp_path, capsys):
    shard, _ = first_train_shard(dataset)
    outside = tmp_path / "elsewhere.tfrecord"
    shutil.move(shard, outside)
    shard.symlink_to(outside)  # same bytes: only where it lives is wrong
    with pytest.raises(records.ShardError, match=rf"^{shard}: a link to {outside}, outside the dataset folder"):
        pipeline.load_card(dataset)
    assert data_prep_main(["verify", str(dataset)]) == 1
    assert f"{shard}: a link to {outside}, outside the dataset folder" in capsys.readouterr().out
    shard.unlink()
    shard.symlink_to(os.path.relpath(dataset / "kept.tfrecord", shard.parent))  # a link inside is fine
    shutil.move(outside, dataset / "kept.tfrecord")
    pipeline.load_card(dataset)
