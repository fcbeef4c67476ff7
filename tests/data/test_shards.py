"""Shard integrity: the card records each shard's records, bytes and sha256; the pipeline refuses a
damaged dataset when it opens it, `data_prep verify` checks every byte, a build re-run rewrites it."""
import json
import shutil

import pytest

from data_prep import build
from data_prep.__main__ import main as data_prep_main
from lcssl.data import pipeline, records
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
    assert card["format_version"] == 2
    assert info["shard_bytes"][0] == shard.stat().st_size
    assert info["shard_sha256"][0] == records.file_sha256(shard)
    facts = records.shard_facts(shard)
    assert facts.num_records == info["shard_examples"][0] and not facts.cut_mid_record
    assert data_prep_main(["verify", str(dataset)]) == 0
    assert "match the dataset card" in capsys.readouterr().out


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
