"""Roofline bound of a training step, per layer: FLOPs and bytes moved for forward + backward, and
the time each kernel needs at least on a chip (peak FLOP/s or HBM bandwidth, whichever binds).

    python bench/roofline.py                                 # default U-T&T, batch 32, bf16, H100
    python bench/roofline.py --batch 128 --chip h200 --json /tmp/roofline.json
    python bench/roofline.py --preset tiny --batch 2 --peak-tflops 100 --bandwidth-tbs 1

The kernels are read off the step's jaxpr (the program itself, as lcssl.flops counts FLOPs), never
from a hand-written layer list, and grouped as XLA fuses them, roughly:
- each convolution and matmul is one kernel: it reads its operands and writes its output; its FLOPs
  are lcssl.flops' (2 x multiply-adds), so the totals agree with the MFU figures;
- elementwise ops and data movement (convert, broadcast, reshape, transpose, pad, slice, concat,
  select) fuse into their single consumer; a value with several consumers is written once and read
  by each, except broadcasts, iotas, and converts / reshapes / negations, which XLA recomputes
  inside each consumer: they cost the read of their operand; a reduction takes in its elementwise producers but ends its fusion, and
  reductions of the same input run as one multi-output kernel (batch norm's mean and mean-square);
- pooling windows, gathers and scatters are kernels of their own.
A fused kernel's bytes are its distinct inputs from outside + its outputs used outside. Its bound is
max(FLOPs / peak, bytes / bandwidth), elementwise FLOPs (1 per output element) counted against the
same peak, which is generous to them; the step's bound is the sum over kernels (no overlap between
kernels). Launch overheads, cache reuse between kernels and cuDNN's own layout copies are left out.

Layers are the Flax module paths of the name stack (`aerial_encoder/stage1_block0/conv1`); the
backward pass is the `transpose(...)` part of it. Categories: conv fwd / conv dgrad (input
gradient) / conv wgrad (weight gradient), matmul, reduction, elementwise, copy/transpose, pooling,
gather/scatter. Prints a per-category and per-layer table and writes all kernels as JSON. No
TensorFlow.
"""
import argparse
import collections
import dataclasses
import json
import math
import os
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lcssl import flops as flops_lib  # noqa: E402

# Dense bf16 peak (no sparsity) and HBM bandwidth of the chips lcssl.flops knows both of (one table,
# lcssl.flops.CHIPS, with the datasheets it comes from): e.g. H100 SXM 989 TFLOP/s and 3.35 TB/s,
# H100 PCIe 756 TFLOP/s and 2.0 TB/s, H200 SXM 989 TFLOP/s and 4.8 TB/s. TB = 1e12 bytes.
CHIPS = {c.name: (c.bfloat16_flops, c.hbm_bytes_per_s) for c in flops_lib.CHIPS
         if c.hbm_bytes_per_s}


def chip_peak(chip: str, dtype: str) -> float:
    """The peak FLOP/s of a CHIPS preset for convolutions / matmuls in dtype (float32: TF32)."""
    return flops_lib.peak_flops(next(c.match for c in flops_lib.CHIPS if c.name == chip), dtype)

MATMUL = {"conv_general_dilated", "dot_general"}
# Kernels of their own that fuse with nothing here (XLA emits them alone or as library calls).
STANDALONE = {"reduce_window_max", "reduce_window_min", "reduce_window_sum", "reduce_window",
              "select_and_scatter_add", "select_and_gather_add", "gather", "scatter",
              "scatter-add", "scatter_add", "sort", "cumsum", "cumprod", "cummax", "argsort",
              "top_k", "fft", "triangular_solve", "cholesky", "lu", "eigh", "svd", "qr"}
REDUCTIONS = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
              "argmax", "argmin", "reduce_precision_sum"}
