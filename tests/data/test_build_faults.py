"""Build faults: the scan cache (JSON, per-file stamps), a worker that dies, workers that die with
their build, one build per --out, a full disk, one-line CLI errors for a raw dataset that cannot be
read as a whole, and georeferencing through a real build."""
import contextlib
import dataclasses
import json
import os
import pathlib
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import rasterio
import rasterio.transform

from data_prep import build, flair2, rasters, synth
from data_prep.__main__ import main as data_prep_main
from data_prep.patch import BadPatch
from lcssl import cli
from tests.data.test_build import fake_patches, fake_reader, options
from tests._disk import file_size_limit

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
    ("centroids_list", "expected an object {'IMG_<id>.tif': [row, col]}"),
    ("no_aerial", "expected the aerial folder"),
])
def test_a_raw_dataset_that_cannot_be_read_fails_with_one_line(raw, tmp_path, capsys, damage, expect):
    if damage == "centroids_json":
        bad = raw / flair2.CENTROIDS
        bad.write_text('{"IMG_000001.tif": [20, 20]')
    elif damage == "centroids_list":  # valid JSON, but not the object the table is
        bad = raw / flair2.CENTROIDS
        bad.write_text('[["IMG_000001.tif", [20, 20]]]')
    else:
        bad = raw / flair2.AERIAL_DIR
        os.rename(bad, raw / "elsewhere")
    with pytest.raises(SystemExit) as exit_info:
        cli.user_errors(data_prep_main)(["build", "--layout=flair2", f"--src={raw}",
                                         f"--out={tmp_path / 'out'}", f"--expect-size={SIZE}",
                                         "--no-progress", "--workers=1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == cli.EXIT_USER_ERROR and len(err.strip().splitlines()) == 1
    assert err.startswith("error: ") and str(bad) in err and expect in err


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


def test_a_rotated_grid_or_another_pixel_size_is_a_resolution_bad_patch():
    north_up = (1.6, 0.0, 100.0, 0.0, -1.6, 200.0)
    rasters.check_georef("p.tif", None, north_up, expect_crs=None, expect_gsd_m=1.6)  # passes
    for transform in [(1.6, 0.01, 100.0, 0.0, -1.6, 200.0), (1.6, 0.0, 100.0, -0.01, -1.6, 200.0),
                      (1.7, 0.0, 100.0, 0.0, -1.7, 200.0)]:
        with pytest.raises(BadPatch, match="expected a north-up grid of 1.6 m pixels") as info:
            rasters.check_georef("p.tif", None, transform, expect_crs=None, expect_gsd_m=1.6)
        assert info.value.reason == "resolution"


def test_build_skips_a_patch_whose_pixel_size_differs_from_the_first(tmp_path, monkeypatch):
    patches = fake_patches(num_zones=3, per_zone=2, unlabelled_per_zone=0)
    odd = sorted(patches)[-1]
    patches[odd] = dataclasses.replace(patches[odd], aerial_transform=(1.6 * 1.001, 0.0, 0.0, 0.0, -1.6 * 1.001, 0.0))
    monkeypatch.setattr(build, "_reader", lambda layout: fake_reader(patches))
    summary = build.build("/raw", tmp_path / "out", layout="flair2", options=options())
    assert [(b["file"], b["reason"]) for b in summary["bad_patches"]] == [(f"/raw/{odd}.tif", "resolution")]
    assert "expected 1.6 m as in the first patch" in summary["bad_patches"][0]["detail"]
    assert sum(summary["written"].values()) == len(patches) - 1


def test_sentinel2_file_of_random_bytes_is_named_without_numpys_pickle_advice(raw, tmp_path):
    ref = flair2.list_patches(raw)[0]
    with open(ref.files["sen_data"], "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(BadPatch) as info:
        rasters.load_npy(ref.files["sen_data"], what="super-patch data")
    assert info.value.reason == "unreadable" and info.value.path == ref.files["sen_data"]
    assert "is not a .npy array file" in str(info.value) and "pickle" not in str(info.value)


# --- Workers die with their build; one build per --out; a full disk ---------------------------------


def _sleep_in_worker(pid_file):
    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)
    return pid_file


def _running(pid) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


def test_build_workers_die_with_the_build_even_on_kill_9(tmp_path):
    pid_files = [str(tmp_path / f"worker{i}.pid") for i in range(2)]
    code = ("import sys; from data_prep import build; from tests.data.test_build_faults import _sleep_in_worker; "
            f"list(build._pool_map(_sleep_in_worker, {pid_files!r}, workers=2))")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=pathlib.Path(__file__).parents[2])
    workers = []
    try:
        deadline = time.time() + 120
        while len(workers) < 2 and time.time() < deadline and parent.poll() is None:
            workers = [int(open(f).read()) for f in pid_files if os.path.exists(f) and open(f).read()]
            time.sleep(0.2)
        assert len(workers) == 2, "the workers did not start"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 20
        while any(_running(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_running(w) for w in workers), "build workers outlived their build"
    finally:
        parent.kill()
        parent.wait()
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)


def test_a_second_build_into_the_same_out_is_refused_and_touches_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # the first build
    try:
        (out / build.LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid,
                                                       "pid_start": None, "started": "now"}))
        its_temp = out / ".train-00000-of-00002.tfrecord.tmp.12345"  # the first build's shard in progress
        its_temp.write_bytes(b"partial")
        monkeypatch.setattr(build, "_reader", lambda layout: fake_reader(fake_patches()))
        with pytest.raises(SystemExit) as exit_info:
            cli.user_errors(data_prep_main)(["build", "--layout=flair2", "--src=/raw", f"--out={out}",
                                             "--workers=1", "--no-progress"])
        assert exit_info.value.code == cli.EXIT_USER_ERROR
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out={out} is in use: ") and f"process {other.pid}" in err
        assert "Two builds into one --out" in err
        assert its_temp.read_bytes() == b"partial" and sorted(p.name for p in out.iterdir()) == sorted(
            [build.LOCK_NAME, its_temp.name])
    finally:
        other.kill()
        other.wait()


