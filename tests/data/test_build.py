"""data_prep.build: splits, card statistics, bad patches, strict mode, atomic shards, resume."""
import dataclasses
import datetime
import hashlib
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from data_prep import build, layouts
from data_prep.patch import REASONS, BadPatch, PatchRef, RawPatch
from lcssl.data import sits as sits_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]
SITS = {"max_dates": 8, "min_clear_dates": 2, "max_cloud": 0.5}


def make_patch(patch_id, zone, *, labelled=True, size=16, num_dates=6, cloudy=False):
    rng = np.random.default_rng(int(hashlib.md5(patch_id.encode()).hexdigest()[:8], 16))
    label = None
    if labelled:
        label = rng.integers(0, 13, (size, size)).astype(np.uint8)
        label[0, :3] = 255
    cloud = rng.uniform(0, 0.4, num_dates).astype(np.float32)
    cloud[1] = 0.9  # one cloudy date is always dropped
    if cloudy:
        cloud[:] = 0.9
    return RawPatch(
        patch_id=patch_id, zone=zone, domain="D013", aerial=rng.integers(0, 256, (size, size, 5), dtype=np.uint8),
        aerial_crs="EPSG:2154", aerial_transform=(1.6, 0.0, 0.0, 0.0, -1.6, 0.0), label=label,
        sits=rng.integers(0, 10000, (num_dates, 4, 4, 10)).astype(np.uint16), sits_cloud=cloud,
        sits_dates=[datetime.date(2021, 1 + 2 * i, 5) for i in range(num_dates)],
        source={"aerial": f"/raw/{patch_id}.tif", "sits": f"/raw/{zone}_sits.npy"})


def fake_patches(num_zones=5, per_zone=4, unlabelled_per_zone=1):
    patches = {}
    for z in range(num_zones):
        for k in range(per_zone + unlabelled_per_zone):
            pid = f"IMG_{z}{k:02d}"
            patches[pid] = make_patch(pid, f"Z{z}", labelled=k < per_zone)
    return patches


def fake_reader(patches, bad=None):
    """The FLAIR #2 layout reading in-memory patches; `bad` maps a patch id to the BadPatch reason it raises."""
    bad = bad or {}

    def list_patches(root):
        return [PatchRef(patch_id=pid, zone=pid[4:5], domain="D013", aerial_path=f"/raw/{pid}.tif", label_path=None)
                for pid in sorted(set(patches) | set(bad))]

    def read_patch(ref, *, sits_size=40, expect_size=None, cloud_prob_threshold=None):
        if ref.patch_id in bad:
            raise BadPatch(f"/raw/{ref.patch_id}.tif", bad[ref.patch_id], "planted by the test")
        return patches[ref.patch_id]

    return dataclasses.replace(layouts.get("flair2"), list_patches=list_patches, read_patch=read_patch)


def options(**kw):
    base = dict(workers=1, shard_size=3, sits=SITS, progress=False, tfds_metadata=False)
    return build.BuildOptions(**{**base, **kw})


def count_records(path):
    import tensorflow as tf

    return sum(1 for _ in tf.data.TFRecordDataset(str(path)))


@pytest.fixture
def fake(monkeypatch):
    def install(patches, bad=None):
        monkeypatch.setattr(build, "_reader", lambda layout: fake_reader(patches, bad))

    return install


def test_split_zones_disjoint_deterministic_and_nonempty():
    zones = [f"Z{i}" for i in range(7)]
    a = build.split_zones(zones, val_fraction=0.15, test_fraction=0.15, seed=3)
    assert a == build.split_zones(list(reversed(zones)), val_fraction=0.15, test_fraction=0.15, seed=3)
    assert all(a[s] for s in ("train", "val", "test"))
    assert sorted(a["train"] + a["val"] + a["test"]) == zones
    assert build.split_zones(zones[:2], val_fraction=0.2, test_fraction=0.2, seed=0)["train"]  # keeps a train zone


def test_zones_of_the_same_name_in_two_domains_are_split_apart():
    # FLAIR #2 names zones Z1_UU, Z2_AA, ... again in every department.
    infos = [{"index": 4 * d + z, "patch_id": f"IMG_{4 * d + z}", "zone": f"Z{z}", "domain": f"D00{d}",
              "has_label": True} for d in range(2) for z in range(4)]
    zones, _, _ = build._plan(infos, build.BuildOptions(val_fraction=0.25, test_fraction=0.25, seed=0))
    units = zones["train"] + zones["val"] + zones["test"]
    assert sorted(units) == sorted(f"D00{d}/Z{z}" for d in range(2) for z in range(4))
    assert len(zones["val"]) == len(zones["test"]) == 2  # a quarter of 8 units, not of 4 names


