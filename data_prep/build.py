"""Raw patches -> sharded TFRecords + dataset_card.json (DESIGN.md "Record", "dataset_card.json").

Two passes over the patches, both parallel over `workers` processes:

1. scan: read every patch through the layout reader, filter its Sentinel-2 series
   (`lcssl.data.sits.preprocess_series`) and keep only small per-patch facts (zone, has_label,
   per-band mean / M2, class histogram). Bad patches (`BadPatch`, `TooFewDates`) are reported with
   file and reason and skipped; `strict` stops at the first one. The scan is cached in `out`
   (`.scan-cache.json`, JSON: never code) per patch, keyed on the size and mtime of each of its
   files: a resumed build does not read everything twice, and a repaired patch is scanned again.
2. write: split by zone, assign patches to shards deterministically (`build_plan.json`), and write
   each shard to a temp name, fsync it, rename it, and record its examples, bytes and sha256 in
   `shard_index.json`. A re-run with the same plan keeps an existing shard only if it matches its
   index entry (size and sha256; every byte is read), rewrites the others, and discards partial
   temp files, so an interrupted or damaged build resumes and yields identical shards.

A worker process that dies (killed, out of memory) fails the build with a BuildError instead of
hanging it; re-running the command resumes. Workers die with the build, whatever ends it (kill -9
included: `_die_with_parent`). A build holds `<out>/build.lock` (lcssl.files.FolderLock) so that a
second build into the same --out refuses instead of sweeping the first one's temp files. A shard
or file that cannot be written (disk full, permission) raises an OSError naming it (one line,
exit 2 on the command line). The card carries a checksum of its own content (`schema.seal_card`);
`verify` also checks it and every record's CRCs.

Arrays are kept out of the scan result: a 512 px FLAIR patch is ~2 MB, the dataset ~80k patches.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import math
import multiprocessing
import os
import pathlib
import sys
import time
from typing import Optional

import numpy as np

from data_prep import layouts
from data_prep.patch import REASONS, BadPatch, RawPatch
from lcssl.data.schema import (CARD_NAME, FORMAT_VERSION, PLAN_NAME, SHARD_INDEX_NAME, SUMMARY_NAME, seal_card,
                               zone_key)
from lcssl.errors import BuildError
from lcssl.files import FolderLock, read_json, to_json, write_json

SPLITS = ("train", "val", "test", "unlabelled")
SCAN_CACHE = ".scan-cache.json"
LOCK_NAME = "build.lock"  # one build at a time in an --out (lcssl.files.FolderLock)
# Two patches of one dataset have the same ground resolution up to the rounding of the GeoTIFF pixel
# scale (float64, or float32 in some writers: relative 6e-8); 1e-6 leaves a margin and still tells
# 0.2 m from 0.2002 m.
GSD_RTOL = 1e-6
CLASS_WEIGHTS_FORMULA = (
    "w_k = 1/sqrt(f_k) with f_k the train pixel frequency of class k, normalised to mean 1 over the "
    "classes present in train; 0 for classes absent from train")


@dataclasses.dataclass
class BuildOptions:
    """What `build` does. `sits` holds `lcssl.data.sits.SitsOptions` keyword arguments."""

    val_fraction: float = 0.15  # fraction of labelled zones
    test_fraction: float = 0.15
    seed: int = 0
    shard_size: int = 64  # examples per shard: ~130 MB at 512 px, enough shards for parallel reads
    workers: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    strict: bool = False
    unlabelled_includes_train: bool = False
    # Unlabelled patches of val/test zones are kept out of pre-training by default: pre-training on
    # the imagery of the evaluation zones would leak them (transductively) into the encoder.
    unlabelled_from_eval_zones: bool = False
    sits_size: Optional[int] = None  # Sentinel-2 crop px; None: the layout's (FLAIR #2, Hameln: 40)
    expect_size: Optional[int] = None  # aerial height = width; None: the reader's default (FLAIR #2: 512)
    cloud_prob_threshold: Optional[float] = None  # see lcssl.data.sits.cloud_probability
    sits: dict = dataclasses.field(default_factory=dict)
    tfds_metadata: bool = True  # write dataset_info.json + features.json for tfds.builder_from_directory
    progress: bool = True


def _atomic_json(path: pathlib.Path, obj) -> None:
    write_json(path, obj, sort_keys=False)


def _reader(layout: str):
    return layouts.get(layout)


def _sits_options(options: BuildOptions):
    from lcssl.data.sits import SitsOptions

    return SitsOptions(**options.sits)


def _patch_file(patch: RawPatch) -> str:
    src = patch.source or {}
    return str(src.get("aerial") or next(iter(src.values()), patch.patch_id))


def _sits_file(patch: RawPatch) -> str:
    src = patch.source or {}
    return str(src.get("sits") or _patch_file(patch))


# --- per-patch work (runs in the worker processes) ---------------------------------------------


@dataclasses.dataclass
class _Prepared:
    patch: RawPatch
    sits: np.ndarray  # [max_dates, h, w, Cs] uint16
    dates: np.ndarray  # [max_dates] int32
    valid: np.ndarray  # [max_dates] bool


def _prepare(layout: str, ref, options: BuildOptions, num_classes: int) -> _Prepared:
    """Read and validate one patch; raises BadPatch."""
    from lcssl.data import sits as sits_lib
    from lcssl.data.schema import IGNORE_LABEL

    reader = _reader(layout)
    sits_size = reader.sits_size if options.sits_size is None else options.sits_size
    patch = reader.read_patch(ref, sits_size=sits_size, expect_size=options.expect_size,
                              cloud_prob_threshold=options.cloud_prob_threshold)
    if patch.label is not None:
        bad = (patch.label >= num_classes) & (patch.label != IGNORE_LABEL)
        if bad.any():
            raise BadPatch(_patch_file(patch), "label_range",
                           f"label values {sorted(np.unique(patch.label[bad]).tolist())[:5]} outside "
                           f"0..{num_classes - 1} and {IGNORE_LABEL}")
    try:
        sits, dates, valid = sits_lib.preprocess_series(
            patch.sits, patch.sits_cloud, patch.sits_dates, _sits_options(options))
    except sits_lib.TooFewDates as e:
        raise BadPatch(_sits_file(patch), "too_few_dates", str(e)) from e
    except ValueError as e:  # the reader let through a series preprocess_series cannot use
        msg = str(e)
        reason = "nonfinite" if "finite" in msg else "dtype" if "uint16" in msg else "bad_dates"
        raise BadPatch(_sits_file(patch), reason, msg) from e
    return _Prepared(patch, sits, dates, valid)


def _moments(x: np.ndarray) -> list:
    """[count, mean[C], M2[C]] of x [N, C] in float64 (combined with Chan et al.'s parallel formula)."""
    x = x.astype(np.float64)
    mean = x.mean(0) if len(x) else np.zeros(x.shape[1])
    return [int(len(x)), mean, ((x - mean) ** 2).sum(0)]


def _combine(a, b):
    (na, ma, qa), (nb, mb, qb) = a, b
    n = na + nb
    if n == 0:
        return a
    d = mb - ma
    return [n, ma + d * nb / n, qa + qb + d * d * na * nb / n]


def _scan_one(args):
    """Facts about one patch, or its BadPatch as (path, reason, detail)."""
    index, layout, ref, options, num_classes = args
    from lcssl.data.schema import IGNORE_LABEL

    try:
        p = _prepare(layout, ref, options, num_classes)
    except BadPatch as e:
        return {"index": index, "bad": (e.path, e.reason, e.detail)}
    patch = p.patch
    info = {
        "index": index, "patch_id": patch.patch_id, "zone": str(patch.zone), "domain": str(patch.domain),
        "file": _patch_file(patch), "has_label": patch.label is not None,
        "split": ref.fixed_split,  # e.g. FLAIR #2's released test folders: 'test'
        "aerial_shape": tuple(patch.aerial.shape), "sits_shape": tuple(p.sits.shape[1:]),
        "gsd_m": abs(float(patch.aerial_transform[0])),
        "aerial_moments": _moments(patch.aerial.reshape(-1, patch.aerial.shape[-1])),
        "sits_moments": _moments(p.sits[p.valid].reshape(-1, p.sits.shape[-1])),
        "num_dates": int(p.valid.sum()),
    }
    if patch.label is not None:
        lab = patch.label[patch.label != IGNORE_LABEL]
        info["histogram"] = np.bincount(lab.ravel(), minlength=num_classes).astype(np.int64)
    return info


def _fsync_rename(tmp: pathlib.Path, path: pathlib.Path) -> None:
    """Flushes `tmp` to disk, renames it to `path` and syncs the directory entry (lcssl/files.py's
    rule for a file written by another writer, here TensorFlow's TFRecordWriter)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _shard_entry(path: pathlib.Path, num_examples: int) -> dict:
    from lcssl.data.records import file_sha256

    return {"examples": num_examples, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _write_shard(args):
    """Writes one shard (refs: [(ref, patch_id)]) to a temp name, fsyncs and renames it.

    An existing shard is kept if it matches `expected` (its shard-index entry: size and sha256),
    else rewritten. Returns (file name, index entry, status: 'written' | 'reused' | 'replaced: why').
    """
    layout, refs, drop_label, path, options, num_classes, card_shapes, expected = args
    path = pathlib.Path(path)
    status = "written"
    if path.exists():
        if expected is None:
            status = "replaced: not in the shard index (written by an interrupted run before it was recorded)"
        else:
            entry = _shard_entry(path, len(refs))
            if entry == expected:
                return path.name, entry, "reused"
            status = (f"replaced: {entry['bytes']} bytes, sha256 {entry['sha256'][:12]}..., the index records "
                      f"{expected['bytes']} bytes, sha256 {expected['sha256'][:12]}...")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    from lcssl.data import records

    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with tf.io.TFRecordWriter(str(tmp)) as writer:
            for (ref, patch_id), drop in zip(refs, drop_label):
                p = _prepare(layout, ref, options, num_classes)
                if p.patch.patch_id != patch_id:
                    raise BuildError(f"{_patch_file(p.patch)}: patch_id {p.patch.patch_id!r} differs from the "
                                     f"scan ({patch_id!r}); the source changed since the scan, rebuild afresh")
                writer.write(records.encode_example(
                    patch_id=p.patch.patch_id, zone=str(p.patch.zone), domain=str(p.patch.domain),
                    aerial=p.patch.aerial, label=None if drop else p.patch.label, sits=p.sits,
                    sits_valid=p.valid, dates=p.dates, shapes=card_shapes))
        entry = _shard_entry(tmp, len(refs))
        _fsync_rename(tmp, path)
    except tf.errors.OpError as e:  # TFRecordWriter: disk full / size limit is a bare OutOfRangeError
        tmp.unlink(missing_ok=True)
        raise OSError(None, f"cannot write this shard: TensorFlow's TFRecordWriter failed ({type(e).__name__}"
                            f"{': ' + e.message if e.message else ''}); is the disk full? Free space and re-run "
                            "the same command (it resumes)", str(path)) from None
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path.name, entry, status


# --- split and shard plan ----------------------------------------------------------------------


def split_zones(zones: list, *, val_fraction: float, test_fraction: float, seed: int) -> dict:
    """Labelled zones -> {'train','val','test': sorted zones}; deterministic in `seed`.

    Fractions are of zones (rounded); a split with a positive fraction gets at least one zone when
    there are enough zones to leave one for train.
    """
    zones = sorted(set(zones))
    n = len(zones)
    order = [zones[i] for i in np.random.default_rng(seed).permutation(n)]
    counts = {}
    for name, frac in (("test", test_fraction), ("val", val_fraction)):
        counts[name] = int(round(n * frac))
        if frac > 0 and counts[name] == 0:
            counts[name] = 1
    while counts["test"] + counts["val"] > max(n - 1, 0):  # keep a train zone
        big = "test" if counts["test"] >= counts["val"] else "val"
        counts[big] -= 1
    test = order[:counts["test"]]
    val = order[counts["test"]:counts["test"] + counts["val"]]
    train = order[counts["test"] + counts["val"]:]
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


def _shard_names(split: str, num_shards: int) -> list:
    return [f"{split}-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]


def _split_unit(info: dict) -> str:
    """What a split keeps together: a zone of a domain (schema.zone_key)."""
    return zone_key(info.get("domain"), info["zone"])


def _plan(infos: list, options: BuildOptions) -> tuple:
    """-> (split_zones, {split: [[(scan index, patch_id, drop_label), ...] per shard]}, held_out)."""
    # Zones whose split the layout fixes (FLAIR #2's released test folders) are not drawn; with a
    # fixed test set the draw makes no test zones of its own (--test-fraction is not used).
    fixed = {_split_unit(i): i["split"] for i in infos if i.get("split")}
    labelled = [i for i in infos if i["has_label"] and _split_unit(i) not in fixed]
    zones = split_zones([_split_unit(i) for i in labelled], val_fraction=options.val_fraction,
                        test_fraction=0.0 if "test" in fixed.values() else options.test_fraction,
                        seed=options.seed)
    for split in set(fixed.values()):
        zones[split] = sorted({*zones[split], *(_split_unit(i) for i in infos
                                                 if i["has_label"] and fixed.get(_split_unit(i)) == split)})
    zone_split = {**{z: s for s, zs in zones.items() for z in zs}, **fixed}
    members = {s: [] for s in SPLITS}
    held_out = 0
    for i in infos:
        if i["has_label"]:
            members[zone_split[_split_unit(i)]].append((i["index"], i["patch_id"], False))
            if options.unlabelled_includes_train and zone_split[_split_unit(i)] == "train":
                members["unlabelled"].append((i["index"], i["patch_id"], True))
        elif zone_split.get(_split_unit(i), "train") == "train" or options.unlabelled_from_eval_zones:
            members["unlabelled"].append((i["index"], i["patch_id"], False))
        else:  # unlabelled imagery of a val/test zone: kept out of pre-training (no spatial leakage)
            held_out += 1
    zone_of = {i["index"]: _split_unit(i) for i in infos}
    zones["unlabelled"] = sorted({zone_of[m[0]] for m in members["unlabelled"]})
    shards = {}
    for k, split in enumerate(SPLITS):
        items = sorted(members[split], key=lambda m: (m[1], m[0]))
        rng = np.random.default_rng([options.seed, k])
        items = [items[j] for j in rng.permutation(len(items))]  # mix zones within a shard
        num = math.ceil(len(items) / options.shard_size) if items else 0
        shards[split] = [items[j::num] for j in range(num)]  # round robin: sizes differ by <= 1
    return zones, shards, held_out


# --- the build -----------------------------------------------------------------------------------


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent_pid: int) -> None:
    """Runs first in every worker: the worker ends when the build process does, whatever ends it
    (kill -9 included), instead of writing shards for nobody. On Linux the kernel kills the worker
    when its parent dies (prctl PR_SET_PDEATHSIG); everywhere, a daemon thread also checks every
    second that the parent is still the build (a dead parent's children are handed to another)."""
    import signal
    import threading

    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux
        pass
    if os.getppid() != parent_pid:  # the build died before prctl took effect
        os._exit(1)

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-build", daemon=True).start()


def _main_can_be_spawned() -> bool:
    """A spawned worker re-runs the caller's main file: `python - <<EOF` has none it can read."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return main_file is None or os.path.isfile(main_file)


def _pool_map(fn, tasks, workers: int, ordered: bool = True):
    """fn over tasks in `workers` processes; a worker that dies raises BuildError (no hang)."""
    if workers > 1 and not _main_can_be_spawned():
        print("build: one process (the calling program is read from stdin, which worker processes "
              "cannot re-import); run it from a file or with -c for --workers", file=sys.stderr)
        workers = 1
    if workers <= 1 or len(tasks) <= 1:
        yield from map(fn, tasks)
        return
    # concurrent.futures, not multiprocessing.Pool: Pool silently replaces a dead worker and waits
    # forever for its task, the executor marks itself broken and fails every pending future.
    ctx = multiprocessing.get_context("spawn")  # TensorFlow is not fork-safe
    pool = concurrent.futures.ProcessPoolExecutor(min(workers, len(tasks)), mp_context=ctx,
                                                  initializer=_die_with_parent, initargs=(os.getpid(),))
    try:
        futures = [pool.submit(fn, t) for t in tasks]
        done = futures if ordered else concurrent.futures.as_completed(futures)
        for f in done:
            yield f.result()
    except concurrent.futures.process.BrokenProcessPool as e:
        raise BuildError(f"a build worker process died ({e}; killed, or out of memory?); re-run the same "
                         "command to resume, with fewer --workers if memory is short") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="patch", disable=not enabled, dynamic_ncols=True)


def _file_stamps(ref) -> list:
    """[[path, size, mtime_ns]] of the files a reader's ref names (its `*_path` fields); a missing
    file is [path, None, None]. Refs without paths (tests' in-memory readers) have none."""
    stamps = []
    if dataclasses.is_dataclass(ref):
        for field in dataclasses.fields(ref):
            value = getattr(ref, field.name)
            if field.name.endswith("_path") and isinstance(value, str):
                try:
                    st = os.stat(value)
                    stamps.append([value, st.st_size, st.st_mtime_ns])
                except OSError:
                    stamps.append([value, None, None])
    return stamps


def _info_to_json(info: dict) -> dict:
    out = dict(info)
    for k in ("aerial_moments", "sits_moments"):
        if k in out:
            n, mean, m2 = out[k]
            out[k] = [int(n), np.asarray(mean).tolist(), np.asarray(m2).tolist()]
    if "histogram" in out:
        out["histogram"] = np.asarray(out["histogram"]).tolist()
    for k in ("aerial_shape", "sits_shape", "bad"):
        if k in out:
            out[k] = list(out[k])
    return out


def _info_from_json(info: dict) -> dict:
    out = dict(info)
    for k in ("aerial_moments", "sits_moments"):
        if k in out:
            n, mean, m2 = out[k]
            out[k] = [int(n), np.asarray(mean, np.float64), np.asarray(m2, np.float64)]
    if "histogram" in out:
        out["histogram"] = np.asarray(out["histogram"], np.int64)
    for k in ("aerial_shape", "sits_shape", "bad"):
        if k in out:
            out[k] = tuple(out[k])
    return out


def _scan(src, layout, refs, options, num_classes, out: pathlib.Path) -> list:
    """Scan results per ref, from `out/.scan-cache.json` where a ref's files are unchanged."""
    key = hashlib.sha256(repr((str(pathlib.Path(src).resolve()), layout, options.sits, options.sits_size,
                               options.expect_size, options.cloud_prob_threshold,
                               num_classes)).encode()).hexdigest()[:16]
    for old in out.glob(".scan-*.pkl"):  # earlier versions' pickle caches are never loaded
        old.unlink()
    cache_path = out / SCAN_CACHE
    cached = {}
    if cache_path.exists():
        try:
            data = read_json(cache_path, "scan cache")
            if data.get("key") == key:
                cached = data["patches"]
        except (ValueError, KeyError, AttributeError):  # unreadable: scan again, it is only a cache
            cached = {}

    def check(info):
        if "bad" in info and options.strict:
            path, reason, detail = info["bad"]
            raise BuildError(f"strict: bad patch {path}: {reason}: {detail}")

    entries, results, tasks = {}, [None] * len(refs), []
    for i, ref in enumerate(refs):
        name, stamps = repr(ref), _file_stamps(ref)
        hit = cached.get(name)
        if hit is not None and hit["files"] == stamps:
            info = _info_from_json({**hit["info"], "index": i})
            check(info)
            results[i] = info
            entries[name] = hit
        else:
            tasks.append(((i, layout, ref, options, num_classes), name, stamps))
    with _progress(len(tasks), "scan", options.progress) as bar:
        try:
            for (args, name, stamps), info in zip(tasks, _pool_map(_scan_one, [t[0] for t in tasks],
                                                                   options.workers)):
                check(info)
                results[args[0]] = _info_from_json(_info_to_json(info))
                entries[name] = {"files": stamps, "info": _info_to_json(info)}
                bar.update(1)
        finally:  # what was scanned is kept even when a strict check or a dead worker stops the scan
            if tasks:
                write_json(cache_path, {"key": key, "patches": entries})
    return results


def _check_sizes(good: list, options: BuildOptions, bad: list) -> list:
    """Patches whose aerial / SITS shape or ground resolution differs from the first good patch
    become 'size' / 'resolution' bad patches (the card has one size and one gsd_m)."""
    if not good:
        return good
    ref_aerial, ref_sits, ref_gsd = good[0]["aerial_shape"], good[0]["sits_shape"], good[0]["gsd_m"]
    kept = []
    for i in good:
        reason = None
        if i["aerial_shape"] != ref_aerial or i["sits_shape"] != ref_sits:
            reason, detail = "size", (f"aerial {i['aerial_shape']} / sits {i['sits_shape']}, expected "
                                      f"{ref_aerial} / {ref_sits} (from {good[0]['file']})")
        elif not math.isclose(i["gsd_m"], ref_gsd, rel_tol=GSD_RTOL):
            reason, detail = "resolution", (f"{i['gsd_m']} m pixels, expected {ref_gsd} m as in the first patch "
                                            f"({good[0]['file']})")
        if reason is None:
            kept.append(i)
            continue
        if options.strict:
            raise BuildError(f"strict: bad patch {i['file']}: {reason}: {detail}")
        bad.append({"file": i["file"], "reason": reason, "detail": detail})
    return kept


def build(src, out, *, layout: str, options: Optional[BuildOptions] = None) -> dict:
    """Builds the dataset in `out` from the raw layout in `src`; returns the summary dict.

    The summary (written / skipped per reason, the bad patches with file and reason) is printed and
    written to `out/build_summary.json`. Raises BuildError in strict mode at the first bad patch.
    """
    options = options or BuildOptions()
    if options.sits_size is None:  # an unknown layout fails here, before anything is written
        options = dataclasses.replace(options, sits_size=_reader(layout).sits_size)
    t0 = time.time()
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(str(out), LOCK_NAME, flag="--out", what="build",
                      clash="Two builds into one --out delete each other's temporary files and overwrite each "
                            "other's shards").acquire()
    try:
        return _build(src, out, layout, options, t0)
    finally:
        lock.release()


def _build(src, out: pathlib.Path, layout: str, options: BuildOptions, t0: float) -> dict:
    for stale in out.glob(".*.tmp.*"):  # partial files of an interrupted run (the lock says it is over)
        stale.unlink()
    meta = _reader(layout).metadata(src)
    if meta.get("not_read"):
        print(f"build {layout}: {src} also holds {', '.join(meta['not_read'])}: not read (lcssl's model takes "
              "aerial + Sentinel-2)", flush=True)
    num_classes = len(meta["classes"])
    sits_opts = _sits_options(options)  # fails early on a bad SITS option

    refs = _reader(layout).list_patches(src)
    if not refs:
        raise BuildError(f"{src}: no patches found for layout {layout!r}")
    infos = _scan(src, layout, refs, options, num_classes, out)
    bad = [{"file": i["bad"][0], "reason": i["bad"][1], "detail": i["bad"][2],
            "patch": str(getattr(refs[i["index"]], "aerial_path", None) or getattr(refs[i["index"]], "patch_id", ""))}
           for i in infos if "bad" in i]
    good = _check_sizes([i for i in infos if "bad" not in i], options, bad)
    if not good:
        raise BuildError(f"{src}: none of the {len(refs)} patches is usable; first problems: {bad[:3]}")

    zones, shards, held_out = _plan(good, options)
    shard_files = {s: _shard_names(s, len(shards[s])) for s in SPLITS}
    plan = {
        "format_version": FORMAT_VERSION, "layout": layout,
        "options": _options_json(options),
        "splits": {s: {"zones": zones.get(s), "shards": {f: [m[1] for m in items] for f, items in
                                                         zip(shard_files[s], shards[s])}} for s in SPLITS},
    }
    plan_path = out / PLAN_NAME
    if plan_path.exists():
        old = read_json(plan_path, "build plan")
        # The format version is left out: a re-run upgrades an older build in place.
        if ({**old, "format_version": None} != {**json.loads(json.dumps(plan)), "format_version": None}):
            raise BuildError(f"{plan_path}: an earlier build with different inputs or options is in {out}; "
                             "use an empty output directory (or delete it) to rebuild")
    else:
        _atomic_json(plan_path, plan)

    # Write the shards.
    shapes = _record_shapes(good[0], meta, sits_opts)
    if shapes.aerial[2] != len(meta["aerial_bands"]):
        raise BuildError(f"{good[0]['file']}: {shapes.aerial[2]} aerial bands, layout {layout!r} expects "
                         f"{len(meta['aerial_bands'])} ({meta['aerial_bands']})")
    by_index = {i["index"]: i for i in good}
    index_path = out / SHARD_INDEX_NAME
    all_files = {f for s in SPLITS for f in shard_files[s]}
    index = read_json(index_path, "shard index") if index_path.exists() else {}
    index = {f: e for f, e in index.items() if f in all_files}
    tasks = []
    for s in SPLITS:
        for name, items in zip(shard_files[s], shards[s]):
            tasks.append((layout, [(refs[m[0]], m[1]) for m in items], [m[2] for m in items], str(out / name),
                          options, num_classes, shapes, index.get(name)))
    written = reused = 0
    replaced = []
    with _progress(sum(len(t[1]) for t in tasks), "write", options.progress) as bar:
        try:
            for name, entry, status in _pool_map(_write_shard, tasks, options.workers, ordered=False):
                if status != "reused":
                    index[name] = entry
                    write_json(index_path, index)  # each shard is recorded as soon as it is in place
                if status.startswith("replaced"):
                    replaced.append({"file": name, "why": status[len("replaced: "):]})
                written += status != "reused"
                reused += status == "reused"
                bar.update(entry["examples"])
        except BadPatch as e:
            raise BuildError(f"bad patch while writing (the source changed since the scan?): {e}") from e
        finally:
            for stale in out.glob(".*.tmp.*"):
                stale.unlink(missing_ok=True)

    # Statistics (train + unlabelled patches, each patch once) and the card.
    stat_ids = {m[0] for s in ("train", "unlabelled") for items in shards[s] for m in items}
    stat_infos = [by_index[i] for i in sorted(stat_ids)] or good
    aerial_m = functools.reduce(_combine, [i["aerial_moments"] for i in stat_infos])
    sits_m = functools.reduce(_combine, [i["sits_moments"] for i in stat_infos])
    hist = np.zeros(num_classes, np.int64)
    for items in shards["train"]:
        for m in items:
            hist += by_index[m[0]]["histogram"]
    card = {
        "format_version": FORMAT_VERSION,
        "layout": layout,
        "splits": {s: {"num_examples": sum(len(x) for x in shards[s]), "files": shard_files[s],
                       "shard_examples": [len(x) for x in shards[s]],
                       "shard_bytes": [index[f]["bytes"] for f in shard_files[s]],
                       "shard_sha256": [index[f]["sha256"] for f in shard_files[s]], "zones": zones.get(s)}
                   for s in SPLITS},
        "classes": meta["classes"],
        "ignore_label": 255,
        **({"official_miou": meta["official_miou"]} if "official_miou" in meta else {}),
        **({"modalities_not_read": meta["not_read"]} if meta.get("not_read") else {}),
        "aerial": {"bands": meta["aerial_bands"], "size": shapes.aerial[0], "gsd_m": good[0]["gsd_m"],
                   "mean": _mean(aerial_m), "std": _std(aerial_m)},
        "sits": {"bands": _sits_bands(), "size": shapes.sits[1], "gsd_m": meta["sits_gsd_m"],
                 "max_dates": shapes.sits[0], "date_encoding": str(sits_opts.date_encoding),
                 "mean": _mean(sits_m), "std": _std(sits_m)},
        "stats_from": ["train", "unlabelled"],
        "class_histogram": hist.tolist(),
        "class_weights": class_weights(hist),
        "class_weights_formula": CLASS_WEIGHTS_FORMULA,
        "build_options": _options_json(options),
    }
    card = seal_card(json.loads(to_json(card)))  # sealed as it reads back (numbers as JSON has them)
    _atomic_json(out / CARD_NAME, card)
    if options.tfds_metadata:
        write_tfds_metadata(out, card)

    reasons = {r: sum(b["reason"] == r for b in bad) for r in REASONS}
    summary = {
        "src": str(src), "out": str(out), "layout": layout,
        "patches_found": len(refs),
        "written": {s: card["splits"][s]["num_examples"] for s in SPLITS},
        "skipped": {r: n for r, n in reasons.items() if n},
        "skipped_total": len(bad),
        **({"modalities_not_read": meta["not_read"]} if meta.get("not_read") else {}),
        "held_out_unlabelled": held_out,
        "bad_patches": bad,
        "shards": {"written": written, "reused": reused, "replaced": replaced},
        "seconds": round(time.time() - t0, 2),
    }
    _atomic_json(out / SUMMARY_NAME, summary)
    print(format_summary(summary))
    return summary


def verify(data_dir) -> tuple[int, list]:
    """(number of shards, [(file, problem)]) of `data_dir` checked against its dataset card: the
    card's own checksum and its per-split totals, then every shard: present, complete records whose
    length and data CRCs hold, byte size and sha256 (reads every byte)."""
    from lcssl.data import pipeline

    card = pipeline.load_card(data_dir, check_shards=False, check_content=False)
    card_path = str(pathlib.Path(data_dir) / CARD_NAME)
    problems = []
    content = pipeline.card_checksum_problem(card)
    if content:
        problems.append((card_path, content))
    for s, info in card["splits"].items():
        total = sum(info["shard_examples"])
        if info["num_examples"] != total:
            problems.append((card_path, f"splits.{s}.num_examples is {info['num_examples']}, its "
                                        f"shard_examples add up to {total}: the card was edited"))
    problems += pipeline.check_shard_files(data_dir, card, check_sha256=True)
    return sum(len(info["files"]) for info in card["splits"].values()), problems


def _record_shapes(first: dict, meta: dict, sits_opts):
    from lcssl.data.records import RecordShapes

    h, w, ca = first["aerial_shape"]
    sh, sw, cs = first["sits_shape"]
    return RecordShapes(aerial=(h, w, ca), label=(h, w), sits=(int(sits_opts.max_dates), sh, sw, cs))


def _sits_bands() -> list:
    from lcssl.data.schema import S2_BANDS

    return list(S2_BANDS)


def _mean(m) -> list:
    return [float(v) for v in m[1]]


def _std(m) -> list:
    n = max(m[0], 1)
    return [float(v) for v in np.sqrt(m[2] / n)]


def class_weights(histogram) -> list:
    """See CLASS_WEIGHTS_FORMULA."""
    hist = np.asarray(histogram, np.float64)
    present = hist > 0
    w = np.zeros_like(hist)
    if present.any():
        w[present] = 1.0 / np.sqrt(hist[present] / hist.sum())
        w[present] /= w[present].mean()
    return [float(v) for v in w]


def _options_json(options: BuildOptions) -> dict:
    d = dataclasses.asdict(options)
    for k in ("workers", "progress", "strict", "tfds_metadata"):  # do not change the shards
        d.pop(k)
    return d


def format_summary(summary: dict) -> str:
    lines = [f"build {summary['layout']}: {summary['patches_found']} patches found in {summary['src']}"]
    lines.append("  written: " + ", ".join(f"{s} {n}" for s, n in summary["written"].items()))
    lines.append(f"  skipped: {summary['skipped_total']}" + "".join(
        f", {r} {n}" for r, n in summary["skipped"].items()))
    if summary["held_out_unlabelled"]:
        lines.append(f"  unlabelled patches of val/test zones kept out: {summary['held_out_unlabelled']}")
    # One line per problem: a zone's bad Sentinel-2 file skips each of its patches for one reason.
    groups = {}
    for b in summary["bad_patches"]:
        groups.setdefault((b["file"], b["reason"], b["detail"]), []).append(b.get("patch") or b["file"])
    for (file, reason, detail), patches in list(groups.items())[:20]:
        others = [p for p in patches if p != file]
        named = "" if not others else (f" (skips {len(patches)} patches: {', '.join(others[:5])}"
                                       f"{f', ... {len(others) - 5} more' if len(others) > 5 else ''})")
        lines.append(f"    {file}: {reason}: {detail}{named}")
    if len(groups) > 20:
        lines.append(f"    ... {len(groups) - 20} more problems in {SUMMARY_NAME}")
    lines.append(f"  shards: {summary['shards']['written']} written, {summary['shards']['reused']} reused; "
                 f"{summary['seconds']} s -> {summary['out']}")
    for r in summary["shards"]["replaced"][:20]:
        lines.append(f"    rewrote {r['file']}: {r['why']}")
    return "\n".join(lines)


def write_tfds_metadata(out: pathlib.Path, card: dict) -> None:
    """dataset_info.json + features.json so that `tfds.builder_from_directory(out)` reads the shards."""
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    import tensorflow_datasets as tfds

    from lcssl.data.records import record_shapes, tfds_features

    template = tfds.core.ShardedFileTemplate(data_dir=out, template="{SPLIT}-{SHARD_X_OF_Y}.{FILEFORMAT}",
                                             dataset_name=f"lcssl_{card['layout']}", filetype_suffix="tfrecord")
    split_infos = []
    for s, info in card["splits"].items():
        if not info["num_examples"]:
            continue
        split_infos.append(tfds.core.SplitInfo(
            name=s, shard_lengths=info["shard_examples"],
            num_bytes=sum((out / f).stat().st_size for f in info["files"]), filename_template=template))
    ds_info = tfds.core.DatasetInfo(
        builder=tfds.core.DatasetIdentity(name=f"lcssl_{card['layout']}", version="1.0.0",
                                          data_dir=str(out), module_name=""),
        features=tfds_features(record_shapes(card)),
        description=f"lcssl {card['layout']} patches; see {CARD_NAME} for statistics and build options.")
    ds_info.set_file_format("tfrecord")
    ds_info.set_splits(tfds.core.SplitDict(split_infos))
    ds_info.write_to_directory(out)