def build_cli(out):
    return cli.user_errors(data_prep_main)(["build", "--layout=flair2", "--src=/raw", f"--out={out}", "--workers=1",
                                            "--no-progress", "--no-tfds-metadata", "--shard-size=3"])


def test_a_full_disk_while_writing_a_shard_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(build, "_reader", lambda layout: fake_reader(fake_patches()))
    out = tmp_path / "out"
    assert build_cli(out) == 0  # then all but the plan and the scan cache are lost: shards to write again
    for path in [*out.glob("*.tfrecord"), out / "shard_index.json", out / "dataset_card.json"]:
        path.unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info, file_size_limit(4096):  # a shard is ~13 kB
        build_cli(out)
    assert exit_info.value.code == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out}/") and ".tfrecord: cannot write this shard" in err[0]
    assert "is the disk full?" in err[0] and "Traceback" not in err[0]
    assert not list(out.glob("*.tfrecord")) and not list(out.glob(".*tmp*"))
    assert build_cli(out) == 0  # space again: the same command resumes


def test_a_crash_while_writing_the_card_keeps_the_old_card_whole(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(build, "_reader", lambda layout: fake_reader(fake_patches()))
    out = tmp_path / "out"
    assert build_cli(out) == 0
    card = (out / "dataset_card.json").read_bytes()
    assert len(card) > 2048
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info, file_size_limit(1024):  # the shards are kept, the card fails
        build_cli(out)
    assert exit_info.value.code == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {out / 'dataset_card.json'}: file too large for the file size limit (ulimit -f) or the "
                   "filesystem: use another disk"]
    assert (out / "dataset_card.json").read_bytes() == card  # never half a card under its final name
    assert not list(out.glob(".*tmp*"))


def test_a_killed_builds_partial_files_are_removed_when_the_next_build_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "_reader", lambda layout: fake_reader(fake_patches()))
    out = tmp_path / "out"
    build.build("/raw", out, layout="flair2", options=options())
    left = [out / ".train-00000-of-00004.tfrecord.tmp.4242", out / ".dataset_card.json.tmp.4242"]
    for path in left:  # what kill -9 leaves (no finally ran)
        path.write_bytes(b"partial")
    with pytest.raises(build.BuildError, match="different inputs or options"):  # stops before writing
        build.build("/raw", out, layout="flair2", options=options(seed=1))
    assert not any(path.exists() for path in left)


def test_the_summary_names_a_zone_s_bad_sentinel2_file_once_with_its_patches():
    s2 = "/raw/sen/Z1/SEN2_data.npy"
    bad = [{"file": s2, "reason": "unreadable", "detail": "is not a .npy array file",
            "patch": f"/raw/aerial/Z1/IMG_{k}.tif"} for k in range(7)]
    bad.append({"file": "/raw/aerial/Z2/IMG_9.tif", "reason": "wrong_crs", "detail": "EPSG:4326",
                "patch": "/raw/aerial/Z2/IMG_9.tif"})
    summary = {"layout": "flair2", "patches_found": 20, "src": "/raw", "written": {"train": 12},
               "skipped": {"unreadable": 7, "wrong_crs": 1}, "skipped_total": 8, "held_out_unlabelled": 0,
               "bad_patches": bad, "shards": {"written": 1, "reused": 0, "replaced": []}, "seconds": 1.0,
               "out": "/out"}
    text = build.format_summary(summary)
    assert text.count(s2) == 1
    assert (f"    {s2}: unreadable: is not a .npy array file (skips 7 patches: /raw/aerial/Z1/IMG_0.tif, "
            "/raw/aerial/Z1/IMG_1.tif, /raw/aerial/Z1/IMG_2.tif, /raw/aerial/Z1/IMG_3.tif, "
            "/raw/aerial/Z1/IMG_4.tif, ... 2 more)") in text
    assert "    /raw/aerial/Z2/IMG_9.tif: wrong_crs: EPSG:4326\n" in text
