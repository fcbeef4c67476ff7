"""Time one training step of the U-T&T model, no input pipeline.

`--step=model` (default): the model alone, forward + backward + SGD update, on float inputs.

    .venv/bin/python bench/train_step.py                       # supervised, batch 2, default model, fp32
    .venv/bin/python bench/train_step.py --task=simclr --batch=4  # two views + projector + NT-Xent
    .venv/bin/python bench/train_step.py --preset=tiny --steps=3 --json=/tmp/step.json

`--step=real`: the task's own pure step (lcssl.tasks.get(task).build, as train.run builds it:
normalize + on-device augmentations + model + loss + the config's optimizer), jitted by
train.jit_train_step (state created sharded by sharding.init_sharded, donated; the batch placed with
sharding.host_batch_to_global over a mesh of all devices), on raw inputs as the pipeline gives them
(aerial uint8, sits float32 reflectance, dates int32, sits_valid bool, label int32 with 255s).
`--batch` is then the GLOBAL batch (SSL: patches, 2 views each); it must divide by the device count.

    .venv/bin/python bench/train_step.py --step=real --task=simclr --ssl-impl=gradcache --chunks=2 \
        --batch=16 --preset=tiny
    .venv/bin/python bench/train_step.py --step=real --task=supervised --batch=8 --preset=tiny

Prints samples/s, the median step time after warm-up, XLA's peak-memory estimate and model FLOPs
(lcssl.flops: convolutions and matmuls counted from the jaxpr, loops x their trips, per device;
XLA's cost analysis beside it as xla_cost_analysis_flops, which on GPU leaves out the cuDNN
convolutions and everywhere counts a loop body once), resident memory, and MFU on a known GPU. Writes the figures as JSON. Inputs: aerial [B, 512, 512, 5],
sits [B, 12, 40, 40, 10] (FLAIR #2 sizes) unless --preset=tiny.

Dependencies: `--step=model` needs jax, flax, optax, ml_collections (clu only for the parameter
table; without it leaves are counted with numpy). `--step=real` imports lcssl.train, which needs
clu and ml_collections, and orbax; TensorFlow is not needed (lcssl.train imports clu's
TensorFlow-based writers only inside train.run). The GPU machine has jax/flax/optax/orbax but neither clu nor ml_collections: carry the two pure-Python wheels, whose
other requirements (absl-py, etils, flax, jax, numpy, packaging, PyYAML, typing-extensions, wrapt)
are there, e.g. `pip download --no-deps --only-binary=:all: -d .whl clu==0.0.12
ml_collections==1.1.0` (bench/device_check.sh has the whole recipe).
"""
import argparse
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

try:
    from clu import parameter_overview
except ImportError:  # the GPU machine has no clu unless its wheel is carried
    parameter_overview = None

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lcssl import files, models  # noqa: E402
from lcssl import flops as flops_lib  # noqa: E402
from lcssl.data.schema import IGNORE_LABEL  # noqa: E402



