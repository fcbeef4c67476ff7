"""A run report: one self-contained HTML page with the training curves, the confusion matrix and
per-class IoU of one run, side by side with other runs (e.g. SSL fine-tuning vs from scratch).

    python -m lcssl.report --workdir=runs/ft --compare=runs/sup --out=reports/ft
    python -m lcssl.predict --checkpoint=runs/ft --records=data/flair2 --split=test --out=maps/ft
    python -m lcssl.report --workdir=runs/ft --maps=maps/ft --out=reports/ft   # + sample panels

Reads what lcssl.train leaves in a workdir: the TensorBoard event files (every scalar tag:
train/loss, val/miou, probe/accuracy, ...) and eval_results.json (per-split scores with the
confusion matrix). Writes OUT/report.html and each figure as OUT/<name>.svg.

The figures are SVG drawn here, not matplotlib (not a dependency of lcssl): the page needs no
other file and no network, and the drawings are plain text that tests can read. Event files are
parsed with TensorBoard's protobuf definitions alone, so no TensorFlow is imported.
"""
from __future__ import annotations

import argparse
import base64
import glob
import html
import math
import os
import struct
import sys
import tokenize
import warnings
import zipfile
import zlib
from typing import Sequence

import numpy as np

from lcssl import files
from lcssl.errors import ReportError

RUN_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")



# ------------------------------------------------------------------------------------------------
# Reading a run
# ------------------------------------------------------------------------------------------------

def _records(path: str):
    """The payloads of a TFRecord file (length, masked CRC, data, masked CRC); a truncated last
    record (a run still writing) ends the file."""
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            if len(data) < length or len(f.read(4)) < 4:
                return
            yield data


def _scalar(value) -> float | None:
    if value.HasField("simple_value"):
        return float(value.simple_value)
    if not value.HasField("tensor") or value.tensor.tensor_shape.dim:
        return None
    t = value.tensor
    dtypes = {1: np.float32, 2: np.float64, 3: np.int32, 9: np.int64}
    if t.dtype not in dtypes:
        return None
    if t.tensor_content:
        return float(np.frombuffer(t.tensor_content, dtype=dtypes[t.dtype])[0])
    for field in ("float_val", "double_val", "int_val", "int64_val"):
        values = getattr(t, field)
        if len(values):
            return float(values[0])
    return None


def read_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...] sorted by step} from every event file of `workdir` (the last
    value wins when a resumed run logged a step twice)."""
    from tensorboard.compat.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
        for record in _records(path):
            event = event_pb2.Event.FromString(record)
            if not event.HasField("summary"):
                continue
            for value in event.summary.value:
                v = _scalar(value)
                if v is not None and math.isfinite(v):
                    out.setdefault(value.tag, {})[int(event.step)] = v
    return {tag: sorted(steps.items()) for tag, steps in sorted(out.items())}


def read_run(workdir: str, split: str | None = None) -> dict:
    """{'name', 'scalars', 'scores' (the split's eval scores or None), 'split'} of a workdir."""
    if not os.path.isdir(workdir):
        raise ReportError(f"--workdir/--compare={workdir}: no such folder")
    scalars = read_scalars(workdir)
    results_path = os.path.join(workdir, "eval_results.json")
    results = files.read_json(results_path) if os.path.exists(results_path) else {}
    if not scalars and not results:
        raise ReportError(f"{workdir}: neither TensorBoard event files nor eval_results.json; is it "
                          "the --workdir of an lcssl.main run?")
    splits = [s for s in ([split] if split else ["test", "val"]) if isinstance(results.get(s), dict)]
    if split and not splits and results:
        raise ReportError(f"{results_path} has no split {split!r} (found "
                          f"{sorted(k for k, v in results.items() if isinstance(v, dict))}); "
                          "choose one with --split")
    chosen = splits[0] if splits else None
    return {"name": os.path.basename(os.path.normpath(workdir)), "workdir": workdir,
            "scalars": scalars, "split": chosen, "scores": results.get(chosen) if chosen else None}


# ------------------------------------------------------------------------------------------------
# Drawing (plain SVG)
# ------------------------------------------------------------------------------------------------

def _svg(width: int, height: int, body: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">\n'
            + "\n".join(body) + "\n</svg>\n")


def _text(x, y, s, anchor="start", **attrs) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{v}"' for k, v in attrs.items())
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{html.escape(str(s))}</text>'


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (m * step) <= n:
            step *= m
            break
    return [v * step for v in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def curve_svg(tag: str, runs: Sequence[tuple[str, list[tuple[int, float]]]]) -> str:
    """One scalar tag over steps, a line per run."""
    w, h, left, right, top, bottom = 380, 230, 55, 10, 24, 34
    points = [p for _, series in runs for p in series]
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        y0, y1 = y0 - (abs(y0) or 1) * 0.05, y1 + (abs(y1) or 1) * 0.05
    sx = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)
    sy = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)
    body = [f'<rect width="{w}" height="{h}" fill="white"/>', _text(w / 2, 15, tag, "middle",
                                                                    font_weight="bold")]
    for v in _ticks(y0, y1):
        body += [f'<line x1="{left}" x2="{w - right}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" '
                 'stroke="#ddd"/>', _text(left - 4, sy(v) + 4, f"{v:.4g}", "end")]
    for v in _ticks(x0, x1):
        body.append(_text(sx(v), h - bottom + 14, f"{v:g}", "middle"))
    body.append(_text(w / 2, h - 4, "step", "middle"))
    for i, (name, series) in enumerate(runs):
        colour = RUN_COLOURS[i % len(RUN_COLOURS)]
        path = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in series)
        body.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}"/>')
        if len(series) == 1:
            s, v = series[0]
            body.append(f'<circle cx="{sx(s):.1f}" cy="{sy(v):.1f}" r="3" fill="{colour}"/>')
        if len(runs) > 1:
            body.append(_text(w - right - 4, top + 12 + 13 * i, name, "end", fill=colour))
    return _svg(w, h, body)


