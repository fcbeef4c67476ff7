"""Convolution rates per layer of the configured U-T&T: forward, input-gradient and weight-gradient
passes of each distinct convolution of the model, each jitted alone, in TFLOP/s with GB/s beside.

    python bench/conv_layers.py                                          # CPU: batch 2, fp32
    python3 bench/conv_layers.py --batch 32 --dtype bfloat16 --repeats 20 --json /tmp/conv.json
    python bench/conv_layers.py --preset tiny --batch 2 --repeats 1      # quick check

The layer list is read off the model's forward jaxpr (every conv_general_dilated with its shapes,
strides, padding and Flax module path), not written by hand; convolutions of the same shape are
timed once and their count shown. A layer's three passes do the same FLOPs (2 x multiply-adds of
the forward; the input gradient of a strided convolution without its inserted zeros); bytes are
each pass's operands + result. The U-TAE's convolutions run on batch x dates images. No TensorFlow.
"""
import argparse
import collections
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lcssl import models  # noqa: E402
from lcssl.flops import count_flops  # noqa: E402


def model_convs(cfg, batch: int, dates: int) -> list[dict]:
    """Distinct forward convolutions of the model: shapes, conv params, module paths, count."""
    model = models.build_model(cfg)
    variables = models.param_shapes(model, cfg)
    s = jax.ShapeDtypeStruct
    inputs = (s((batch, cfg.aerial_size, cfg.aerial_size, cfg.aerial_bands), jnp.float32),
              s((batch, dates, cfg.sits_size, cfg.sits_size, cfg.sits_bands), jnp.float32),
              s((batch, dates), jnp.int32), s((batch, dates), jnp.bool_))
    jaxpr = jax.make_jaxpr(lambda v, *a: model.apply(v, *a, train=False))(variables, *inputs)
    found = collections.OrderedDict()

    def walk(j, stack):
        for eqn in j.eqns:
            inner = str(eqn.source_info.name_stack)
            full = f"{stack}/{inner}" if stack and inner else (stack or inner)
            if eqn.primitive.name == "conv_general_dilated":
                p = eqn.params
                key = (eqn.invars[0].aval.shape, eqn.invars[1].aval.shape, p["window_strides"],
                       tuple(map(tuple, p["padding"])), p["lhs_dilation"], p["rhs_dilation"],
                       p["feature_group_count"], p["dimension_numbers"])
                parts = [x for x in full.split("/") if x and "(" not in x and "." not in x]
                layer = "/".join(parts[1:] if parts[:1] == ["UTT"] else parts)  # the top module
                entry = found.setdefault(key, {"key": key, "layers": [], "params": p,
                                               "out": eqn.outvars[0].aval.shape})
                entry["layers"].append(layer)
            for name in ("jaxpr", "call_jaxpr"):
                sub = eqn.params.get(name)
                if sub is not None:
                    walk(sub.jaxpr if hasattr(sub, "jaxpr") else sub, full)

    walk(jaxpr.jaxpr, "")
    return list(found.values())


def best_time(fn, *args, repeats: int) -> float:
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def nbytes(*arrays) -> float:
    return float(sum(a.size * a.dtype.itemsize for a in arrays))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=("default", "tiny"), default="default")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dates", type=int, default=12)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args()
    cfg = models.default_config() if args.preset == "default" else models.tiny_config()
    dtype = jnp.dtype(args.dtype)
    rng = np.random.default_rng(0)
    convs = model_convs(cfg, args.batch, args.dates)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; {args.preset} U-T&T, batch "
          f"{args.batch}, {args.dates} dates, {args.dtype}; best of {args.repeats}; "
          f"{len(convs)} distinct convolutions")
    print(f"{'layer (x count)':<44} {'in -> out':<26} {'GFLOP':>7} {'fwd TF/s GB/s':>14} "
          f"{'dgrad TF/s GB/s':>16} {'wgrad TF/s GB/s':>16}")
    rows = []
    for c in convs:
        prm = c["params"]
        conv = lambda x, w, prm=prm: jax.lax.conv_general_dilated(
            x, w, prm["window_strides"], prm["padding"], prm["lhs_dilation"], prm["rhs_dilation"],
            prm["dimension_numbers"], prm["feature_group_count"])
        x = jnp.asarray(rng.random(c["key"][0]), dtype)
        w = jnp.asarray(rng.random(c["key"][1]), dtype)
        g = jnp.asarray(rng.random(c["out"]), dtype)
        flop = count_flops(conv, x, w).conv
        passes = {
            "fwd": (lambda x, w, g: conv(x, w), nbytes(x, w, g)),
            "dgrad": (lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0], nbytes(g, w, x)),
            "wgrad": (lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0], nbytes(x, g, w)),
        }
        row = {"layers": c["layers"], "count": len(c["layers"]), "input": list(c["key"][0]),
               "kernel": list(c["key"][1]), "output": list(c["out"]),
               "strides": list(prm["window_strides"]), "gflop": flop / 1e9}
        for name, (fn, b) in passes.items():
            t = best_time(fn, x, w, g, repeats=args.repeats)
            row[name] = {"s": t, "tflops_per_s": flop / t / 1e12, "gb_per_s": b / t / 1e9}
        rows.append(row)
        shape = f"{'x'.join(map(str, c['key'][0][1:]))}->{c['out'][-1]} k{c['key'][1][0]}" \
                f"/{prm['window_strides'][0]}"
        label = f"{c['layers'][0][-38:]} x{len(c['layers'])}"
        print(f"{label:<44} {shape:<26} {flop / 1e9:>7.2f} "
              + " ".join(f"{row[n]['tflops_per_s']:>7.2f} {row[n]['gb_per_s']:>7.0f}"
                         for n in ("fwd", "dgrad", "wgrad")), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "batch": args.batch,
                       "dtype": args.dtype, "preset": args.preset, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