# The objectives --step=model has a hand-written loss for; --step=real runs every task.
MODEL_STEP_TASKS = ("supervised", "simclr")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--step", choices=("model", "real"), default="model",
                   help="model: model + loss + SGD on float inputs; real: lcssl.train's step")
    p.add_argument("--task", default="supervised",
                   help="--step=real: any task of lcssl.tasks (lcssl.tasks.NAMES); --step=model: "
                        f"{' or '.join(MODEL_STEP_TASKS)}")
    p.add_argument("--preset", choices=("default", "tiny"), default="default")
    p.add_argument("--batch", type=int, default=2, help="--step=real: the global batch")
    p.add_argument("--dates", type=int, default=12)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--remat", choices=("none", "blocks"), default="none")
    p.add_argument("--steps", type=int, default=5, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default="bench_train_step.json")
    p.add_argument("--model-field", action="append", default=[], metavar="NAME[=True|False]",
                   help="--step=model: turn on a faster form of lcssl.models.ops "
                        "(bench/roofline.py FAST_FORMS; repeatable)")
    real = p.add_argument_group("--step=real --task=simclr (default: the config's value)")
    real.add_argument("--ssl-impl", choices=("naive", "blockwise", "gradcache"), default=None,
                      help="config.simclr.loss_impl")
    real.add_argument("--chunks", type=int, default=None, help="config.simclr.num_chunks (gradcache)")
    real.add_argument("--block-size", type=int, default=None, help="config.simclr.block_size")
    real.add_argument("--temperature", type=float, default=None, help="config.simclr.temperature")
    args = p.parse_args()
    if args.step == "model" and args.task not in MODEL_STEP_TASKS:
        p.error(f"--step=model knows --task={'|'.join(MODEL_STEP_TASKS)}; use --step=real")
    import roofline
    try:
        args.model_fields = roofline.parse_model_fields(args.model_field)
    except ValueError as e:
        p.error(str(e))
    if args.step == "real" and args.model_fields:
        p.error("--model-field only applies to --step=model")
    if args.step == "model":
        given = [f for f in ("ssl_impl", "chunks", "block_size", "temperature")
                 if getattr(args, f) is not None]
        if given:
            p.error(f"--{given[0].replace('_', '-')} only applies to --step=real")
    return args


def count_parameters(tree) -> int:
    if parameter_overview is not None:
        return int(parameter_overview.count_parameters(tree))
    return models.count_params(tree)


def make_step(args, cfg):
    """Returns (init_fn, step_fn); the step takes (state, batch) and returns (state, loss)."""
    opt = optax.sgd(1e-3, momentum=0.9)
    if args.task == "supervised":
        model = models.build_model(cfg).clone(**args.model_fields)

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
        model = model.clone(backbone=model.backbone.clone(**args.model_fields))

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


def model_step_setup(args):
    """--step=model: (model cfg, state, batch, jitted step, loss_of(output), extra JSON fields)."""
    cfg = models.default_config() if args.preset == "default" else models.tiny_config()
    cfg.dtype, cfg.remat = args.dtype, args.remat
    init_fn, step_fn = make_step(args, cfg)
    state = jax.jit(init_fn)()
    batch = make_batch(args, cfg)
    jitted = jax.jit(step_fn, donate_argnums=0)
    return cfg, state, batch, jitted, lambda out: out, {}


def synthetic_card(model_cfg, num_dates: int) -> dict:
    """The dataset-card fields a task reads (DESIGN.md), for the model's shapes: FLAIR #2 sizes
    by default; aerial uint8 ~ 110 +- 50 DN, Sentinel-2 reflectance ~ 1000 +- 300; uniform weights."""
    k, ca, cs = model_cfg.num_classes, model_cfg.aerial_bands, model_cfg.sits_bands
    return {
        "classes": [f"class_{i}" for i in range(k)], "class_weights": [1.0] * k,
        "splits": {},  # no evaluation data: the task's eval hooks are not run here
        "aerial": {"bands": [f"a{i}" for i in range(ca)], "size": model_cfg.aerial_size,
                   "gsd_m": model_cfg.aerial_gsd_m, "mean": [110.0] * ca, "std": [50.0] * ca},
        "sits": {"bands": [f"s{i}" for i in range(cs)], "size": model_cfg.sits_size,
                 "gsd_m": model_cfg.sits_gsd_m, "max_dates": num_dates,
                 "mean": [1000.0] * cs, "std": [300.0] * cs},
    }


