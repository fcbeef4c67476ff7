"""Model FLOPs counted from the program itself (the jaxpr), the same on every backend.

Why not `jax.jit(f).lower(...).compile().cost_analysis()`: what it counts depends on the backend
and on how XLA lowered the program. On GPU, convolutions become cuDNN custom calls that the cost
analysis does not count (on an H100 it reported 25 GFLOP for a U-T&T step at batch 8 whose
convolutions alone do 1.6 TFLOP), and on every backend a loop body (lax.scan, lax.map) is counted
once, not once per trip. MFU needs the arithmetic the model asks for, whatever runs it.

Counted: 2 x multiply-adds of every `dot_general` and `conv_general_dilated`, the operations that
run on matrix units; elementwise work, reductions, normalization and softmax are left out, as in the
usual MFU convention (PaLM, appendix B). Loops count their body x trips (scan), branches the
costliest (cond), rematerialized blocks as many times as the program runs them, shard_map bodies x
the devices they run on. A `while` loop's trip count is unknown: its body is counted once and
`count_flops(...).unknown_trip_loops` says how many such loops there were. Convolutions with input
dilation (the input gradient of a strided convolution) count only the taps on real input pixels,
not the inserted zeros, so that a convolution's backward pass costs twice its forward, the usual
model-FLOPs rule. Window taps on 'SAME' padding are counted, as the hardware does them (XLA's cost
analysis leaves those out: 4 % fewer on a 32 x 32 map, 0.8 % on a 512 x 512 one).

    from lcssl import flops
    n = flops.count_flops(step_fn, state, batch)   # abstract trace, no compile, no device memory
    print(n.total / 1e12, "TFLOP per step")

The trainer logs train/tflops_per_device from this count (and train/mfu on a chip of known peak);
bench/train_step.py reports it per step.
"""
import dataclasses
import math

import jax


# Dense bf16 peak FLOP/s per chip (no sparsity), from the vendors' datasheets (NVIDIA SXM parts,
# Google Cloud TPU pages), matched against jax's device_kind.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
                   "TPU v5 lite": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}


def peak_bf16_flops(device_kind: str) -> float | None:
    """The chip's dense bf16 peak, or None when unknown (CPUs, other GPUs)."""
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_kind), None)


@dataclasses.dataclass
class FlopCount:
    total: float = 0.0  # FLOPs of the whole (global) program
    dot: float = 0.0  # of which dot_general
    conv: float = 0.0  # of which conv_general_dilated
    unknown_trip_loops: int = 0  # while loops, counted once


def _dot_flops(eqn) -> float:
    lhs = eqn.invars[0].aval.shape
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    out = eqn.outvars[0].aval.shape
    return 2.0 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)


def _conv_flops(eqn) -> float:
    """2 x output elements x (kernel window x input features per group), read off the kernel,
    over the input dilation: a transposed convolution (the input gradient of a strided one) meets
    a real input pixel at 1 / prod(lhs_dilation) of its window taps, the rest are inserted zeros."""
    rhs = eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    dn = eqn.params["dimension_numbers"]
    out_feature_dim = dn.rhs_spec[0]  # rhs_spec = (out feature dim, in feature dim, spatial...)
    dilation = math.prod(eqn.params.get("lhs_dilation") or (1,))
    return 2.0 * math.prod(out) * math.prod(rhs) / rhs[out_feature_dim] / dilation


def _sub_jaxprs(params):
    for value in params.values():
        items = value if isinstance(value, (tuple, list)) else (value,)
        for item in items:
            if hasattr(item, "eqns"):  # core.Jaxpr
                yield item
            elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):  # core.ClosedJaxpr
                yield item.jaxpr


def _count(jaxpr, acc: FlopCount, scale: float) -> None:
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            n = scale * _dot_flops(eqn)
            acc.dot += n
            acc.total += n
        elif name == "conv_general_dilated":
            n = scale * _conv_flops(eqn)
            acc.conv += n
            acc.total += n
        elif name == "cond":  # the costliest branch
            best = None
            for branch in eqn.params["branches"]:
                sub = FlopCount()
                _count(branch.jaxpr, sub, scale)
                if best is None or sub.total > best.total:
                    best = sub
            if best is not None:
                acc.total += best.total
                acc.dot += best.dot
                acc.conv += best.conv
                acc.unknown_trip_loops += best.unknown_trip_loops
        else:
            inner = scale
            if name == "scan":
                inner = scale * eqn.params["length"]
            elif name == "while":
                acc.unknown_trip_loops += 1
            elif name == "shard_map":  # the body sees one device's shard: x the devices it runs on
                mesh = eqn.params["mesh"]
                axes = (eqn.params.get("manual_axes") or eqn.params.get("newly_manual_axes")
                        or eqn.params.get("axis_names") or mesh.axis_names)
                inner = scale * math.prod(mesh.shape[a] for a in axes)
            for sub in _sub_jaxprs(eqn.params):
                _count(sub, acc, inner)


def jaxpr_flops(closed_jaxpr) -> FlopCount:
    acc = FlopCount()
    _count(closed_jaxpr.jaxpr, acc, 1.0)
    return acc


def count_flops(fn, *args, **kwargs) -> FlopCount:
    """FLOPs of fn(*args, **kwargs) over the whole (global) batch; traced abstractly, not run."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs))