# Recomputed inside each consumer: their output costs only the read of their operands.
RECOMPUTED = {"broadcast_in_dim", "iota"}
# Cheap one-operand ops that XLA duplicates into each of several consumers rather than write out
# (with one consumer they simply fuse into it).
DUPLICATED = {"convert_element_type", "reshape", "squeeze", "expand_dims", "neg", "copy", "copy_p"}
DATA_MOVEMENT = {"transpose", "pad", "slice", "concatenate", "rev", "reshape", "squeeze",
                 "expand_dims", "dynamic_slice", "dynamic_update_slice", "copy", "copy_p",
                 "convert_element_type", "split", "broadcast_in_dim", "iota", "tile"}
# Calls whose body is inlined (their eqns take the caller's name stack as a prefix).
INLINE = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
          "custom_vjp_call_jaxpr": "fun_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr",
          "remat2": "jaxpr", "custom_lin": None}
CATEGORIES = ("conv fwd", "conv dgrad", "conv wgrad", "matmul", "reduction", "elementwise",
              "copy/transpose", "pooling", "gather/scatter")


@dataclasses.dataclass
class Kernel:
    """One (fused) kernel of the step. flops: matrix FLOPs (lcssl.flops' count); other_flops: one
    per output element of the elementwise / reduction ops in it."""
    layer: str
    category: str
    backward: bool
    flops: float
    other_flops: float
    bytes: float
    ops: int = 1

    def bound_s(self, peak: float, bandwidth: float) -> float:
        return max((self.flops + self.other_flops) / peak, self.bytes / bandwidth)


def _nbytes(aval) -> float:
    try:
        itemsize = np.dtype(aval.dtype).itemsize
    except TypeError:  # extended dtypes (PRNG keys): their key data, two uint32
        itemsize = 8
    return float(math.prod(aval.shape)) * itemsize


def _layer(name_stack: str) -> tuple[str, bool]:
    """(module path, in the backward pass) of a name stack such as
    'transpose(jvp(UTT))/UTT.encode/aerial_encoder/stem_conv'."""
    parts = [p for p in name_stack.split("/") if p]
    backward = any(p.startswith("transpose(") for p in parts)
    # Transform wrappers 'jvp(UTT)' and method scopes 'UTT.encode' are not layers.
    path = [p for p in parts if "(" not in p and "." not in p]
    return "/".join(path) or "(top)", backward


@dataclasses.dataclass
class _Op:
    prim: str
    params: dict
    ins: list  # value ids (None for literals)
    outs: list
    stack: str
    scale: float


class _Program:
    """The step flattened to ops over value ids, calls inlined; loop bodies analysed apart."""

    def __init__(self):
        self.ops: list[_Op] = []
        self.sizes: dict[int, float] = {}
        self.avals: dict[int, object] = {}
        self.kernels: list[Kernel] = []  # from loop bodies, already scaled
        self._next = 0

    def new_value(self, aval) -> int:
        self._next += 1
        self.sizes[self._next] = _nbytes(aval)
        self.avals[self._next] = aval
        return self._next

    def add(self, jaxpr, env: dict, stack: str, scale: float):
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            inner = str(eqn.source_info.name_stack)
            full = f"{stack}/{inner}" if stack and inner else (stack or inner)
            ins = [env.get(v) if not hasattr(v, "val") else None for v in eqn.invars]
            if name in INLINE and INLINE[name] and INLINE[name] in eqn.params:
                sub = eqn.params[INLINE[name]]
                sub = sub.jaxpr if hasattr(sub, "jaxpr") else sub
                sub_env = {}
                for var in sub.constvars:
                    sub_env[var] = self.new_value(var.aval)
                for var, value in zip(sub.invars, ins):
                    if value is not None:
                        sub_env[var] = value
                self.add(sub, sub_env, full, scale)
                for var, outer in zip(sub.outvars, eqn.outvars):
                    if hasattr(var, "val") or var not in sub_env:  # a literal or a passed constant
                        env[outer] = self.new_value(outer.aval)
                    else:
                        env[outer] = sub_env[var]
                continue
            outs = [self.new_value(v.aval) for v in eqn.outvars]
            for var, value in zip(eqn.outvars, outs):
                env[var] = value
            bodies = list(flops_lib._sub_jaxprs(eqn.params))
            if bodies:
                # Loops and branches: analysed as programs of their own, x their trips (a scan's
                # length; a while loop's unknown count: once; a cond: its costliest branch).
                trips = eqn.params.get("length", 1) if name == "scan" else 1
                if name == "shard_map":  # the body is one device's share: x the devices (flops.py)
                    mesh = eqn.params["mesh"]
                    axes = (eqn.params.get("manual_axes") or eqn.params.get("axis_names")
                            or mesh.axis_names)
                    trips = math.prod(mesh.shape[a] for a in axes)
                best = None
                for body in bodies:
                    kernels = analyze_jaxpr(body, stack=full, scale=scale * trips)
                    if name != "cond":
                        self.kernels.extend(kernels)
                    elif best is None or sum(k.flops for k in kernels) > sum(k.flops for k in best):
                        best = kernels
                if best:
                    self.kernels.extend(best)
                continue
            self.ops.append(_Op(name, eqn.params, ins, outs, full, scale))