def test_a_split_fixed_by_the_layout_is_kept_and_no_test_zone_is_drawn():
    # FLAIR #2 with its released test folders: their zones are the test split, whatever the fractions.
    infos = [{"index": 5 * z + k, "patch_id": f"IMG_{5 * z + k}", "zone": f"Z{z}", "domain": "D013",
              "has_label": k < 4, "split": None} for z in range(6) for k in range(5)]
    infos += [{"index": 100 + k, "patch_id": f"IMG_{100 + k}", "zone": "Z1", "domain": "D099",
               "has_label": k < 3, "split": "test"} for k in range(4)]
    zones, shards, held_out = build._plan(infos, build.BuildOptions(val_fraction=0.2, test_fraction=0.5,
                                                                    shard_size=4, seed=0))
    ids = {s: sorted(m[1] for shard in shards[s] for m in shard) for s in build.SPLITS}
    assert zones["test"] == ["D099/Z1"] and ids["test"] == [f"IMG_{100 + k}" for k in range(3)]
    assert len(zones["val"]) == 1 and len(zones["train"]) == 5      # the draw covers D013 only
    assert held_out == 1 + 1 and "IMG_103" not in ids["unlabelled"]  # test imagery kept out of pre-training


def test_build_splits_by_zone_and_card_stats_match_numpy(tmp_path, fake):
    patches = fake_patches()
    fake(patches)
    summary = build.build("/raw", tmp_path, layout="flair2", options=options())
    card = json.loads((tmp_path / "dataset_card.json").read_text())
    plan = json.loads((tmp_path / "build_plan.json").read_text())

    ids = {s: [i for ids in plan["splits"][s]["shards"].values() for i in ids] for s in build.SPLITS}
    zones = {s: {patches[i].zone for i in ids[s]} for s in ids}
    assert not zones["train"] & zones["val"] and not zones["train"] & zones["test"] and not zones["val"] & zones["test"]
    assert all(ids[s] for s in ("train", "val", "test"))
    assert zones["unlabelled"] <= zones["train"]  # no imagery of eval zones in pre-training
    assert all(patches[i].label is None for i in ids["unlabelled"])
    assert summary["held_out_unlabelled"] == sum(
        p.label is None and p.zone not in zones["train"] for p in patches.values())
    for s in build.SPLITS:
        info = card["splits"][s]
        assert info["num_examples"] == len(ids[s]) == summary["written"][s]
        assert [count_records(tmp_path / f) for f in info["files"]] == info["shard_examples"]

    stat = [patches[i] for i in sorted(set(ids["train"]) | set(ids["unlabelled"]))]
    aerial = np.concatenate([p.aerial.reshape(-1, 5) for p in stat]).astype(np.float64)
    np.testing.assert_allclose(card["aerial"]["mean"], aerial.mean(0), rtol=1e-9)
    np.testing.assert_allclose(card["aerial"]["std"], aerial.std(0), rtol=1e-9)
    opts = sits_lib.SitsOptions(**SITS)
    series = []
    for p in stat:
        s, _, valid = sits_lib.preprocess_series(p.sits, p.sits_cloud, p.sits_dates, opts)
        series.append(s[valid].reshape(-1, 10))
    series = np.concatenate(series).astype(np.float64)
    np.testing.assert_allclose(card["sits"]["mean"], series.mean(0), rtol=1e-9)
    np.testing.assert_allclose(card["sits"]["std"], series.std(0), rtol=1e-9)
    assert card["sits"]["max_dates"] == 8 and card["aerial"]["size"] == 16 and card["aerial"]["gsd_m"] == 1.6
    assert card["official_miou"]["exclude_classes"] == ["other"]  # the FLAIR #2 challenge's score

    labels = np.concatenate([patches[i].label.ravel() for i in ids["train"]])
    hist = np.bincount(labels[labels != 255], minlength=13)
    assert card["class_histogram"] == hist.tolist()
    w = np.asarray(card["class_weights"])
    np.testing.assert_allclose(w.mean(), 1.0)  # all 13 classes present in this data
    np.testing.assert_allclose(w * np.sqrt(hist), (w * np.sqrt(hist))[0])  # w ~ 1/sqrt(freq)


