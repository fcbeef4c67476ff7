"""Time one training step of the U-T&T model: forward + backward + SGD update, no input pipeline.

    .venv/bin/python bench/train_step.py                       # supervised, batch 2, default model, fp32
    .venv/bin/python bench/train_step.py --mode=ssl --batch=4  # SimCLR: two views + projector + NT-Xent
    .venv/bin/python bench/train_step.py --preset=tiny --steps=3 --json=/tmp/step.json

Prints samples/s, the median step time after warm-up, XLA's peak-memory estimate and model FLOPs
(compiled cost analysis), resident memory, and MFU on a known GPU. Writes the figures as JSON.
Inputs: aerial [B, 512, 512, 5], sits [B, 12, 40, 40, 10] (FLAIR #2 sizes) unless --preset=tiny.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import parameter_overview

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lcssl import models  # noqa: E402

# Dense bf16 peak FLOP/s (no sparsity), from the NVIDIA H100 / H200 datasheets (SXM).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("supervised", "ssl"), default="supervised")
    p.add_argument("--preset", choices=("default", "tiny"), default="default")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dates", type=int, default=12)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--remat", choices=("none", "blocks"), default="none")
    p.add_argument("--steps", type=int, default=5, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default="bench_train_step.json")
    return p.parse_args()


def make_step(args, cfg):
    """Returns (init_fn, step_fn); the step takes (state, batch) and returns (state, loss)."""
    opt = optax.sgd(1e-3, momentum=0.9)
    if args.mode == "supervised":
        model = models.build_model(cfg)

        def loss_fn(params, batch_stats, batch):
            out, updates = model.apply({"params": params, "batch_stats": batch_stats},
                                       batch["aerial"], batch["sits"], batch["dates"],
                                       batch["sits_valid"], train=True,
                                       rngs={"dropout": batch["rng"]}, mutable=["batch_stats"])
            # One-hot rather than integer-label cross-entropy: the latter's gradient is a scatter-add
            # that XLA CPU spends seconds constant-folding at 512x512.
            onehot = jax.nn.one_hot(batch["label"], cfg.num_classes)
            loss = optax.softmax_cross_entropy(out["logits"], onehot).mean()
            loss += optax.softmax_cross_entropy(out["aux_logits"], onehot).mean()
            return loss, updates["batch_stats"]
    else:
        from lcssl.losses import nt_xent
        model = models.build_ssl_model(cfg)

        def loss_fn(params, batch_stats, batch):
            # Two views in one forward pass (batch norm sees both, as in SimCLR); flips stand in for
            # the augmentations, which are lcssl.data.augment's business, not this benchmark's.
            aerial = jnp.concatenate([batch["aerial"], batch["aerial"][:, ::-1]])
            sits = jnp.concatenate([batch["sits"], batch["sits"][:, :, :, ::-1]])
            dates = jnp.concatenate([batch["dates"]] * 2)
            valid = jnp.concatenate([batch["sits_valid"]] * 2)
            out, updates = model.apply({"params": params, "batch_stats": batch_stats}, aerial, sits,
                                       dates, valid, train=True, rngs={"dropout": batch["rng"]},
                                       mutable=["batch_stats"])
            z1, z2 = jnp.split(out["projection"], 2)
            return nt_xent(z1, z2, 0.1), updates["batch_stats"]

    def init_fn():
        # rbg key: a jitted init drawing ~150 tensors from partitionable threefry compiles slowly.
        variables = model.init(jax.random.key(0, impl="rbg"), *models.dummy_inputs(cfg), train=False)
        return {"params": variables["params"], "batch_stats": variables["batch_stats"],
                "opt": opt.init(variables["params"])}

    def step_fn(state, batch):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], state["batch_stats"], batch)
        updates, opt_state = opt.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates),
                "batch_stats": batch_stats, "opt": opt_state}, loss

    return init_fn, step_fn


def make_batch(args, cfg):
    rng = np.random.default_rng(0)
    b, t = args.batch, args.dates
    return {
        "aerial": jnp.asarray(rng.normal(size=(b, cfg.aerial_size, cfg.aerial_size,
                                               cfg.aerial_bands)), jnp.float32),
        "sits": jnp.asarray(rng.normal(size=(b, t, cfg.sits_size, cfg.sits_size, cfg.sits_bands)),
                            jnp.float32),
        "dates": jnp.asarray(np.sort(rng.integers(1, 366, size=(b, t)), axis=1), jnp.int32),
        "sits_valid": jnp.ones((b, t), bool),
        "label": jnp.asarray(rng.integers(0, cfg.num_classes, size=(b, cfg.aerial_size,
                                                                    cfg.aerial_size)), jnp.int32),
        "rng": jax.random.key(1),
    }


def main():
    args = parse_args()
    cfg = models.default_config() if args.preset == "default" else models.tiny_config()
    cfg.dtype, cfg.remat = args.dtype, args.remat
    init_fn, step_fn = make_step(args, cfg)
    state = jax.jit(init_fn)()
    n_params = int(parameter_overview.count_parameters(state["params"]))
    subtrees = state["params"]["backbone"] if args.mode == "ssl" else state["params"]
    print("parameters per top-level subtree (clu.parameter_overview):")
    for name in sorted(subtrees):
        print(f"  {name:<18} {parameter_overview.count_parameters(subtrees[name]):>12,}")
    batch = make_batch(args, cfg)

    t0 = time.perf_counter()
    compiled = jax.jit(step_fn, donate_argnums=0).lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    mem = compiled.memory_analysis()
    peak_bytes = None
    if mem is not None:
        peak_bytes = (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                      + mem.output_size_in_bytes - mem.alias_size_in_bytes)

    times = []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        state, loss = compiled(state, batch)
        loss.block_until_ready()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)

    device = jax.devices()[0]
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in device.device_kind), None)
    result = {
        "mode": args.mode, "preset": args.preset, "batch": args.batch, "dates": args.dates,
        "dtype": args.dtype, "remat": args.remat, "params": n_params,
        "device": device.device_kind, "platform": device.platform, "host": platform.node(),
        "cpu_count": os.cpu_count(), "compile_s": compile_s, "step_s_median": step_s,
        "step_s_all": times, "samples_per_s": args.batch / step_s,
        "model_flops_per_step": flops, "achieved_flops_per_s": flops / step_s,
        "xla_peak_bytes": peak_bytes,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "mfu_vs_bf16_peak": flops / step_s / peak if peak else None,
        "loss": float(loss), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
    }
    rows = [("params", f"{n_params / 1e6:.2f} M"), ("device", result["device"]),
            ("compile", f"{compile_s:.1f} s"), ("step (median)", f"{step_s * 1e3:.0f} ms"),
            ("samples/s", f"{result['samples_per_s']:.3f}"),
            ("model GFLOP/step", f"{flops / 1e9:.1f}"),
            ("achieved GFLOP/s", f"{flops / step_s / 1e9:.1f}"),
            ("XLA peak memory", f"{peak_bytes / 2**30:.2f} GiB" if peak_bytes else "n/a"),
            ("max RSS", f"{result['max_rss_bytes'] / 2**30:.2f} GiB"),
            ("MFU (bf16 peak)", f"{result['mfu_vs_bf16_peak']:.1%}" if peak else "n/a (no GPU)")]
    print(f"train step, mode={args.mode} preset={args.preset} batch={args.batch} dtype={args.dtype}")
    for name, value in rows:
        print(f"  {name:<18} {value}")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
