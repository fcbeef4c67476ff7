"""lcssl.report on two tiny runs' workdirs, written as lcssl.train writes them: scalars through
clu's TensorBoard writer and eval_results.json from lcssl.metrics."""
import io
import json
import re
import struct
import subprocess
import sys
import zipfile
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from lcssl import files, metrics, report
from tests._train_helpers import ROOT, cli_env

CLASSES = ["building", "water", "crop"]


def fake_run(path, seed: int, steps=(2, 4, 6)) -> str:
    from clu import metric_writers

    rng = np.random.default_rng(seed)
    writer = metric_writers.create_default_writer(str(path))
    for step in steps:
        writer.write_scalars(step, {"train/loss": 2.0 / step + seed, "val/miou": 0.1 * step})
    writer.flush()
    writer.close()
    cm = rng.integers(0, 50, (3, 3)) + np.diag([200, 300, 0])
    cm[2], cm[:, 2] = 0, 0                      # 'crop' neither in the reference nor predicted: n/a
    scores = metrics.scores_from_confusion(cm, CLASSES)
    scores["confusion_matrix"] = cm.tolist()
    if seed:  # the second run's dataset has an official protocol (FLAIR #2 leaves 'other' out)
        scores.update(metrics.official_miou(scores, {"exclude_classes": ["water"]}))
    files.write_json(path / "eval_results.json", {"step": steps[-1], "test": scores, "val": scores})
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return (fake_run(tmp_path_factory.mktemp("ssl_ft"), 0),
            fake_run(tmp_path_factory.mktemp("scratch"), 1))


def test_events_are_read_without_tensorflow(runs):
    """In a process where `import tensorflow` fails (the GPU machine has none), with lcssl.predict
    imported too."""
    program = (
        "import sys, json\n"
        "sys.modules['tensorflow'] = None\n"
        "from lcssl import predict, report\n"
        f"print(json.dumps(report.read_scalars({runs[0]!r})))\n")
    proc = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=cli_env(devices=1),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scalars = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [s for s, _ in scalars["train/loss"]] == [2, 4, 6]
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [1.0, 0.5, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in scalars["val/miou"]], [0.2, 0.4, 0.6], rtol=1e-6)


def test_report_files_are_written_for_a_run_and_its_comparison(runs, tmp_path):
    ssl, scratch = runs
    page = report.write_report(ssl, str(tmp_path / "out"), compare=[scratch])
    text = open(page).read()
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    for name in ("curve_train_loss.svg", "curve_val_miou.svg", "iou.svg", "report.html"):
        assert name in names
    assert len([n for n in names if n.startswith("confusion_")]) == 2
    for name in names:
        if name.endswith(".svg"):
            ET.parse(tmp_path / "out" / name)              # well-formed
    iou = (tmp_path / "out" / "iou.svg").read_text()
    # Two runs x two scored classes are bars; the absent class is n/a for each.
    assert iou.count("<rect x=") == 4 and iou.count(">n/a<") == 2
    assert text.count("<svg") == len([n for n in names if n.endswith(".svg")])
    scores = files.read_json(f"{ssl}/eval_results.json")["test"]
    assert f"{100 * scores['miou']:.1f}%" in text
    official = files.read_json(f"{scratch}/eval_results.json")["test"]["miou_official"]
    assert "<th>official mIoU</th>" in text and f"<td>{100 * official:.1f}%</td>" in text
    assert text.count("<td>-</td>") == 1  # the first run's dataset has no official protocol


def test_cli_refuses_a_folder_that_is_not_a_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lcssl.report", f"--workdir={tmp_path}",
                           f"--out={tmp_path / 'r'}"], cwd=ROOT, env=cli_env(devices=1),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "neither TensorBoard event files nor eval_results.json" in proc.stderr


def test_png_writer_round_trips_the_pixels():
    import struct
    import zlib

    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    png = report.png_bytes(rgb)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    length = struct.unpack(">I", png[33:37])[0]
    assert png[37:41] == b"IDAT" and (width, height) == (7, 5)
    rows = np.frombuffer(zlib.decompress(png[41:41 + length]), np.uint8).reshape(5, 1 + 7 * 3)
    assert (rows[:, 0] == 0).all()                         # filter byte: none
    np.testing.assert_array_equal(rows[:, 1:].reshape(5, 7, 3), rgb)


@pytest.mark.parametrize("name", ["/etc/hostname", "../outside.npz", "a/../../outside.npz"])
def test_paths_read_from_a_predict_summary_must_stay_in_its_folder(tmp_path, name):
    maps = tmp_path / "maps"
    maps.mkdir()
    files.write_json(maps / "summary.json", {"scores": {"class_names": ["a", "b"]},
                                             "patches": [{"file": "p.tif", "sample": name}]})
    with pytest.raises(report.ReportError, match=rf"summary.json: {re.escape(repr(name))} (points outside|is not a "
                                                 "relative path inside)"):
        report.sample_panels(str(maps))


def sample_panel(rgb_npy: bytes | None = None) -> bytearray:
    """A sample panel as predict writes it (np.savez_compressed), or one holding `rgb_npy` as its
    rgb.npy."""
    buffer = io.BytesIO()
    if rgb_npy is None:
        np.savez_compressed(buffer, rgb=np.arange(64 * 64 * 3).astype(np.uint8).reshape(64, 64, 3))
    else:
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("rgb.npy", rgb_npy)
    return bytearray(buffer.getvalue())


def damaged_panel(where: str) -> bytes:
    """One byte of a sample panel damaged, where each numpy / zipfile error comes from."""
    if where == "npy header":  # its opening brace: the header no longer tokenizes
        buffer = io.BytesIO()
        np.save(buffer, np.zeros((64, 64, 3), np.uint8))
        npy = bytearray(buffer.getvalue())
        npy[npy.index(b"{")] ^= 0x01
        return bytes(sample_panel(bytes(npy)))
    raw = sample_panel()
    local, central = raw.index(b"PK\x03\x04"), raw.index(b"PK\x01\x02")
    if where == "deflate stream":  # the first block's type bits set to 11, which deflate reserves
        name_length, extra_length = struct.unpack("<HH", raw[local + 26:local + 30])
        raw[local + 30 + name_length + extra_length] |= 0x06
    elif where == "compression method":
        raw[central + 10] ^= 0xFF
    elif where == "encryption flag":
        raw[central + 8] ^= 0x01
    return bytes(raw)


@pytest.mark.parametrize("damage", [b"not a zip file", b"PK\x03\x04 cut short"] + [
    pytest.param(damaged_panel(where), id=where)
    for where in ("deflate stream", "npy header", "compression method", "encryption flag")])
def test_a_damaged_sample_panel_is_one_line_naming_it(tmp_path, damage, capsys):
    maps = tmp_path / "maps"
    maps.mkdir()
    (maps / "p.npz").write_bytes(damage)
    files.write_json(maps / "summary.json", {"scores": {"class_names": ["a", "b"]},
                                             "patches": [{"file": "p.tif", "sample": "p.npz"}]})
    with pytest.raises(report.ReportError, match=rf"^{maps}/p.npz: unreadable sample panel"):
        report.sample_panels(str(maps))
    from lcssl import cli

    fake_run(tmp_path / "run", 0)
    with pytest.raises(SystemExit) as exit_info:  # the command: one line, exit 2, no traceback
        cli.user_errors(report.main)([f"--workdir={tmp_path / 'run'}", f"--maps={maps}",
                                      f"--out={tmp_path / 'report'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: {maps}/p.npz")