def test_class_weights_absent_class_is_zero():
    w = build.class_weights([100, 0, 25])
    assert w[1] == 0 and np.isclose((w[0] + w[2]) / 2, 1) and np.isclose(w[2] / w[0], 2)


def test_unlabelled_includes_train_drops_labels(tmp_path, fake):
    patches = fake_patches(num_zones=3, per_zone=2, unlabelled_per_zone=0)
    fake(patches)
    build.build("/raw", tmp_path, layout="flair2", options=options(unlabelled_includes_train=True))
    card = json.loads((tmp_path / "dataset_card.json").read_text())
    assert card["splits"]["unlabelled"]["num_examples"] == card["splits"]["train"]["num_examples"] > 0
    from lcssl.data import records

    import tensorflow as tf

    decode = records.decode_fn(card)
    for f in card["splits"]["unlabelled"]["files"]:
        for r in tf.data.TFRecordDataset(str(tmp_path / f)):
            ex = decode(r)
            assert not ex["has_label"] and np.all(ex["label"].numpy() == 255)


def test_each_bad_category_is_skipped_and_named(tmp_path, fake):
    patches = fake_patches(num_zones=3, per_zone=2, unlabelled_per_zone=0)
    patches["IMG_cloudy"] = make_patch("IMG_cloudy", "Z0", cloudy=True)
    patches["IMG_big"] = make_patch("IMG_big", "Z1", size=32)
    reasons = [r for r in REASONS if r != "too_few_dates"]
    bad = {f"IMG_bad_{r}": r for r in reasons}
    fake(patches, bad)
    summary = build.build("/raw", tmp_path, layout="flair2", options=options())
    got = {(b["file"], b["reason"]) for b in summary["bad_patches"]}
    assert {(f"/raw/{ref}.tif", r) for ref, r in bad.items()} <= got
    assert ("/raw/Z0_sits.npy", "too_few_dates") in got
    assert ("/raw/IMG_big.tif", "size") in got
    assert summary["skipped"] == {r: 1 + (r == "size") for r in REASONS}
    assert sum(summary["written"][s] for s in ("train", "val", "test")) == 6
    assert json.loads((tmp_path / "build_summary.json").read_text())["skipped_total"] == len(REASONS) + 1


def test_strict_raises_at_first_bad_patch_and_writes_no_shard(tmp_path, fake):
    fake(fake_patches(num_zones=3, per_zone=2), {"IMG_zz": "nonfinite"})
    with pytest.raises(build.BuildError, match=r"/raw/IMG_zz.tif: nonfinite"):
        build.build("/raw", tmp_path, layout="flair2", options=options(strict=True))
    assert not list(tmp_path.glob("*.tfrecord")) and not (tmp_path / "dataset_card.json").exists()


