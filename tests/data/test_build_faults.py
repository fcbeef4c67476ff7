"""Build faults: the scan cache (JSON, per-file stamps), a worker that dies, one-line CLI errors for
a raw dataset that cannot be read as a whole, and georeferencing through a real build."""
import json
import os
import pickle
import threading

import numpy as np
import pytest
import rasterio
import rasterio.transform

from data_prep import build, flair2, synth
from data_prep.__main__ import main as data_prep_main

SIZE = synth.TINY["patch_size"]
SITS = {"max_dates": 6, "min_clear_dates": 1}


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    synth.write_dataset(root, layout="flair2", seed=5, **synth.TINY)
    return root


@pytest.fixture
def raw(raw_root, tmp_path):
    import shutil

    return shutil.copytree(raw_root, tmp_path / "raw")


def opts(**kw):
    return build.BuildOptions(**{**dict(workers=1, shard_size=2, sits=SITS, progress=False, tfds_metadata=False,
                                        expect_size=SIZE), **kw})


def scan(raw, out, options):
    refs = flair2.list_patches(raw)
    return refs, build._scan(raw, "flair2", refs, options, 13, out)


def same(info):
    return json.dumps(build._info_to_json(info), sort_keys=True)


def test_scan_cache_is_json_and_a_repaired_patch_is_scanned_again(raw, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    planted = tmp_path / "planted"

    class Plant:  # what the pickle cache of earlier versions would have run when loaded
        def __reduce__(self):
            return (os.system, (f"touch {planted}",))

    (out / ".scan-0123456789abcdef.pkl").write_bytes(pickle.dumps(Plant()))
    refs = flair2.list_patches(raw)
    victim = refs[0].aerial_path
    good_bytes = open(victim, "rb").read()
    with open(victim, "wb") as f:
        f.write(b"not a tiff")
    _, first = scan(raw, out, opts())
    assert first[0]["bad"][:2] == (victim, "unreadable")
    assert not planted.exists() and not list(out.glob("*.pkl"))
    cache = json.loads((out / build.SCAN_CACHE).read_text())  # plain JSON, nothing executable
    assert len(cache["patches"]) == len(refs)

    with open(victim, "wb") as f:  # repaired: other size and mtime
        f.write(good_bytes)
    _, second = scan(raw, out, opts())
    assert "bad" not in second[0] and second[0]["patch_id"] == refs[0].patch_id
    assert [same(i) for i in first[1:]] == [same(i) for i in second[1:]]

    # Unchanged files: the results come from the cache (a reader that fails would show otherwise).
    def no_reading(*a, **k):
        raise AssertionError("read although cached")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flair2, "read_patch", no_reading)
        _, third = scan(raw, out, opts())
    assert [same(i) for i in third] == [same(i) for i in second]


def _die_in_worker(task):
    os._exit(3)  # a worker killed by the OOM killer or a signal: no exception, no result


def test_a_worker_that_dies_fails_the_build_instead_of_hanging():
    outcome = []

    def run():
        try:
            outcome.append(list(build._pool_map(_die_in_worker, [1, 2, 3], workers=2)))
        except BaseException as e:  # handed to the test thread
            outcome.append(e)

    # A daemon thread: if the pool hangs (as multiprocessing.Pool did), the test fails instead of
    # hanging the suite.
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=180)
    assert not thread.is_alive(), "the build pool hangs after a worker died"
    assert isinstance(outcome[0], build.BuildError), outcome
    assert "worker process died" in str(outcome[0]) and "re-run the same command" in str(outcome[0])


@pytest.mark.parametrize("damage,expect", [
    ("centroids_json", "the centroid table is not valid UTF-8 JSON"),
    ("no_aerial", "expected the aerial folder"),
])
def test_a_raw_dataset_that_cannot_be_read_fails_with_one_line(raw, tmp_path, capsys, damage, expect):
    if damage == "centroids_json":
        bad = raw / flair2.CENTROIDS
        bad.write_text('{"IMG_000001.tif": [20, 20]')
    else:
        bad = raw / flair2.AERIAL_DIR
        os.rename(bad, raw / "elsewhere")
    code = data_prep_main(["build", "--layout=flair2", f"--src={raw}", f"--out={tmp_path / 'out'}",
                           f"--expect-size={SIZE}", "--no-progress", "--workers=1"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith("build failed: ") and str(bad) in err and expect in err


def test_build_reports_a_patch_in_another_crs_and_keeps_the_card_resolution(raw, tmp_path):
    ref = flair2.list_patches(raw)[-1]
    with rasterio.open(ref.aerial_path) as ds:
        pixels, profile = ds.read(), ds.profile
    profile.update(crs="EPSG:4326", transform=rasterio.transform.Affine(1.5e-5, 0, 2.35, 0, -1.5e-5, 48.85))
    with rasterio.open(ref.aerial_path, "w", **profile) as ds:
        ds.write(pixels)
    summary = build.build(raw, tmp_path / "out", layout="flair2", options=opts())
    assert [(b["file"], b["reason"]) for b in summary["bad_patches"]] == [(ref.aerial_path, "wrong_crs")]
    card = json.loads((tmp_path / "out" / "dataset_card.json").read_text())
    assert np.isclose(card["aerial"]["gsd_m"], 102.4 / SIZE)