def confusion_svg(confusion: Sequence[Sequence[float]], names: Sequence[str], title: str) -> str:
    """Row-normalised confusion matrix (rows: reference, columns: predicted), percent per cell."""
    cm = np.asarray(confusion, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    k, cell = len(names), 30
    left, top = 8 + 7 * max(len(n) for n in names), 40 + 7 * max(len(n) for n in names)
    w, h = left + k * cell + 10, top + k * cell + 30
    body = [f'<rect width="{w}" height="{h}" fill="white"/>',
            _text(10, 16, title, font_weight="bold")]
    for i in range(k):
        body.append(_text(left - 4, top + i * cell + cell / 2 + 4, names[i], "end"))
        x = left + i * cell + cell / 2 + 4
        body.append(f'<text x="{x:.1f}" y="{top - 4}" transform="rotate(-60 {x:.1f} {top - 4})">'
                    f"{html.escape(names[i])}</text>")
        for j in range(k):
            v = norm[i, j]
            shade = int(round(255 * (1 - v)))
            body.append(f'<rect x="{left + j * cell}" y="{top + i * cell}" width="{cell}" '
                        f'height="{cell}" fill="rgb({shade},{shade},255)" stroke="#eee">'
                        f"<title>{html.escape(names[i])} -> {html.escape(names[j])}: "
                        f"{100 * v:.1f}% ({int(cm[i, j])} px)</title></rect>")
            if rows[i, 0] > 0 and v >= 0.005:
                body.append(_text(left + j * cell + cell / 2, top + i * cell + cell / 2 + 4,
                                  f"{100 * v:.0f}", "middle", fill="white" if v > 0.5 else "black",
                                  font_size="9"))
    body.append(_text(left, h - 8, "rows: reference class (grey: no pixel), columns: predicted; "
                      "% of the row"))
    return _svg(w, h, body)


def iou_bars_svg(names: Sequence[str], runs: Sequence[tuple[str, Sequence[float | None], float | None]],
                 title: str) -> str:
    """Per-class IoU, one bar per run side by side; classes without reference pixels are n/a."""
    bar, gap = 9, 8
    group = bar * len(runs) + gap
    left, top, plot_w = 8 + 7 * max(len(n) for n in names), 30 + 14 * len(runs), 300
    w, h = left + plot_w + 50, top + group * len(names) + 30
    body = [f'<rect width="{w}" height="{h}" fill="white"/>',
            _text(10, 16, title, font_weight="bold")]
    for r, (run, _, miou) in enumerate(runs):
        label = f"{run}: mIoU {'n/a' if miou is None else f'{100 * miou:.1f}%'}"
        body.append(_text(left, 30 + 14 * r, label, fill=RUN_COLOURS[r % len(RUN_COLOURS)]))
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        x = left + v * plot_w
        body += [f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{h - 24}" stroke="#ddd"/>',
                 _text(x, h - 10, f"{int(100 * v)}%", "middle")]
    for i, name in enumerate(names):
        y = top + i * group
        body.append(_text(left - 4, y + group / 2, name, "end"))
        for r, (run, ious, _) in enumerate(runs):
            v = ious[i] if i < len(ious) else None
            yy = y + r * bar
            if v is None:
                body.append(_text(left + 2, yy + bar - 1, "n/a", font_size="8", fill="#888"))
                continue
            body.append(f'<rect x="{left}" y="{yy}" width="{v * plot_w:.1f}" height="{bar - 1}" '
                        f'fill="{RUN_COLOURS[r % len(RUN_COLOURS)]}"><title>{html.escape(run)} '
                        f"{html.escape(name)}: {100 * v:.1f}%</title></rect>")
    return _svg(w, h, body)


def png_bytes(rgb: np.ndarray) -> bytes:
    """[H, W, 3] uint8 -> a PNG file (8-bit RGB, no filter): zlib alone, no imaging library."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _img(rgb: np.ndarray, title: str) -> str:
    data = base64.b64encode(png_bytes(rgb)).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" width="160" '
            f'style="image-rendering:pixelated" alt="{html.escape(title)}">'
            f"<figcaption>{html.escape(title)}</figcaption></figure>")


def ndvi_svg(dates: Sequence[int], ndvi: Sequence[float], encoding: str) -> str:
    """Mean NDVI of the series crop per date (the model's date encoding on the x axis)."""
    return curve_svg(f"NDVI ({encoding})", [("ndvi", list(zip(dates, ndvi)))])


def _inside(folder: str, name, listed_in: str) -> str:
    """`folder/name` for a plain relative path that stays inside `folder` (names read from a file
    must not reach /etc/... or ../...), else a ReportError naming the file that listed it."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\0" in name:
        raise ReportError(f"{listed_in}: {name!r} is not a relative path inside {folder}")
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise ReportError(f"{listed_in}: {name!r} points outside {folder}; a predict summary lists files "
                          "inside its own folder")
    return path


# What numpy's .npz reader raises for a damaged file, besides OSError / ValueError / EOFError:
# zipfile's BadZipFile (a bad CRC, no zip), NotImplementedError (an unknown compression method)
# and RuntimeError (a member marked encrypted); zlib.error (a damaged deflate stream); the .npy
# header's parser, tokenize.TokenError and SyntaxError; MemoryError (the array size it claims).
_DAMAGED_NPZ = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error,
                NotImplementedError, RuntimeError, tokenize.TokenError, SyntaxError, MemoryError)


def sample_panels(maps_dir: str) -> list[str]:
    """Rows of panels for the patches `python -m lcssl.predict --records` saved samples of:
    aerial RGB, NDVI over time, label, prediction, errors (red: wrong, grey: no label)."""
    import rasterio

    from lcssl.predict import NODATA, class_colours

    summary_path = os.path.join(maps_dir, "summary.json")
    if not os.path.exists(summary_path):
        raise ReportError(f"--maps={maps_dir}: no summary.json; expected the --out folder of "
                          "`python -m lcssl.predict --records=DATA --split=...`")
    try:
        summary = files.read_json(summary_path, "predict summary")
        colours = np.array(class_colours(summary["scores"]["class_names"]) + [(0, 0, 0)] * 256,
                           np.uint8)
        patches = [p for p in summary["patches"] if "sample" in p]
        paths = [(_inside(maps_dir, p["sample"], summary_path), _inside(maps_dir, p["file"], summary_path))
                 for p in patches]
    except (KeyError, TypeError, AttributeError) as e:
        raise ReportError(f"{summary_path}: not a summary written by `python -m lcssl.predict --records` "
                          f"(missing or malformed {e}); re-run that command into --maps") from None
    except (FileNotFoundError, ValueError) as e:
        raise ReportError(str(e)) from None
    rows = []
    for patch, (sample_path, map_path) in zip(patches, paths):
        try:
            with np.load(sample_path) as z:  # pickles refused (allow_pickle=False, numpy's default)
                sample = {k: z[k] for k in z.files}
            rgb = sample["rgb"]
        except _DAMAGED_NPZ as e:
            raise ReportError(f"{sample_path}: unreadable sample panel ({type(e).__name__}: "
                              f"{str(e)[:120]}); re-run `python -m lcssl.predict --records` into "
                              f"--maps={maps_dir}") from None
        with warnings.catch_warnings():   # patches carry no georeferencing, by design
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            try:
                with rasterio.open(map_path) as src:
                    pred, label = src.read()
            except (rasterio.errors.RasterioError, ValueError) as e:
                raise ReportError(f"{map_path}: unreadable patch map ({str(e)[:120]}); re-run "
                                  f"`python -m lcssl.predict --records` into --maps={maps_dir}") from None
        lut = colours.copy()
        lut[NODATA] = (128, 128, 128)
        errors = np.full(pred.shape + (3,), 255, np.uint8)
        errors[(pred != label) & (label != NODATA)] = (220, 30, 30)
        errors[label == NODATA] = (128, 128, 128)
        acc = patch.get("accuracy")
        cells = [_img(rgb, f"{patch['file']} aerial RGB")]
        if "ndvi" in sample:
            cells.append(f"<figure>{ndvi_svg(sample['dates'].tolist(), sample['ndvi'].tolist(), str(sample['date_encoding']))}</figure>")
        cells += [_img(lut[label], "label"), _img(lut[pred], "prediction"),
                  _img(errors, "errors" + ("" if acc is None else f" (accuracy {100 * acc:.1f}%)"))]
        rows.append('<div class="sample">' + "".join(cells) + "</div>")
    return rows


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------

def _slug(tag: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in tag).strip("_")


def write_report(workdir: str, out_dir: str, compare: Sequence[str] = (),
                 split: str | None = None, maps: str | None = None) -> str:
    """Writes OUT/report.html (figures inline) and OUT/*.svg; returns the HTML path. `maps`: the
    output folder of `python -m lcssl.predict --records=...` for sample panels."""
    panels = sample_panels(maps) if maps else []
    runs = [read_run(workdir, split)] + [read_run(c, split) for c in compare]
    names = [r["name"] for r in runs]
    if len(set(names)) < len(names):   # same folder names in different places
        for r in runs:
            r["name"] = os.path.normpath(r["workdir"])
    os.makedirs(out_dir, exist_ok=True)
    figures: list[tuple[str, str, str]] = []   # (section, file name, svg)

    tags = sorted({t for r in runs for t in r["scalars"]},
                  key=lambda t: (t.split("/")[0] != "train", t.split("/")[0] != "val", t))
    for tag in tags:
        series = [(r["name"], r["scalars"][tag]) for r in runs if r["scalars"].get(tag)]
        figures.append(("Curves", f"curve_{_slug(tag)}.svg", curve_svg(tag, series)))

    scored = [r for r in runs if r["scores"]]
    if scored:
        classes = list(scored[0]["scores"]["class_names"])
        for r in scored:
            s = r["scores"]
            figures.append(("Confusion matrices", f"confusion_{_slug(r['name'])}.svg",
                            confusion_svg(s["confusion_matrix"], s["class_names"],
                                          f"{r['name']} ({r['split']})")))
        same = [r for r in scored if list(r["scores"]["class_names"]) == classes]
        figures.append(("Per-class IoU", "iou.svg", iou_bars_svg(
            classes, [(r["name"], r["scores"]["iou"], r["scores"].get("miou")) for r in same],
            f"IoU per class ({', '.join(sorted({r['split'] for r in same}))})")))

    for _, name, svg in figures:
        files.atomic_write_bytes(os.path.join(out_dir, name), svg.encode())
    rows = "".join(
        f"<tr><td>{html.escape(r['name'])}</td><td>{html.escape(r['workdir'])}</td>"
        f"<td>{r['split'] or '-'}</td><td>{_pct(r['scores'], 'miou')}</td>"
        f"<td>{_pct(r['scores'], 'miou_official')}</td>"
        f"<td>{_pct(r['scores'], 'oa')}</td></tr>" for r in runs)
    sections, current = [], None
    for section, name, svg in figures:
        if section != current:
            sections.append(f"<h2>{section}</h2>")
            current = section
        sections.append(f'<figure id="{name[:-4]}">{svg}</figure>')
    if panels:
        sections.append(f"<h2>Samples ({html.escape(maps)})</h2>" + "".join(panels))
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>lcssl report: {html.escape(runs[0]['name'])}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} figure{{display:inline-block;margin:4px}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 8px}}
.sample figure{{vertical-align:top}} figcaption{{font-size:11px}}</style></head>
<body><h1>lcssl report: {html.escape(runs[0]['name'])}</h1>
<table><tr><th>run</th><th>workdir</th><th>split</th><th>mIoU</th><th>official mIoU</th><th>OA</th></tr>{rows}</table>
{''.join(sections)}
</body></html>
"""
    path = os.path.join(out_dir, "report.html")
    files.atomic_write_bytes(path, page.encode())
    return path


def _pct(scores, key) -> str:
    v = (scores or {}).get(key)
    return "-" if v is None else f"{100 * v:.1f}%"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lcssl.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="the run's --workdir")
    p.add_argument("--compare", action="append", default=[],
                   help="another run to show beside it (repeatable)")
    p.add_argument("--split", default=None,
                   help="split of eval_results.json to score (default: test, else val)")
    p.add_argument("--maps", default=None,
                   help="sample panels (aerial RGB, NDVI over time, label, prediction, errors) from "
                        "the --out folder of `python -m lcssl.predict --records=DATA`")
    p.add_argument("--out", required=True, help="folder for report.html and the SVG figures")
    args = p.parse_args(argv)
    for flag, value in (("--workdir", args.workdir), *(("--compare", c) for c in args.compare),
                        ("--maps", args.maps), ("--out", args.out)):
        files.refuse_remote(value, flag)
    path = write_report(args.workdir, args.out, args.compare, args.split, args.maps)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    from lcssl import cli

    sys.exit(cli.user_errors(main)())
