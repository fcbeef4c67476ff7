"""lcssl.data.pipeline: host batches, host sharding, exact resume, padded eval, label fraction."""
import dataclasses
import datetime
import hashlib
import json

import jax
import numpy as np
import pytest

from data_prep import build, layouts
from data_prep.patch import PatchRef, RawPatch
from lcssl.data import pipeline

SIZE, T = 16, 6


def _patch(patch_id, zone):
    rng = np.random.default_rng(int(hashlib.md5(patch_id.encode()).hexdigest()[:8], 16))
    return RawPatch(
        patch_id=patch_id, zone=zone, domain="D1", aerial=rng.integers(0, 256, (SIZE, SIZE, 5), dtype=np.uint8),
        aerial_crs="EPSG:2154", aerial_transform=(1.6, 0.0, 0.0, 0.0, -1.6, 0.0),
        label=rng.integers(0, 13, (SIZE, SIZE)).astype(np.uint8),
        sits=rng.integers(0, 10000, (4, 4, 4, 10)).astype(np.uint16), sits_cloud=np.zeros(4, np.float32),
        sits_dates=[datetime.date(2021, m, 1) for m in (2, 5, 8, 11)], source={"aerial": f"/raw/{patch_id}.tif"})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """6 zones x 5 patches, 2 per shard: train 20 examples in 10 shards, val and test 5 in 3 shards."""
    patches = {f"IMG_{z}{k}": _patch(f"IMG_{z}{k}", f"Z{z}") for z in range(6) for k in range(5)}
    listed = [PatchRef(patch_id=p, zone=p[4], domain="D013", aerial_path=f"/raw/{p}.tif", label_path=None)
              for p in sorted(patches)]
    reader = dataclasses.replace(layouts.get("flair2"), list_patches=lambda root: listed,
                                 read_patch=lambda ref, **kw: patches[ref.patch_id])
    out = tmp_path_factory.mktemp("ds")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build, "_reader", lambda layout: reader)
        build.build("/raw", out, layout="flair2", options=build.BuildOptions(
            workers=1, shard_size=2, sits={"max_dates": T}, progress=False, tfds_metadata=False,
            val_fraction=0.17, test_fraction=0.17))
    return out


def ids(batch):
    """Identity of each valid row: a hash of its aerial bytes."""
    valid = batch.get("example_valid", np.ones(len(batch["aerial"]), bool))
    return [hashlib.md5(a.tobytes()).hexdigest() for a, v in zip(batch["aerial"], valid) if v]


def all_ids(data_dir, split):
    return sorted(i for b in pipeline.make_eval_iterator(data_dir, split, global_batch_size=4, process_index=0,
                                                         process_count=1) for i in ids(b))


def test_card_counts(data_dir):
    card = pipeline.load_card(data_dir)
    assert [card["splits"][s]["num_examples"] for s in ("train", "val", "test")] == [20, 5, 5]


def test_train_batch_shapes_and_dtypes_over_8_devices(data_dir):
    it = pipeline.make_train_iterator(data_dir, "train", global_batch_size=16, seed=0, process_index=0,
                                      process_count=2)
    batch = next(it)
    expect = {"aerial": ((8, SIZE, SIZE, 5), np.uint8), "sits": ((8, T, 4, 4, 10), np.float32),
              "dates": ((8, T), np.int32), "sits_valid": ((8, T), np.bool_), "label": ((8, SIZE, SIZE), np.int32),
              "zone": ((8,), np.int32)}
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expect
    assert batch["sits_valid"][:, :4].all() and not batch["sits_valid"][:, 4:].any()
    assert (batch["dates"][:, 4:] == 0).all() and batch["dates"][0, 0] == 32  # 1 Feb = day 32
    assert batch["label"].max() < 13

    one_host = next(pipeline.make_train_iterator(data_dir, "train", global_batch_size=8, seed=0,
                                                 process_index=0, process_count=1))
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    arr = jax.make_array_from_process_local_data(sharding, one_host["aerial"])
    assert arr.shape == (8, SIZE, SIZE, 5) and len(arr.addressable_shards) == 8


def global_batches(data_dir, process_count, steps, **kw):
    """The global batch sequence as sharding.host_batch_to_global assembles it: the hosts' batches
    concatenated in process order (ids of their rows)."""
    its = [pipeline.make_train_iterator(data_dir, "train", global_batch_size=8, process_index=p,
                                        process_count=process_count, **kw) for p in range(process_count)]
    return [[i for it in its for i in ids(next(it))] for _ in range(steps)]


