"""NT-Xent loss + gradient: time and peak memory vs batch size, naive vs blockwise vs GradCache.

    .venv/bin/python bench/ntxent.py --sizes 256,512,1024,2048,4096,8192 --repeats 10 \
        --out ntxent.json

N is the number of positive pairs (2N embeddings of dimension D). Methods:
  naive              lcssl.losses.nt_xent on given embeddings ([2N, 2N] similarity matrix)
  blockwise          lcssl.losses.nt_xent_blockwise (tiles of --block-size)
  encoder_full       MLP encoder + blockwise loss, one jax.value_and_grad over the whole batch
  encoder_gradcache  the same through lcssl.gradcache.grad_cached_value_and_grad (--chunks chunks)
The two encoder rows share the loss, so their memory difference is the encoder's activations.

Peak memory is XLA's own accounting of the compiled step (argument + output + temporaries - aliased;
`Compiled.memory_analysis()`), the same on CPU and GPU; it needs no run. Time is the median wall time
of the compiled step after warm-up. Steps whose peak exceeds --max-run-mib are compiled, not run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lcssl import gradcache, losses  # noqa: E402

MIB = 2**20
METHODS = ("naive", "blockwise", "encoder_full", "encoder_gradcache")


def init_mlp(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (a, b), jnp.float32) / np.sqrt(a), "b": jnp.zeros((b,), jnp.float32)}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:])
    ]


def mlp(params, x):
    for layer in params[:-1]:
        x = jax.nn.gelu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def build(method, n_pairs, args):
    """(function, arguments) for one loss + gradient step."""
    key = jax.random.key(0)
    t, bs = args.temperature, args.block_size
    if method in ("naive", "blockwise"):
        z = jax.random.normal(key, (2, n_pairs, args.dim), jnp.float32)
        if method == "naive":
            loss = lambda z1, z2: losses.nt_xent(z1, z2, t)  # noqa: E731
        else:
            loss = lambda z1, z2: losses.nt_xent_blockwise(z1, z2, t, bs)  # noqa: E731
        return jax.value_and_grad(loss, argnums=(0, 1)), (z[0], z[1])

    sizes = [args.input_dim] + [args.hidden] * args.layers + [args.dim]
    params = init_mlp(key, sizes)
    x = jax.random.normal(jax.random.key(1), (2 * n_pairs, args.input_dim), jnp.float32)

    def loss_fn(z):
        return losses.nt_xent_blockwise(z[:n_pairs], z[n_pairs:], t, bs), {}

    if method == "encoder_full":
        def step(p, inputs):
            return jax.value_and_grad(lambda q: loss_fn(mlp(q, inputs))[0])(p)
    else:
        def step(p, inputs):
            embed = lambda q, chunk: (mlp(q, chunk), {})  # noqa: E731
            return gradcache.grad_cached_value_and_grad(embed, p, inputs, loss_fn, args.chunks)
    return step, (params, x)


def measure(method, n_pairs, args):
    fn, fn_args = build(method, n_pairs, args)
    compiled = jax.jit(fn).lower(*fn_args).compile()
    mem = compiled.memory_analysis()
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes)
    row = {
        "method": method, "n_pairs": n_pairs, "dim": args.dim,
        "block_size": args.block_size if method != "naive" else None,
        "chunks": args.chunks if method == "encoder_gradcache" else None,
        "peak_mib": peak / MIB, "temp_mib": mem.temp_size_in_bytes / MIB,
        "argument_mib": mem.argument_size_in_bytes / MIB, "median_ms": None, "repeats": 0,
    }
    if args.memory_only or peak > args.max_run_mib * MIB:
        return row
    for _ in range(args.warmup):
        jax.block_until_ready(compiled(*fn_args))
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*fn_args))
        times.append(time.perf_counter() - start)
    row.update(median_ms=1e3 * statistics.median(times), repeats=args.repeats)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="256,512,1024,2048,4096,8192", help="N (pairs), comma-separated")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--dim", type=int, default=128, help="embedding dimension D")
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=8, help="GradCache chunks")
    parser.add_argument("--input-dim", type=int, default=256, help="encoder input features")
    parser.add_argument("--hidden", type=int, default=1024, help="encoder hidden width")
    parser.add_argument("--layers", type=int, default=4, help="encoder hidden layers")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--max-run-mib", type=float, default=4096, help="compile-only above this peak")
    parser.add_argument("--memory-only", action="store_true", help="compile and report memory; no runs")
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args()

    sizes = [int(s) for s in args.sizes.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")

    device = jax.devices()[0]
    print(f"# {device.platform} {device.device_kind} x{jax.device_count()}, jax {jax.__version__}")
    print(f"{'method':<18} {'N':>6} {'peak MiB':>10} {'temp MiB':>10} {'median ms':>10}")
    rows = []
    for n_pairs in sizes:
        for method in methods:
            row = measure(method, n_pairs, args)
            rows.append(row)
            ms = "-" if row["median_ms"] is None else f"{row['median_ms']:.2f}"
            print(f"{method:<18} {n_pairs:>6} {row['peak_mib']:>10.1f} {row['temp_mib']:>10.1f} {ms:>10}",
                  flush=True)

    target = [r for r in rows if r["method"] == "blockwise" and r["n_pairs"] == 4096]
    if target:
        ok = target[0]["peak_mib"] <= 128
        print(f"# target blockwise N=4096 peak <= 128 MiB: {'met' if ok else 'MISSED'} "
              f"({target[0]['peak_mib']:.1f} MiB)")
    if args.out:
        record = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "machine": {"host": platform.node(), "platform": device.platform,
                        "device_kind": device.device_kind, "device_count": jax.device_count(),
                        "cpu_count": os.cpu_count(), "jax": jax.__version__},
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "rows": rows,
        }
        pathlib.Path(args.out).write_text(json.dumps(record, indent=2))
        print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