def make_raw_batch(args, model_cfg, with_label: bool) -> dict:
    """A host batch as lcssl.data.pipeline yields it (DESIGN.md, Host batch), numpy, [B, ...]; the
    task's batch_keys say which fields go to the devices, as in train.run."""
    rng = np.random.default_rng(0)
    b, t = args.batch, args.dates
    h, ca = model_cfg.aerial_size, model_cfg.aerial_bands
    s, cs = model_cfg.sits_size, model_cfg.sits_bands
    # Up to two padded dates per example, at the end, with date 0 and zero reflectance.
    n_valid = rng.integers(max(1, t - 2), t + 1, size=b)
    valid = np.arange(t)[None, :] < n_valid[:, None]
    dates = np.where(valid, np.sort(rng.integers(1, 366, size=(b, t)), axis=1), 0).astype(np.int32)
    sits = rng.normal(1000.0, 300.0, size=(b, t, s, s, cs)).astype(np.float32)
    sits *= valid[:, :, None, None, None]
    batch = {"aerial": rng.integers(0, 256, size=(b, h, h, ca), dtype=np.uint8), "sits": sits,
             "dates": dates, "sits_valid": valid}
    if with_label:
        label = rng.integers(0, model_cfg.num_classes, size=(b, h, h)).astype(np.int32)
        label[rng.random((b, h, h)) < 0.05] = IGNORE_LABEL  # nodata / unlabelled pixels
        batch["label"] = label
    return batch


def real_step_setup(args):
    """--step=real: the task's own step, built by lcssl.tasks and jitted as train.run jits it."""
    from lcssl import configs, sharding, tasks, train

    config = configs.base("flair2", args.task)
    if args.preset == "tiny":
        configs.tiny(config)
    config.batch_size = args.batch
    config.dtype = args.dtype
    config.model.remat = args.remat
    for field, value in (("loss_impl", args.ssl_impl), ("num_chunks", args.chunks),
                         ("block_size", args.block_size), ("temperature", args.temperature)):
        if value is not None:
            config.simclr[field] = value
    config.lock()

    mesh = sharding.make_mesh()
    sharding.check_batch_divisible(config.batch_size, mesh, "--batch (global batch)")

    card = synthetic_card(config.model, args.dates)
    # The schedule's length does not change the step's work: 10 steps of warm-up out of 1000.
    ctx = train.task_context(config, card, mesh, num_steps=1000, steps_per_epoch=10)
    task = tasks.get(args.task).build(ctx)
    state = sharding.init_sharded(task.init, mesh, jax.random.key(config.seed + 1, impl=train.RNG_IMPL))
    jitted = train.jit_train_step(task, state, mesh)
    host = make_raw_batch(args, ctx.model_cfg, with_label=True)
    batch = sharding.host_batch_to_global({k: v for k, v in host.items() if k in task.batch_keys},
                                          mesh)
    extra = {"devices": jax.device_count(), "mesh": dict(mesh.shape),
             "per_device_batch": args.batch // sharding.num_data_shards(mesh),
             "optimizer": config.optimizer.name, "flops_scope": "per device"}
    if args.task == "simclr":
        extra.update(ssl_impl=config.simclr.loss_impl, num_chunks=config.simclr.num_chunks,
                     block_size=config.simclr.block_size, temperature=config.simclr.temperature)
    return ctx.model_cfg, state, batch, jitted, lambda metrics: metrics.compute()["loss"], extra


def cost_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def print_parameters(args, params) -> int:
    subtrees = params.get("backbone", params)  # a pre-training model wraps the UTT as backbone
    source = "clu.parameter_overview" if parameter_overview is not None else "numpy leaf sizes"
    print(f"parameters per top-level subtree ({source}):")
    for name in sorted(subtrees):
        print(f"  {name:<18} {count_parameters(subtrees[name]):>12,}")
    return count_parameters(params)


