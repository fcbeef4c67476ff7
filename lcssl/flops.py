"""Model FLOPs counted from the program itself (the jaxpr), the same on every backend.

Why not `jax.jit(f).lower(...).compile().cost_analysis()`: what it counts depends on the backend
and on how XLA lowered the program. On GPU, convolutions become cuDNN custom calls that the cost
analysis does not count (on an H100 it reported 25 GFLOP for a U-T&T step at batch 8 whose
convolutions alone do 1.6 TFLOP), and on every backend a loop body (lax.scan, lax.map) is counted
once, not once per trip. MFU needs the arithmetic the model asks for, whatever runs it.

Counted: 2 x multiply-adds of every `dot_general` and `conv_general_dilated`, the operations that
run on matrix units; elementwise work, reductions, normalization and softmax are left out, as in the
usual MFU convention (PaLM, appendix B). Loops count their body x trips (scan), branches the
costliest (cond), shard_map bodies x the devices they run on. Recomputation is counted apart
(`recomputed`): the forward ops that remat replays inside the backward pass (jax names them
`rematted_computation`) and those under a `jax.named_scope(RECOMPUTE_SCOPE)` outside the backward
pass (GradCache's second encoder forward); `model` = total - recomputed is the useful work that MFU
divides by, `total` what the hardware does. A `while` loop's trip count is unknown: its body is counted once and
`count_flops(...).unknown_trip_loops` says how many such loops there were. Convolutions with input
dilation (the input gradient of a strided convolution) count only the taps on real input pixels,
not the inserted zeros, so that a convolution's backward pass costs twice its forward, the usual
model-FLOPs rule. Window taps on 'SAME' padding are counted, as the hardware does them (XLA's cost
analysis leaves those out: 4 % fewer on a 32 x 32 map, 0.8 % on a 512 x 512 one).

    from lcssl import flops
    n = flops.count_flops(step_fn, state, batch)   # abstract trace, no compile, no device memory
    print(n.total / 1e12, "TFLOP per step")

The trainer logs train/tflops_per_device from the model count (and train/mfu against the peak of
the compute dtype on a chip of known peak, `peak_flops`); bench/train_step.py reports it per step.
"""
import dataclasses
import math

import jax


# Dense (no sparsity) peaks per chip from the vendors' datasheets (NVIDIA H100 / H200 / A100
# "Technical Specifications": the tensor-core figures there are "with sparsity", twice the dense
# ones; Google Cloud TPU pages), matched against jax's device_kind, most specific first: the SXM
# H100 reports "NVIDIA H100 80GB HBM3", the PCIe card "NVIDIA H100 PCIe", the NVL card "NVIDIA H100
# NVL" (the CUDA device name, as nvidia-smi prints it). float32: JAX's default precision runs
# float32 convolutions and matmuls on the tensor cores as TF32 on these GPUs, so the TF32 dense peak
# is what a float32 step can reach (None where not listed: no MFU is claimed).
@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # preset name (bench/roofline.py --chip)
    match: str  # substring of jax's device_kind
    bfloat16_flops: float
    float32_flops: float | None
    hbm_bytes_per_s: float | None  # TB = 1e12 bytes


CHIPS = (
    Chip("h100-pcie", "H100 PCIe", 756e12, 378e12, 2.0e12),
    Chip("h100-nvl", "H100 NVL", 835e12, 418e12, 3.9e12),
    Chip("h100", "H100", 989e12, 494.5e12, 3.35e12),  # SXM
    Chip("h200-nvl", "H200 NVL", 835e12, 418e12, 4.8e12),
    Chip("h200", "H200", 989e12, 494.5e12, 4.8e12),  # SXM: the GH100 compute of the H100 SXM
    Chip("a100", "A100", 312e12, 156e12, None),  # HBM: 1.6-2.0 TB/s, by memory size and form
    Chip("tpu-v4", "TPU v4", 275e12, None, None),
    Chip("tpu-v5e", "TPU v5 lite", 197e12, None, None),
    Chip("tpu-v5p", "TPU v5p", 459e12, None, None),
    Chip("tpu-v6e", "TPU v6 lite", 918e12, None, None),
)


def chip_for(device_kind: str) -> Chip | None:
    """The Chip of a jax device_kind ('NVIDIA H100 PCIe' -> h100-pcie), or None (CPUs, others)."""
    return next((c for c in CHIPS if c.match in device_kind), None)


def peak_flops(device_kind: str, dtype: str = "bfloat16") -> float | None:
    """The chip's dense peak for convolutions / matmuls in `dtype` ('bfloat16' | 'float32'), or
    None when unknown (another chip or dtype: no MFU is better than a wrong one)."""
    chip = chip_for(device_kind)
    if chip is None or dtype not in ("bfloat16", "float32"):
        return None
    return getattr(chip, f"{dtype}_flops")


@dataclasses.dataclass
class FlopCount:
    total: float = 0.0  # FLOPs of the whole (global) program, as the hardware runs it
    dot: float = 0.0  # of which dot_general
    conv: float = 0.0  # of which conv_general_dilated
    recomputed: float = 0.0  # of which recomputation (remat, GradCache's second forward)
    unknown_trip_loops: int = 0  # while loops, counted once

    @property
    def model(self) -> float:
        """Model FLOPs: each forward op once, plus the backward pass (what MFU divides by)."""
        return self.total - self.recomputed

    def add(self, other: "FlopCount") -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


# Wrap a forward pass that repeats one already counted (and is not the backward pass itself) in
# jax.named_scope(RECOMPUTE_SCOPE): its ops count as recomputed (lcssl.gradcache does).
RECOMPUTE_SCOPE = "recomputation"
# jax's name for the forward ops that remat replays in the backward pass.
_REMAT_SCOPE = "rematted_computation"


def _is_recomputation(name_stack) -> bool:
    parts = str(name_stack).split("/")
    if _REMAT_SCOPE in parts:
        return True
    return RECOMPUTE_SCOPE in parts and not any(p.startswith("transpose(") for p in parts)


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


def _count(jaxpr, acc: FlopCount, scale: float, recomputed: bool = False) -> None:
    """recomputed: the eqns run again what was counted already (inherited by sub-jaxprs)."""
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        again = recomputed or _is_recomputation(eqn.source_info.name_stack)
        if name in ("dot_general", "conv_general_dilated"):
            n = scale * (_dot_flops(eqn) if name == "dot_general" else _conv_flops(eqn))
            if name == "dot_general":
                acc.dot += n
            else:
                acc.conv += n
            acc.total += n
            acc.recomputed += n if again else 0.0
        elif name == "cond":  # the costliest branch
            best = None
            for branch in eqn.params["branches"]:
                sub = FlopCount()
                _count(branch.jaxpr, sub, scale, again)
                if best is None or sub.total > best.total:
                    best = sub
            if best is not None:
                acc.add(best)
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
                _count(sub, acc, inner, again)


def jaxpr_flops(closed_jaxpr) -> FlopCount:
    acc = FlopCount()
    _count(closed_jaxpr.jaxpr, acc, 1.0)
    return acc


def count_flops(fn, *args, **kwargs) -> FlopCount:
    """FLOPs of fn(*args, **kwargs) over the whole (global) batch; traced abstractly, not run."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs))
