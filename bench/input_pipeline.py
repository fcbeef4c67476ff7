"""Input pipeline throughput: decoded train examples per second on this machine.

Builds (or reuses) a synthetic FLAIR #2-layout dataset at the given aerial patch size, then times the
train iterator (`lcssl.data.pipeline.make_train_iterator`) of each reader, tf.data and the native
one (lcssl/data/native.py), on the same shards: warm-up batches excluded. Prints a table and writes
JSON.

    .venv/bin/python bench/input_pipeline.py                         # 512 px, realistic
    .venv/bin/python bench/input_pipeline.py --patch-size=64 --steps=20 --json=/tmp/bench_input.json
    .venv/bin/python bench/input_pipeline.py --data-dir=DIR --readers=native --global-batch-size=128
                                                  # a built dataset, e.g. the study's benchmark
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def dataset(workdir: pathlib.Path, args) -> pathlib.Path:
    """The built dataset for these arguments, made once and reused."""
    from data_prep import build, synth

    name = f"flair2_p{args.patch_size}_z{args.num_zones}_n{args.patches_per_zone}_t{args.num_dates}"
    raw, out = workdir / f"{name}_raw", workdir / f"{name}_tfr"
    if not (out / build.CARD_NAME).exists():
        if not (raw / "done").exists():
            synth.write_dataset(raw, layout="flair2", num_zones=args.num_zones, patches_per_zone=args.patches_per_zone,
                                patch_size=args.patch_size, num_dates=args.num_dates, seed=0)
            (raw / "done").write_text("")
        build.build(raw, out, layout="flair2", options=build.BuildOptions(
            expect_size=args.patch_size, shard_size=args.shard_size, workers=args.workers, tfds_metadata=False,
            val_fraction=0.0, test_fraction=0.0, unlabelled_includes_train=False,
            sits={"max_dates": args.max_dates, "min_clear_dates": 1}))
    return out


def time_reader(data_dir, reader: str, args) -> dict:
    """Throughput of one reader: `args.steps` batches after `args.warmup` untimed ones (index
    building, compilation of the tf.data graph, the first file reads)."""
    from lcssl.data import pipeline

    t0 = time.perf_counter()
    it = pipeline.make_train_iterator(data_dir, "train", global_batch_size=args.global_batch_size, seed=0,
                                      shuffle_buffer=args.shuffle_buffer, process_index=0, process_count=1,
                                      reader=reader)
    for _ in range(args.warmup):
        batch = next(it)
    t1 = time.perf_counter()
    for _ in range(args.steps):
        batch = next(it)
    t2 = time.perf_counter()
    if hasattr(it, "close"):  # the native reader's threads stop; the next reader is timed alone
        it.close()
    del it
    batch_mb = sum(v.nbytes for v in batch.values()) / 2**20
    return {"warmup_s": round(t1 - t0, 3), "timed_s": round(t2 - t1, 3),
            "examples_per_s": round(args.steps * args.global_batch_size / (t2 - t1), 2),
            "batches_per_s": round(args.steps / (t2 - t1), 3), "host_batch_mib": round(batch_mb, 2),
            "host_mib_per_s": round(batch_mb * args.steps / (t2 - t1), 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="time this built dataset instead of a synthetic "
                                                    "one (the flags of the synthetic one are then unused)")
    p.add_argument("--patch-size", type=int, default=512, help="aerial px (FLAIR #2: 512)")
    p.add_argument("--num-zones", type=int, default=4)
    p.add_argument("--patches-per-zone", type=int, default=16)
    p.add_argument("--num-dates", type=int, default=24, help="raw Sentinel-2 dates per series")
    p.add_argument("--max-dates", type=int, default=12, help="series length T in the records")
    p.add_argument("--shard-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="build worker processes")
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--shuffle-buffer", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3, help="batches not timed")
    p.add_argument("--steps", type=int, default=20, help="batches timed")
    p.add_argument("--readers", default="tfdata,native", help="comma-separated: tfdata, native")
    p.add_argument("--workdir", default="/tmp/lcssl_bench_input")
    p.add_argument("--json", default=None, help="result file (default: <workdir>/input_pipeline.json)")
    args = p.parse_args(argv)

    from lcssl.data import pipeline

    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = pathlib.Path(args.data_dir) if args.data_dir else dataset(workdir, args)
    card = pipeline.load_card(data_dir)

    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
                   f"{len(os.sched_getaffinity(0))} usable",
        "command": " ".join([sys.executable, *sys.argv]),
        "data_dir": str(data_dir), "patch_size": card["aerial"]["size"], "max_dates": card["sits"]["max_dates"],
        "sits_size": card["sits"]["size"],
        "train_examples": card["splits"]["train"]["num_examples"], "global_batch_size": args.global_batch_size,
        "timed_batches": args.steps, "readers": {},
    }
    for reader in args.readers.split(","):
        result["readers"][reader] = time_reader(data_dir, reader, args)
    rows = [("patch px", result["patch_size"]), ("T x sits px", f"{result['max_dates']} x {result['sits_size']}"),
            ("batch", result["global_batch_size"]), ("timed batches", result["timed_batches"])]
    width = 22
    print(f"input pipeline, {result['machine']}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    names = list(result["readers"])
    print(f"  {'reader':<{width}}  " + "  ".join(f"{n:>10}" for n in names))
    for key, label in (("warmup_s", "warm-up s (excluded)"), ("examples_per_s", "examples/s"),
                       ("batches_per_s", "batches/s"), ("host_batch_mib", "host batch MiB"),
                       ("host_mib_per_s", "MiB/s")):
        print(f"  {label:<{width}}  " + "  ".join(f"{result['readers'][n][key]:>10}" for n in names))
    out = pathlib.Path(args.json or workdir / "input_pipeline.json")
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