def test_global_batch_sequence_is_the_same_for_1_2_4_hosts_and_after_resume(data_dir):
    kw = dict(seed=3, shuffle_buffer=16)
    one = global_batches(data_dir, 1, 5, **kw)  # 20 examples / 8 = 2 steps per epoch: 2.5 epochs
    assert len({i for b in one[:2] for i in b}) == 16 and one[0] != one[2]
    assert global_batches(data_dir, 2, 5, **kw) == one
    assert global_batches(data_dir, 4, 5, **kw) == one
    # Interrupted on 1 host after step 3, resumed on 4: the same batches as without the break.
    assert global_batches(data_dir, 4, 2, start_step=3, **kw) == one[3:]
    # A few labels: the same subset and order for any host count.
    few = dict(kw, label_fraction=0.5)
    assert global_batches(data_dir, 4, 3, **few) == global_batches(data_dir, 1, 3, **few)


def test_eval_hosts_split_the_examples_with_equal_batch_counts(data_dir, process_count=4):
    # val: 5 examples in 3 shards, global batch 8: the hosts get 2+2+1+0 valid rows, one batch each.
    runs = [list(pipeline.make_eval_iterator(data_dir, "val", global_batch_size=8, process_index=h,
                                             process_count=process_count)) for h in range(process_count)]
    assert {len(r) for r in runs} == {1}
    got = [i for r in runs for b in r for i in ids(b)]
    assert len(got) == 5 and sorted(got) == all_ids(data_dir, "val")
    full = list(pipeline.make_eval_iterator(data_dir, "train", global_batch_size=8, process_index=0,
                                            process_count=1))
    per_host = [list(pipeline.make_eval_iterator(data_dir, "train", global_batch_size=8, process_index=h,
                                                 process_count=process_count)) for h in range(process_count)]
    assert {len(r) for r in per_host} == {len(full)} == {3}
    assert [[i for r in per_host for i in ids(r[k])] for k in range(3)] == [ids(b) for b in full]


def test_resume_at_start_step_equals_uninterrupted(data_dir):
    kw = dict(global_batch_size=8, seed=7, process_index=0, process_count=1, shuffle_buffer=16)
    it = pipeline.make_train_iterator(data_dir, "train", **kw)
    full = [ids(next(it)) for _ in range(9)]  # 20 examples / 8 = 2 steps per epoch: 4.5 epochs
    assert full[0] != full[2]  # each epoch has its own order
    resumed = pipeline.make_train_iterator(data_dir, "train", start_step=5, **kw)
    assert [ids(next(resumed)) for _ in range(4)] == full[5:]
    other_seed = pipeline.make_train_iterator(data_dir, "train", **{**kw, "seed": 8})
    assert ids(next(other_seed)) != full[0]


def test_eval_covers_each_example_once_with_padding(data_dir):
    batches = list(pipeline.make_eval_iterator(data_dir, "val", global_batch_size=4, process_index=0,
                                               process_count=1))
    assert [b["example_valid"].tolist() for b in batches] == [[True] * 4, [True, False, False, False]]
    assert all(b["aerial"].shape == (4, SIZE, SIZE, 5) for b in batches)
    assert not batches[1]["aerial"][1:].any() and (batches[1]["label"][1:] == 0).all()
    got = [i for b in batches for i in ids(b)]
    assert len(set(got)) == len(got) == 5


def test_label_fraction_keeps_a_fixed_subset(data_dir):
    keep = pipeline.labelled_subset(data_dir, "train", 0.1, label_seed=0)
    assert len(keep) == 2 and keep == pipeline.labelled_subset(data_dir, "train", 0.1, label_seed=0)
    assert len(pipeline.labelled_subset(data_dir, "train", 0.01)) == 1
    it = pipeline.make_train_iterator(data_dir, "train", global_batch_size=4, seed=0, process_index=0,
                                      process_count=1, label_fraction=0.1)
    seen = {i for _ in range(3) for i in ids(next(it))}
    assert len(seen) == 2


def test_load_card_errors_name_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        pipeline.load_card(tmp_path)
    (tmp_path / "dataset_card.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        pipeline.load_card(tmp_path)


def test_eval_batch_count_comes_from_the_records_read(data_dir, tmp_path, monkeypatch):
    # Two train shards emptied behind the card's back (16 records left, the card says 20) and the
    # start-up check switched off: every host still yields the same number of batches (the eval
    # collectives would hang otherwise), 2 global batches of 8, not the card's 3.
    import shutil

    copy = shutil.copytree(data_dir, tmp_path / "ds")
    card = pipeline.load_card(copy)
    for name in card["splits"]["train"]["files"][:2]:
        (copy / name).write_bytes(b"")
    monkeypatch.setattr(pipeline, "check_shard_files", lambda *a, **k: [])
    runs = [list(pipeline.make_eval_iterator(copy, "train", global_batch_size=8, process_index=h, process_count=4))
            for h in range(4)]
    assert [len(r) for r in runs] == [2, 2, 2, 2]
    assert sum(int(b["example_valid"].sum()) for r in runs for b in r) == 16