def _conv_category(op: _Op, backward: bool) -> str:
    if not backward:
        return "conv fwd"
    # The weight gradient is the convolution whose output is laid out as a kernel: jax's transpose
    # rule gives it the forward kernel's spec, (out features, in features, spatial...), where an
    # activation's spec starts with the batch dimension.
    dn = op.params["dimension_numbers"]
    return "conv wgrad" if tuple(dn.out_spec) != tuple(dn.lhs_spec) else "conv dgrad"


def _fake_eqn(op: _Op, program: _Program):
    """What lcssl.flops' counters read off an eqn: params and the operands' / results' avals."""
    var = lambda v: types.SimpleNamespace(aval=program.avals[v])
    return types.SimpleNamespace(params=op.params, invars=[var(v) for v in op.ins],
                                 outvars=[var(v) for v in op.outs])


def analyze_jaxpr(jaxpr, stack: str = "", scale: float = 1.0) -> list[Kernel]:
    """The kernels of an (open or closed) jaxpr, fused as the module docstring says."""
    jaxpr = jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") else jaxpr
    program = _Program()
    env = {v: program.new_value(v.aval) for v in list(jaxpr.constvars) + list(jaxpr.invars)}
    program.add(jaxpr, env, stack, scale)
    outputs = {env[v] for v in jaxpr.outvars if not hasattr(v, "val") and v in env}
    return _fuse(program, outputs) + program.kernels