def test_failure_mid_write_leaves_no_partial_shard_and_resume_is_identical(tmp_path, fake, monkeypatch):
    patches = fake_patches()
    fake(patches)
    clean = tmp_path / "clean"
    build.build("/raw", clean, layout="flair2", options=options())

    from lcssl.data import records

    real_encode, calls = records.encode_example, []

    def failing(**kw):  # dies inside the 3rd shard, after it has written one record
        calls.append(kw["patch_id"])
        if len(calls) == 8:
            raise RuntimeError("disk full (simulated)")
        return real_encode(**kw)

    out = tmp_path / "resumed"
    monkeypatch.setattr(records, "encode_example", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        build.build("/raw", out, layout="flair2", options=options())
    assert not list(out.glob(".*tmp*")) and not (out / "dataset_card.json").exists()
    plan = json.loads((out / "build_plan.json").read_text())
    sizes = {f: len(ids) for s in plan["splits"].values() for f, ids in s["shards"].items()}
    done = sorted(out.glob("*.tfrecord"))
    assert len(done) == 2 and all(count_records(f) == sizes[f.name] for f in done)

    monkeypatch.setattr(records, "encode_example", real_encode)
    summary = build.build("/raw", out, layout="flair2", options=options())
    assert summary["shards"] == {"written": len(sizes) - 2, "reused": 2, "replaced": []}
    names = sorted(p.name for p in clean.glob("*.tfrecord"))
    assert names == sorted(p.name for p in out.glob("*.tfrecord"))
    assert all((clean / n).read_bytes() == (out / n).read_bytes() for n in names)
    card = lambda d: {k: v for k, v in json.loads((d / "dataset_card.json").read_text()).items()}
    assert card(clean) == card(out)


def test_rerun_with_other_options_refuses(tmp_path, fake):
    fake(fake_patches(num_zones=3, per_zone=2))
    build.build("/raw", tmp_path, layout="flair2", options=options())
    with pytest.raises(build.BuildError, match="different inputs or options"):
        build.build("/raw", tmp_path, layout="flair2", options=options(seed=1))


# --- end to end on the synthetic raw layouts (real readers) -------------------------------------


@pytest.mark.slow
def test_cli_synth_build_flair2_parallel_then_resume(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "tfr"
    run = lambda *a: subprocess.run([sys.executable, "-m", "data_prep", *a], cwd=ROOT, capture_output=True,
                                    text=True, timeout=240)
    r = run("synth", "--layout=flair2", f"--out={raw}", "--num-zones=4", "--patches-per-zone=2", "--patch-size=32",
            "--num-dates=6", "--unlabelled-per-zone=1")
    assert r.returncode == 0, r.stderr
    args = ("build", "--layout=flair2", f"--src={raw}", f"--out={out}", "--expect-size=32", "--shard-size=2",
            "--workers=2", "--no-tfds-metadata", "--no-progress", "--min-clear-dates=1", "--max-dates=6")
    r = run(*args)
    assert r.returncode == 0, r.stderr
    assert "written: train" in r.stdout and "skipped: 0" in r.stdout
    card = json.loads((out / "dataset_card.json").read_text())
    assert card["aerial"]["size"] == 32 and card["aerial"]["bands"] == ["R", "G", "B", "NIR", "elevation"]
    assert np.isclose(card["aerial"]["gsd_m"], 3.2) and card["sits"]["max_dates"] == 6
    assert sum(card["splits"][s]["num_examples"] for s in ("train", "val", "test")) == 8
    first = {p.name: p.read_bytes() for p in out.glob("*.tfrecord")}
    (out / card["splits"]["train"]["files"][0]).unlink()
    r = run(*args[:-5], "--workers=1", *args[-4:])  # same bytes whatever the number of workers
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "build_summary.json").read_text())
    assert summary["shards"]["written"] == 1 and summary["shards"]["reused"] == len(first) - 1
    assert {p.name: p.read_bytes() for p in out.glob("*.tfrecord")} == first


def test_build_hameln_with_corrupt_files_and_tfds_loading(tmp_path):
    from data_prep import synth

    raw = tmp_path / "raw"
    synth.write_dataset(raw, layout="hameln", num_zones=3, patches_per_zone=2, unlabelled_per_zone=0,
                        patch_size=32, num_dates=6, seed=1)
    tifs = sorted((raw / "aerial").glob("*/*.tif"))
    tifs[0].write_bytes(b"not a tiff")  # unreadable
    dates = raw / "sits" / tifs[1].parent.name / f"{tifs[1].stem}_dates.txt"
    dates.write_text("2021-13-45\n")  # bad dates
    summary = build.build(raw, tmp_path / "tfr", layout="hameln",
                          options=options(tfds_metadata=True, sits={"max_dates": 6, "min_clear_dates": 1}))
    got = {(pathlib.Path(b["file"]).name, b["reason"]) for b in summary["bad_patches"]}
    assert (tifs[0].name, "unreadable") in got and (dates.name, "bad_dates") in got
    assert summary["skipped_total"] == 2 and sum(summary["written"].values()) == 4

    import tensorflow_datasets as tfds

    card = json.loads((tmp_path / "tfr" / "dataset_card.json").read_text())
    builder = tfds.builder_from_directory(str(tmp_path / "tfr"))
    assert builder.info.splits["train"].num_examples == card["splits"]["train"]["num_examples"]
    ex = next(iter(tfds.as_numpy(builder.as_dataset(split="train"))))
    assert ex["aerial"].shape == (32, 32, 4) and ex["sits"].dtype == np.uint16 and ex["has_label"] == 1


def test_strict_rerun_after_lenient_build_still_fails(tmp_path, fake):
    fake(fake_patches(num_zones=3, per_zone=2), {"IMG_zz": "dtype"})
    summary = build.build("/raw", tmp_path, layout="flair2", options=options())
    assert summary["skipped"] == {"dtype": 1}
    with pytest.raises(build.BuildError, match=r"/raw/IMG_zz.tif: dtype"):  # the cached scan is checked too
        build.build("/raw", tmp_path, layout="flair2", options=options(strict=True))