def main():
    args = parse_args()
    setup = real_step_setup if args.step == "real" else model_step_setup
    cfg, state, batch, jitted, loss_of, extra = setup(args)
    n_params = print_parameters(args, state.params if args.step == "real" else state["params"])

    t0 = time.perf_counter()
    compiled = jitted.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    # Model FLOPs from the program (lcssl.flops: backend-independent, loops x trips), per device;
    # XLA's own figure beside it (on GPU it leaves out the cuDNN convolutions).
    count = flops_lib.count_flops(jitted, state, batch)
    flops = count.model / jax.device_count()  # useful work: recomputation left out
    extra["xla_cost_analysis_flops"] = cost_flops(compiled)
    extra["conv_flops_share"] = count.conv / count.total if count.total else None
    # GradCache's second encoder forward and remat's recomputation are work the hardware does, but
    # not model FLOPs: MFU leaves them out, the hardware figure has them.
    extra["hardware_flops_per_step"] = count.total / jax.device_count()
    mem = compiled.memory_analysis()
    peak_bytes = None
    if mem is not None:
        peak_bytes = (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                      + mem.output_size_in_bytes - mem.alias_size_in_bytes)

    times = []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        state, out = compiled(state, batch)
        jax.block_until_ready(out)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    loss = loss_of(out)

    device = jax.devices()[0]
    peak = flops_lib.peak_flops(device.device_kind, args.dtype)  # of the dtype run
    # The step's time as a multiple of its roofline bound on this chip (bench/roofline.py; None
    # where the chip has no preset). The bound covers the whole global program: per device here.
    import roofline
    bound = roofline.step_bound(jitted, state, batch, device_kind=device.device_kind,
                                dtype=args.dtype)
    if bound is not None:
        bound["bound_s"] /= jax.device_count()
        extra.update(roofline_chip=bound["chip"], roofline_bound_s=bound["bound_s"],
                     roofline_bytes=bound["bytes"] / jax.device_count(),
                     step_over_bound=step_s / bound["bound_s"])
    result = {
        "step": args.step, "task": args.task, "preset": args.preset, "batch": args.batch,
        "dates": args.dates,
        "dtype": args.dtype, "remat": args.remat, "params": n_params,
        "device": device.device_kind, "platform": device.platform, "host": platform.node(),
        "cpu_count": os.cpu_count(), "compile_s": compile_s, "step_s_median": step_s,
        "step_s_all": times, "samples_per_s": args.batch / step_s,
        "model_flops_per_step": flops, "achieved_flops_per_s": flops / step_s,
        "xla_peak_bytes": peak_bytes,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "mfu": flops / step_s / peak if peak else None, "peak_flops": peak,
        "loss": float(loss), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv), "model_fields": args.model_fields, **extra,
    }
    rows = [("params", f"{n_params / 1e6:.2f} M"), ("device", result["device"]),
            ("compile", f"{compile_s:.1f} s"), ("step (median)", f"{step_s * 1e3:.0f} ms"),
            ("samples/s", f"{result['samples_per_s']:.3f}"),
            ("model GFLOP/step", f"{flops / 1e9:.1f}"),
            ("achieved GFLOP/s", f"{flops / step_s / 1e9:.1f}"),
            ("XLA peak memory", f"{peak_bytes / 2**30:.2f} GiB" if peak_bytes else "n/a"),
            ("max RSS", f"{result['max_rss_bytes'] / 2**30:.2f} GiB"),
            ("hardware GFLOP/step", f"{extra['hardware_flops_per_step'] / 1e9:.1f}"),
            (f"MFU ({args.dtype} peak)", f"{result['mfu']:.1%} of {peak / 1e12:.0f} TFLOP/s"
                                         if peak else "n/a (no chip preset)"),
            ("step / roofline", f"{extra['step_over_bound']:.2f}x the {extra['roofline_chip']} "
                                f"bound ({extra['roofline_bound_s'] * 1e3:.1f} ms)"
                                if bound else "n/a (no chip preset)")]
    if args.step == "real":
        rows.insert(2, ("devices", f"{extra['devices']} (mesh {extra['mesh']}; figures per device)"))
        if args.task == "simclr":
            rows.insert(3, ("ssl loss", f"{extra['ssl_impl']} (chunks {extra['num_chunks']}, "
                                        f"block {extra['block_size']}, t {extra['temperature']})"))
    print(f"train step ({args.step}), task={args.task} preset={args.preset} batch={args.batch} "
          f"dtype={args.dtype}")
    for name, value in rows:
        print(f"  {name:<18} {value}")
    files.write_json(args.json, result)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    from lcssl import cli

    cli.user_errors(main)()