def _fuse(program: _Program, outputs: set) -> list[Kernel]:
    ops = program.ops
    producer = {}
    consumers = collections.defaultdict(list)
    for i, op in enumerate(ops):
        for v in op.outs:
            producer[v] = i
        for v in op.ins:
            if v is not None:
                consumers[v].append(i)

    def kind(i):
        p = ops[i].prim
        if p in MATMUL:
            return "matmul"
        if p in STANDALONE:
            return "standalone"
        if p in REDUCTIONS:
            return "reduce"
        if p in RECOMPUTED or (p in DUPLICATED and any(
                len(set(consumers[v])) > 1 for v in ops[i].outs)):
            return "recomputed"
        return "fusible"

    kinds = [kind(i) for i in range(len(ops))]
    parent = list(range(len(ops)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a, b):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    # Producer -> single consumer fusion (elementwise into elementwise or into a reduction).
    for i, op in enumerate(ops):
        if kinds[i] not in ("fusible", "reduce"):
            continue
        for v in op.ins:
            j = producer.get(v)
            if (j is not None and kinds[j] == "fusible" and v not in outputs
                    and len(set(consumers[v])) == 1):
                union(i, j)

    # What a recomputed value costs to read: its operands (transitively through recomputed ops).
    def read_cost(v):
        j = producer.get(v)
        if j is None or kinds[j] != "recomputed":
            return {v}
        vals = set()
        for u in ops[j].ins:
            if u is not None:
                vals |= read_cost(u)
        return vals

    groups = collections.defaultdict(list)
    for i in range(len(ops)):
        if kinds[i] != "recomputed":
            groups[find(i)].append(i)

    # Multi-output fusion of reductions that read the same largest input.
    def main_input(members):
        ins = _external_inputs(members)
        return max(ins, key=lambda v: program.sizes[v]) if ins else None

    def _external_inputs(members):
        inside = {v for i in members for v in ops[i].outs}
        ins = set()
        for i in members:
            for v in ops[i].ins:
                if v is not None and v not in inside:
                    ins |= read_cost(v)
        return ins

    by_input = collections.defaultdict(list)
    for root, members in groups.items():
        if any(kinds[i] == "reduce" for i in members):
            by_input[main_input(members)].append(root)
    for key, roots in by_input.items():
        if key is not None and len(roots) > 1:
            for r in roots[1:]:
                groups[roots[0]].extend(groups.pop(r))

    # A recomputed value that the program returns is written by a kernel of its own.
    for i in range(len(ops)):
        if kinds[i] == "recomputed" and any(v in outputs for v in ops[i].outs):
            groups[("out", i)] = [i]

    kernels = []
    for members in groups.values():
        members.sort()
        ins = _external_inputs(members)
        outs = {v for i in members for v in ops[i].outs
                if v in outputs or any(c not in members for c in consumers[v])}
        nbytes = sum(program.sizes[v] for v in ins) + sum(program.sizes[v] for v in outs)
        head = max(members, key=lambda i: sum(program.sizes[v] for v in ops[i].outs))
        layer, backward = _layer(ops[head].stack)
        scale = ops[head].scale
        prims = {ops[i].prim for i in members}
        matrix, other = 0.0, 0.0
        if kinds[head] == "matmul":
            op = ops[head]
            fake = _fake_eqn(op, program)
            if op.prim == "conv_general_dilated":
                matrix = flops_lib._conv_flops(fake)
                category = _conv_category(op, backward)
            else:
                matrix = flops_lib._dot_flops(fake)
                category = "matmul"
        else:
            other = sum(float(math.prod(program.avals[ops[i].outs[0]].shape))
                        for i in members if ops[i].prim not in DATA_MOVEMENT and ops[i].outs)
            if prims & {"reduce_window_max", "reduce_window_min", "reduce_window_sum",
                        "reduce_window", "select_and_scatter_add", "select_and_gather_add"}:
                category = "pooling"
            elif kinds[head] == "standalone":
                category = "gather/scatter"
            elif prims & REDUCTIONS:
                category = "reduction"
            elif prims <= DATA_MOVEMENT:
                category = "copy/transpose"
            else:
                category = "elementwise"
        kernels.append(Kernel(layer, category, backward, scale * matrix, scale * other,
                              scale * nbytes, len(members)))
    return kernels


def analyze(fn, *args, **kwargs) -> list[Kernel]:
    """The kernels of fn(*args, **kwargs); traced abstractly (ShapeDtypeStructs do), not run."""
    return analyze_jaxpr(jax.make_jaxpr(fn)(*args, **kwargs))


def chip_for(device_kind: str) -> str | None:
    """The CHIPS preset of a jax device_kind ('NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA H100
    PCIe' -> 'h100-pcie'), or None."""
    chip = flops_lib.chip_for(device_kind)
    return chip.name if chip is not None and chip.name in CHIPS else None


def summarize(kernels: list[Kernel], peak: float, bandwidth: float, depth: int = 0) -> dict:
    """Totals, per category and per layer (module path cut to `depth` parts; 0: whole path)."""
    def row():
        return {"flops": 0.0, "other_flops": 0.0, "bytes": 0.0, "bound_s": 0.0,
                "memory_bound_s": 0.0, "kernels": 0, "fwd_bound_s": 0.0, "bwd_bound_s": 0.0}

    total, cats, layers = row(), collections.defaultdict(row), collections.defaultdict(row)
    for k in kernels:
        name = "/".join(k.layer.split("/")[:depth]) if depth else k.layer
        t = k.bound_s(peak, bandwidth)
        for r in (total, cats[k.category], layers[name]):
            r["flops"] += k.flops
            r["other_flops"] += k.other_flops
            r["bytes"] += k.bytes
            r["bound_s"] += t
            r["kernels"] += 1
            r["bwd_bound_s" if k.backward else "fwd_bound_s"] += t
            if k.bytes / bandwidth >= (k.flops + k.other_flops) / peak:
                r["memory_bound_s"] += t
    return {"peak_flops": peak, "bandwidth_bytes_per_s": bandwidth, "total": total,
            "mfu_at_bound": total["flops"] / total["bound_s"] / peak if total["bound_s"] else None,
            "categories": {c: cats[c] for c in CATEGORIES if c in cats},
            "layers": dict(sorted(layers.items(), key=lambda kv: -kv[1]["bound_s"]))}


def step_bound(fn, *args, device_kind: str, dtype: str = "bfloat16") -> dict | None:
    """For bench/train_step.py: the roofline bound of fn(*args) on the chip of device_kind at the
    peak of `dtype`, or None on a chip without a preset (CPUs: the multiple would mean nothing)."""
    chip = chip_for(device_kind)
    if chip is None or chip_peak(chip, dtype) is None:
        return None
    summary = summarize(analyze(fn, *args), chip_peak(chip, dtype), CHIPS[chip][1])
    return {"chip": chip, "bound_s": summary["total"]["bound_s"],
            "bytes": summary["total"]["bytes"], "flops": summary["total"]["flops"],
            "categories_s": {c: r["bound_s"] for c, r in summary["categories"].items()}}


# The opt-in faster forms of lcssl.models.ops (UTT fields, default off).
FAST_FORMS = ("decoder_phase_conv", "fused_bn_act", "low_precision_resample")


def parse_model_fields(items) -> dict:
    """['fused_bn_act', 'decoder_phase_conv=False'] -> {name: bool}, names from FAST_FORMS."""
    fields = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in FAST_FORMS or value not in ("", "True", "False"):
            raise ValueError(f"--model-field {item!r}: expected NAME or NAME=True|False with NAME "
                             f"one of {', '.join(FAST_FORMS)}")
        fields[name] = value != "False"
    return fields


def supervised_step(cfg, fields=None):
    """(step_fn, abstract args) of the supervised model step: U-T&T forward, cross-entropy on the
    logits and the auxiliary logits, backward, SGD with momentum (bench/train_step.py's step);
    `fields` sets UTT fields (FAST_FORMS) on the built model."""
    import optax
    from lcssl import models

    model = models.build_model(cfg).clone(**(fields or {}))
    opt = optax.sgd(1e-3, momentum=0.9)

    def step(params, batch_stats, opt_state, batch):
        def loss_fn(params):
            out, updates = model.apply({"params": params, "batch_stats": batch_stats},
                                       batch["aerial"], batch["sits"], batch["dates"],
                                       batch["sits_valid"], train=True,
                                       rngs={"dropout": jax.random.key(0)},
                                       mutable=["batch_stats"])
            onehot = jax.nn.one_hot(batch["label"], cfg.num_classes)
            loss = optax.softmax_cross_entropy(out["logits"], onehot).mean()
            loss += optax.softmax_cross_entropy(out["aux_logits"], onehot).mean()
            return loss, updates["batch_stats"]
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    variables = models.param_shapes(model, cfg)
    opt_state = jax.eval_shape(opt.init, variables["params"])
    return step, (variables["params"], variables["batch_stats"], opt_state)


def abstract_batch(cfg, batch: int, dates: int) -> dict:
    s = jax.ShapeDtypeStruct
    return {"aerial": s((batch, cfg.aerial_size, cfg.aerial_size, cfg.aerial_bands), jnp.float32),
            "sits": s((batch, dates, cfg.sits_size, cfg.sits_size, cfg.sits_bands), jnp.float32),
            "dates": s((batch, dates), jnp.int32), "sits_valid": s((batch, dates), jnp.bool_),
            "label": s((batch, cfg.aerial_size, cfg.aerial_size), jnp.int32)}


def print_tables(summary: dict, top: int) -> None:
    peak, bw = summary["peak_flops"], summary["bandwidth_bytes_per_s"]
    t = summary["total"]
    print(f"roofline: peak {peak / 1e12:.0f} TFLOP/s, {bw / 1e12:.2f} TB/s; "
          f"{t['kernels']} kernels, {t['flops'] / 1e12:.3f} TFLOP matrix "
          f"+ {t['other_flops'] / 1e12:.3f} TFLOP other, {t['bytes'] / 1e9:.2f} GB moved")
    print(f"bound {t['bound_s'] * 1e3:.2f} ms per step (forward {t['fwd_bound_s'] * 1e3:.2f}, "
          f"backward {t['bwd_bound_s'] * 1e3:.2f}); memory-bound kernels "
          f"{t['memory_bound_s'] / t['bound_s']:.0%} of it; MFU at the bound "
          f"{summary['mfu_at_bound']:.1%}")
    print(f"\n{'category':<16} {'kernels':>7} {'TFLOP':>8} {'GB':>8} {'bound ms':>9} {'share':>6}")
    for name, r in summary["categories"].items():
        print(f"{name:<16} {r['kernels']:>7} {r['flops'] / 1e12:>8.3f} {r['bytes'] / 1e9:>8.2f} "
              f"{r['bound_s'] * 1e3:>9.2f} {r['bound_s'] / t['bound_s']:>6.1%}")
    print(f"\n{'layer (top %d by bound)' % top:<52} {'GFLOP':>8} {'MB':>8} {'fwd ms':>7} "
          f"{'bwd ms':>7} {'mem%':>5}")
    for name, r in list(summary["layers"].items())[:top]:
        print(f"{name[-52:]:<52} {r['flops'] / 1e9:>8.1f} {r['bytes'] / 1e6:>8.1f} "
              f"{r['fwd_bound_s'] * 1e3:>7.3f} {r['bwd_bound_s'] * 1e3:>7.3f} "
              f"{r['memory_bound_s'] / r['bound_s'] if r['bound_s'] else 0:>5.0%}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=("default", "tiny"), default="default")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dates", type=int, default=12)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--chip", choices=sorted(CHIPS), default="h100")
    p.add_argument("--peak-tflops", type=float, default=None, help="overrides the chip's peak")
    p.add_argument("--bandwidth-tbs", type=float, default=None,
                   help="overrides the chip's memory bandwidth, TB/s")
    p.add_argument("--model-field", action="append", default=[], metavar="NAME[=True|False]",
                   help=f"turn on a faster form, one of {', '.join(FAST_FORMS)} (repeatable)")
    p.add_argument("--depth", type=int, default=0,
                   help="group layers by the first DEPTH parts of their module path (0: whole)")
    p.add_argument("--top", type=int, default=30, help="layers printed")
    p.add_argument("--json", default="roofline.json")
    args = p.parse_args()
    if args.batch < 1:
        p.error(f"--batch must be >= 1, found {args.batch}")
    peak, bandwidth = chip_peak(args.chip, args.dtype), CHIPS[args.chip][1]
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak
    bandwidth = args.bandwidth_tbs * 1e12 if args.bandwidth_tbs else bandwidth
    if peak <= 0 or bandwidth <= 0:
        p.error("--peak-tflops and --bandwidth-tbs must be > 0")

    from lcssl import models
    cfg = models.default_config() if args.preset == "default" else models.tiny_config()
    cfg.dtype = args.dtype
    try:
        fields = parse_model_fields(args.model_field)
    except ValueError as e:
        p.error(str(e))
    step, state = supervised_step(cfg, fields)
    kernels = analyze(step, *state, abstract_batch(cfg, args.batch, args.dates))
    summary = summarize(kernels, peak, bandwidth, args.depth)
    print(f"supervised step, {args.preset} U-T&T, batch {args.batch}, {args.dtype}, "
          f"chip {args.chip}")
    print_tables(summary, args.top)
    summary.update(preset=args.preset, batch=args.batch, dtype=args.dtype, chip=args.chip,
                   dates=args.dates, model_fields=args.model_field,
                   kernels=[dataclasses.asdict(k) for k in kernels])
    from lcssl.files import write_json
    write_json(args.json, summary, sort_keys=False)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
