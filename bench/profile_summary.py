"""Where a step's time goes, from a jax.profiler trace: a short text summary, made on the machine
that ran the step (the trace itself is too big to bring back from a lent GPU).

    python bench/profile_summary.py --batch 32 --dtype bfloat16 --steps 3 --out /tmp/prof
        # capture: the supervised model step (bench/roofline.py's), traced for --steps steps after
        # a warm-up, then summarized; writes OUT/trace/..., OUT/hlo.txt, OUT/summary.txt
    python bench/profile_summary.py --trace /tmp/prof/trace --hlo /tmp/prof/hlo.txt
        # summarize an existing trace of the program whose compiled HLO is in --hlo

The summary: device busy time (union of all op intervals of the program) against wall time (first
op start to last op end); every op event matched to an HLO instruction, or named as unmatched with
its reason and share of op time (target: under 5%); time and TFLOP/s by category (convolution
forward / input gradient / weight gradient, matmul, reductions, elementwise fusions, copies /
transposes, other) and the top ops with their calls, time, TFLOP/s and GB/s. FLOPs and bytes per op
are read off the compiled HLO (`compiled.as_text()`): 2 x multiply-adds of each convolution / dot
(inside fusions too; each convolution direction counts its forward convolution's, as lcssl.flops
does), bytes = operands + result of the instruction (cuDNN scratch buffers left out). The ops are
those of the entry computation and of the computations it runs as containers: XLA:GPU records
runs of kernels into command buffers (`call`s of a computation), whose kernels the trace names by
their own instructions. Trace events are matched through their `hlo_op` / `hlo_module` args; on a
GPU only the device's kernel lines count (the derived "XLA Ops" line alone where the trace has one).
No TensorFlow.
"""
import argparse
import collections
import glob
import gzip
import json
import math
import os
import re
import statistics
import sys
import time

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8\w*)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+) .*\{\s*$")
MOVEMENT = {"parameter", "copy", "transpose", "bitcast", "slice", "concatenate", "pad", "reshape",
            "broadcast", "constant", "dynamic-slice", "dynamic-update-slice", "reverse", "tuple",
            "get-tuple-element", "copy-start", "copy-done", "iota", "convert"}
CATEGORIES = ("conv fwd", "conv dgrad", "conv wgrad", "matmul", "reduction", "elementwise fusion",
              "copy/transpose", "other")


def _shapes(text):
    """[(dtype, dims)] of the array shapes in an HLO type string."""
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _SHAPE.findall(text)]


def _nbytes(shapes, skip_u8=False):
    return sum(math.prod(d) * _DTYPE_BYTES.get(t, 1) for t, d in shapes
               if not (skip_u8 and t == "u8"))


def parse_hlo(text: str) -> dict:
    """{'module': name, 'computations': {name: {instr: {...}}}, 'entry': name}."""
    module = re.search(r"HloModule\s+([\w.\-]+)", text)
    comps, entry, current = {}, None, None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m and not line[:1].isspace():  # headers start at column 0, instructions are indented
            current = comps.setdefault(m.group(1), {})
            if line.startswith("ENTRY"):
                entry = m.group(1)
            continue
        m = _INSTR.match(line)
        if m and current is not None:
            name, typ, opcode, rest = m.groups()
            operands = re.findall(r"%([\w.\-]+)", rest.split("),")[0])
            current[name] = {"type": typ, "opcode": opcode, "rest": rest, "operands": operands,
                             "shapes": _shapes(typ)}
    return {"module": module.group(1) if module else None, "computations": comps, "entry": entry}


def _conv_flops(ins, comp):
    """2 x the multiply-adds of the forward convolution an instruction computes a direction of:
    2 x forward output elements x (window taps x input features per group), read off the kernel
    (its size over its output-feature dimension). XLA's own convolutions (CPU) compute what they
    say: an input gradient is a convolution over the output gradient dilated by the stride, whose
    inserted zeros are not counted (lhs_dilate), a weight gradient one whose 'kernel' is the output
    gradient. cuDNN custom calls keep the forward convolution's window and dim_labels (input_kernel
    ->output) and read / write its tensors: forward (input, kernel) -> output, BackwardInput
    (output, kernel) -> input, BackwardFilter (input, output) -> kernel. The same count as
    lcssl.flops' for each direction."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins["rest"])
    if not labels or len(ins["operands"]) < 2 or not ins["shapes"]:
        return 0.0
    shape = lambda name: (comp[name]["shapes"][0][1] if name in comp and comp[name]["shapes"]
                          else None)
    result = ins["shapes"][0][1]
    target = re.search(r'custom_call_target="([^"]+)"', ins["rest"])
    target = target.group(1) if target else ""
    if "BackwardFilter" in target:
        out, kernel = shape(ins["operands"][1]), result
    elif "BackwardInput" in target:
        out, kernel = shape(ins["operands"][0]), shape(ins["operands"][1])
    else:
        out, kernel = result, shape(ins["operands"][1])
    rhs = labels.group(2)
    if not out or not kernel or "o" not in rhs or len(rhs) != len(kernel):
        return 0.0
    dilation = re.search(r"lhs_dilate=([\dx]+)", ins["rest"]) if not target else None
    zeros = math.prod(int(v) for v in dilation.group(1).split("x")) if dilation else 1
    return 2.0 * math.prod(out) * math.prod(kernel) / kernel[rhs.index("o")] / zeros


def _dot_flops(ins, comp):
    out = ins["shapes"][0][1] if ins["shapes"] else ()
    contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins["rest"])
    lhs = comp.get(ins["operands"][0]) if ins["operands"] else None
    if lhs is None or not lhs["shapes"] or contract is None:
        return 0.0
    dims = lhs["shapes"][0][1]
    return 2.0 * math.prod(out) * math.prod(dims[int(d)] for d in contract.group(1).split(",") if d)


# Ops that run other computations' instructions as ops of their own: a command buffer (a `call` of
# the kernels XLA:GPU records into one CUDA graph), loops, branches, async wrappers. Their
# instructions are launched and traced under their own names, like the entry's.
CONTAINERS = {"call", "while", "conditional", "async-start", "async-update", "async-done"}
_CALLED = re.compile(r"(?:to_apply|calls|body|condition)=(%[\w.\-]+)|branch_computations=\{([^}]*)\}")
_SKIP = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}


def _called(ins) -> list:
    return [n for m in _CALLED.findall(ins["rest"]) for n in re.findall(r"%([\w.\-]+)", "".join(m))]


def op_table(hlo: dict) -> dict:
    """{instruction: {'category', 'flops', 'bytes', 'inside'}} for every instruction that runs as an
    op: those of the entry computation and of the computations its containers run (command buffers,
    loop bodies, branches), not those inside fusions or reducers. 'inside': for a container, the
    instructions it runs (a trace may show them, the container, or both)."""
    comps = hlo["computations"]
    launched, todo = [], [hlo["entry"]]
    while todo:
        name = todo.pop()
        if name in comps and name not in launched:
            launched.append(name)
            todo.extend(c for ins in comps[name].values() if ins["opcode"] in CONTAINERS
                        for c in _called(ins))
    table = {}
    for comp_name in launched:
        scope = comps[comp_name]
        for name, ins in scope.items():
            if ins["opcode"] in _SKIP:
                continue
            called = _called(ins)
            if ins["opcode"] in CONTAINERS:
                inside = [n for c in called if c in launched for n in comps[c]
                          if comps[c][n]["opcode"] not in _SKIP]
                table[name] = {"category": "container", "flops": 0.0, "bytes": 0.0,
                               "inside": inside}
                continue
            body = comps.get(called[0], {}) if called and ins["opcode"] == "fusion" else {}
            inner = [(i, body) for i in body.values()] if body else [(ins, scope)]
            flops, conv = 0.0, None
            for i, c in inner:
                if i["opcode"] == "convolution" or (i["opcode"] == "custom-call"
                                                   and "conv" in i["rest"].lower()):
                    flops += _conv_flops(i, c)
                    conv = i
                elif i["opcode"] == "dot" or (i["opcode"] == "custom-call"
                                              and re.search(r"gemm|matmul", i["rest"], re.I)):
                    flops += _dot_flops(i, c)
                    conv = conv or ("dot", i)
            operand_bytes = sum(_nbytes(scope[o]["shapes"], True) for o in ins["operands"]
                                if o in scope)
            table[name] = {"category": _category(ins, body, conv, comps, scope), "flops": flops,
                           "bytes": float(operand_bytes + _nbytes(ins["shapes"], skip_u8=True)),
                           "inside": []}
    return table


def _category(ins, body, conv, comps, entry):
    text = ins["rest"]
    if isinstance(conv, tuple):
        return "matmul"
    if conv is not None:
        target = re.search(r'custom_call_target="([^"]+)"', conv["rest"])
        if target:
            t = target.group(1)
            if "BackwardFilter" in t:
                return "conv wgrad"
            if "BackwardInput" in t:
                return "conv dgrad"
            return "conv fwd"
        # XLA writes a weight gradient as a convolution whose window spans the activation (larger
        # than any of the model's kernels, 7x7 at most) and that writes a kernel, smaller than both
        # activations it reads; the backward pass is named transpose(...) in the metadata.
        window = re.search(r"window=\{size=([\dx]+)", conv["rest"])
        taps = math.prod(int(v) for v in window.group(1).split("x")) if window else 1
        out = math.prod(conv["shapes"][0][1]) if conv["shapes"] else 0
        scope = body or entry
        sizes = [math.prod(scope[o]["shapes"][0][1]) for o in conv["operands"]
                 if o in scope and scope[o]["shapes"]]
        backward = "transpose(" in conv["rest"] or "transpose(" in text
        if taps > 49 or (backward and sizes and out < min(sizes)):
            return "conv wgrad"
        return "conv dgrad" if backward else "conv fwd"
    ops = {i["opcode"] for i in body.values()} if body else {ins["opcode"]}
    if ops & {"reduce", "reduce-window", "all-reduce"} and ins["opcode"] != "all-reduce":
        return "reduction" if "reduce" in ops else "other"
    if ops <= MOVEMENT:
        return "copy/transpose"
    if ins["opcode"] == "fusion":
        return "elementwise fusion"
    return "other"


def load_trace(path: str) -> list:
    """The trace events of the newest *.trace.json.gz (or perfetto_trace.json.gz) under path."""
    files = sorted(glob.glob(os.path.join(path, "**", "*.trace.json.gz"), recursive=True)
                   or glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {path}: is it a jax.profiler.trace dir?")
    with gzip.open(files[-1], "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


# Trace-viewer lines of a device that are not kernels: derived from them ("XLA Modules", "Steps")
# or host-side annotations. "XLA Ops", where present, has one event per HLO op and is used alone.
DERIVED_LINES = {"XLA Modules", "Steps", "Framework Name Scope", "Framework Ops", "Source code",
                 "TensorFlow Name Scope", "TensorFlow Ops", "XLA TraceMe", "Launch Stats"}


def _device_events(events: list) -> tuple[list, bool]:
    """(the op events to read, whether they are a device's). On a GPU: the events of its
    '/device:' processes, from the 'XLA Ops' line if there is one, else from every line but the
    derived ones. Without device processes (CPU): every complete event."""
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {p for p, n in procs.items() if "/device:" in n}
    threads = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    if not device_pids:
        return complete, False
    line = lambda e: threads.get((e["pid"], e.get("tid")), "")
    on_device = [e for e in complete if e["pid"] in device_pids]
    if any(line(e) == "XLA Ops" for e in on_device):
        return [e for e in on_device if line(e) == "XLA Ops"], True
    return [e for e in on_device if line(e) not in DERIVED_LINES], True


def summarize(events: list, hlo: dict, top: int = 15) -> tuple[str, dict]:
    """The summary text and its figures. Every op event of the traced module is either matched to
    an instruction of the HLO or counted as unmatched with its reason (its name not in the HLO; no
    hlo_op at all on a device line: copies, memsets, library kernels); events of other modules
    (another jitted program) are counted apart. A container's own event (a command buffer launch)
    overlaps its kernels': left out of op time where the kernels inside it were traced; so are
    events of instructions inside a fusion (XLA:CPU's library fusions trace them), which their
    fusion's event covers."""
    table = op_table(hlo)
    chosen, on_device = _device_events(events)
    matched, unmatched, other_modules = [], collections.defaultdict(list), collections.Counter()
    # Instructions of fusion bodies: inside an op of the table, whose own event covers them.
    nested = {n for comp in hlo["computations"].values() for n in comp} - set(table)
    inside_fusions = [0, 0.0]
    for e in chosen:
        args = e.get("args") or {}
        name = args.get("hlo_op") or e.get("name", "")
        module = args.get("hlo_module")
        if module and hlo["module"] and module != hlo["module"]:
            other_modules[module] += float(e["dur"])
        elif name in table:
            matched.append((float(e["ts"]), float(e["dur"]), name))
        elif name in nested:  # e.g. XLA:CPU's library fusions trace their inner ops too
            inside_fusions[0] += 1
            inside_fusions[1] += float(e["dur"])
        elif args.get("hlo_op"):
            unmatched["its name is not an instruction of the HLO"].append(e)
        elif on_device:
            unmatched["no hlo_op (copy, memset or library kernel)"].append(e)
    if not matched:
        raise ValueError("no trace event matches an instruction of the HLO: wrong --hlo file?")
    seen = {name for _, _, name in matched}
    hidden = {n for n, info in table.items() if info["category"] == "container"
              and any(i in seen for i in info["inside"])}
    ops = sorted((t, d, n) for t, d, n in matched if n not in hidden)
    unmatched_s = {why: sum(float(e["dur"]) for e in evs) for why, evs in unmatched.items()}
    intervals = sorted(ops + [(float(e["ts"]), float(e["dur"]), "") for evs in unmatched.values()
                              for e in evs])
    wall = max(t + d for t, d, _ in intervals) - intervals[0][0]
    busy, end = 0.0, -math.inf
    for t, d, _ in intervals:  # union of the intervals, unmatched ops included
        if t + d > end:
            busy += t + d - max(t, end)
            end = t + d
    per_op = collections.defaultdict(lambda: [0, 0.0])
    for _, d, name in ops:
        per_op[name][0] += 1
        per_op[name][1] += d
    cats = collections.defaultdict(float)
    for name, (_, d) in per_op.items():
        cats[table[name]["category"]] += d
    op_time = sum(cats.values())
    missing = sum(unmatched_s.values())
    share = missing / (op_time + missing)
    lines = [f"module {hlo['module']}: {len(ops)} op executions, wall {wall / 1e3:.2f} ms, "
             f"busy {busy / 1e3:.2f} ms ({busy / wall:.0%}, unmatched ops included), "
             f"matched op time {op_time / 1e3:.2f} ms, unmatched {missing / 1e3:.2f} ms "
             f"({share:.1%} of all op time)"]
    for why, evs in sorted(unmatched.items(), key=lambda kv: -unmatched_s[kv[0]]):
        names = collections.Counter()
        for e in evs:
            names[(e.get("args") or {}).get("hlo_op") or e.get("name", "?")] += float(e["dur"])
        lines.append(f"  unmatched: {why}: {unmatched_s[why] / 1e3:.2f} ms, {len(evs)} events, "
                     f"most time: " + ", ".join(n for n, _ in names.most_common(5)))
    if inside_fusions[0]:
        lines.append(f"  {inside_fusions[0]} events of instructions inside fusions "
                     f"({inside_fusions[1] / 1e3:.2f} ms) left out: their fusion's event covers them")
    if hidden:
        lines.append(f"  {len(hidden)} container op(s) (command buffers, loops) left out of op "
                     f"time: the kernels inside them were traced one by one")
    if other_modules:
        lines.append("  other modules (not this program): " + ", ".join(
            f"{m} {d / 1e3:.2f} ms" for m, d in other_modules.most_common(3)))
    lines.append(f"{'category':<20} {'ms':>9} {'share':>6} {'TFLOP/s':>8}")
    flops_by_cat = collections.defaultdict(float)
    for name, (n, _) in per_op.items():
        flops_by_cat[table[name]["category"]] += table[name]["flops"] * n
    for c in CATEGORIES + ("container",):
        if c in cats:
            rate = flops_by_cat[c] / (cats[c] / 1e6) / 1e12 if cats[c] else 0.0
            lines.append(f"{c:<20} {cats[c] / 1e3:>9.2f} {cats[c] / op_time:>6.1%} {rate:>8.3f}")
    lines.append(f"top {top} ops: {'op':<34} {'category':<18} {'calls':>5} {'ms':>8} "
                 f"{'TFLOP/s':>8} {'GB/s':>8}")
    rows = []
    for name, (n, d) in sorted(per_op.items(), key=lambda kv: -kv[1][1]):
        info = table[name]
        secs = d / 1e6
        row = {"op": name, "category": info["category"], "calls": n, "time_s": secs,
               "flops": info["flops"] * n,
               "tflops_per_s": info["flops"] * n / secs / 1e12 if secs else None,
               "gb_per_s": info["bytes"] * n / secs / 1e9 if secs else None}
        rows.append(row)
        if len(rows) <= top:
            lines.append(f"          {name[:34]:<34} {info['category']:<18} {n:>5} "
                         f"{d / 1e3:>8.3f} {row['tflops_per_s'] or 0:>8.3f} "
                         f"{row['gb_per_s'] or 0:>8.1f}")
    return "\n".join(lines), {
        "wall_s": wall / 1e6, "busy_s": busy / 1e6, "op_time_s": op_time / 1e6,
        "unmatched_s": missing / 1e6, "unmatched_share": share,
        "unmatched_by_reason_s": {w: v / 1e6 for w, v in unmatched_s.items()},
        "other_modules_s": {m: v / 1e6 for m, v in other_modules.items()},
        "inside_fusions_s": inside_fusions[1] / 1e6,
        "categories_s": {c: v / 1e6 for c, v in cats.items()},
        "category_flops": dict(flops_by_cat), "ops": rows}


# The profile's categories as the roofline model (bench/roofline.py) names them.
TO_ROOFLINE = {"elementwise fusion": "elementwise", "other": "pooling / gather / other"}


def compare_with_roofline(measured_s: dict, bound_s: dict, steps: int) -> str:
    """Measured time per step by category beside the roofline model's bound for it: where the
    model's picture of the step (what is memory-bound, what runs on the matrix units) is wrong,
    the ratio shows it. measured_s: summarize()'s categories_s over `steps` traced steps."""
    merge = lambda c: TO_ROOFLINE.get(c, c)
    bound = collections.defaultdict(float)
    for c, v in bound_s.items():
        bound["pooling / gather / other" if c in ("pooling", "gather/scatter") else c] += v
    measured = collections.defaultdict(float)
    for c, v in measured_s.items():
        if c != "container":
            measured[merge(c)] += v / steps
    lines = [f"{'category vs roofline':<24} {'ms/step':>9} {'bound ms':>9} {'x bound':>8}"]
    for c in sorted(set(bound) | set(measured), key=lambda c: -measured.get(c, 0.0)):
        m, b = measured.get(c, 0.0), bound.get(c, 0.0)
        lines.append(f"{c:<24} {m * 1e3:>9.3f} {b * 1e3:>9.3f} "
                     f"{m / b if b else float('inf'):>8.2f}")
    return "\n".join(lines)


def capture(args) -> tuple[str, str]:
    """Trace args.steps supervised steps; returns (trace dir, hlo path)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import roofline
    from lcssl import models

    cfg = models.default_config() if args.preset == "default" else models.tiny_config()
    cfg.dtype = args.dtype
    step, abstract_state = roofline.supervised_step(cfg)
    model = models.build_model(cfg)
    import optax
    variables = jax.jit(lambda: model.init(jax.random.key(0, impl="rbg"),
                                           *models.dummy_inputs(cfg), train=False))()
    state = (variables["params"], variables["batch_stats"],
             optax.sgd(1e-3, momentum=0.9).init(variables["params"]))
    rng = np.random.default_rng(0)
    shapes = roofline.abstract_batch(cfg, args.batch, args.dates)
    batch = {k: jnp.asarray(rng.integers(0, 2, s.shape) if s.dtype == jnp.bool_ else
                            rng.integers(1, cfg.num_classes, s.shape) if s.dtype == jnp.int32
                            else rng.normal(size=s.shape), s.dtype) for k, s in shapes.items()}
    del abstract_state
    t0 = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0, 1, 2)).lower(*state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()  # on a GPU mostly autotuning (XLA_FLAGS' xla_gpu_autotune_level)
    compile_s = (t1 - t0, time.perf_counter() - t1)
    os.makedirs(args.out, exist_ok=True)
    hlo_path = os.path.join(args.out, "hlo.txt")
    with open(hlo_path, "w") as f:
        f.write(compiled.as_text())
    for _ in range(2):  # warm-up (autotuning, allocation)
        *state, loss = compiled(*state, batch)
    jax.block_until_ready(loss)
    # The step time without the profiler, as bench/train_step.py measures it (median).
    times = []
    for _ in range(args.time_steps):
        t = time.perf_counter()
        *state, loss = compiled(*state, batch)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t)
    if times:
        step_s = statistics.median(times)
        kind = jax.devices()[0].device_kind
        bound = roofline.step_bound(step, *state, batch, device_kind=kind, dtype=args.dtype)
        args.timing = (f"trace + lower {compile_s[0]:.1f} s, compile {compile_s[1]:.1f} s "
                       f"(persistent cache: {jax.config.jax_compilation_cache_dir or 'off'}); "
                       f"step {step_s * 1e3:.2f} ms (median of {len(times)}), "
                       f"{args.batch / step_s:.2f} samples/s on {kind}"
                       + (f"; {step_s / bound['bound_s']:.2f}x the {bound['chip']} roofline bound "
                          f"({bound['bound_s'] * 1e3:.2f} ms)" if bound else ""))
        args.bound_categories = bound["categories_s"] if bound else None
    trace_dir = os.path.join(args.out, "trace")
    with jax.profiler.trace(trace_dir):
        for _ in range(args.steps):
            *state, loss = compiled(*state, batch)
        jax.block_until_ready(loss)
    return trace_dir, hlo_path


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", help="summarize this jax.profiler trace dir (with --hlo)")
    p.add_argument("--hlo", help="compiled.as_text() of the traced program")
    p.add_argument("--out", default="/tmp/profile", help="capture: where trace, hlo and summary go")
    p.add_argument("--preset", choices=("default", "tiny"), default="default")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dates", type=int, default=12)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--steps", type=int, default=3, help="traced steps (capture)")
    p.add_argument("--time-steps", type=int, default=10,
                   help="capture: steps timed without the profiler first")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--summary", default=None, help="also write the summary here")
    args = p.parse_args()
    if bool(args.trace) != bool(args.hlo):
        p.error("--trace and --hlo go together (or neither: capture a new trace)")
    if args.trace:
        trace_dir, hlo_path = args.trace, args.hlo
    else:
        trace_dir, hlo_path = capture(args)
        args.summary = args.summary or os.path.join(args.out, "summary.txt")
    try:
        with open(hlo_path) as f:
            hlo = parse_hlo(f.read())
        text, data = summarize(load_trace(trace_dir), hlo, args.top)
    except (OSError, ValueError) as e:  # printed by lcssl.cli: one line, exit 2
        from lcssl.errors import UserError

        raise UserError(str(e)) from None
    if not args.trace:
        text = (f"supervised step, {args.preset}, batch {args.batch}, {args.dtype}, "
                f"{args.steps} steps traced\n" + (getattr(args, "timing", "") + "\n") + text)
        if getattr(args, "bound_categories", None):
            text += "\n" + compare_with_roofline(data["categories_s"], args.bound_categories,
                                                 args.steps)
    print(text)
    if args.summary:
        with open(args.summary, "w") as f:
            f.write(text + "\n")
        with open(os.path.splitext(args.summary)[0] + ".json", "w") as f:
            json.dump(data, f, indent=1)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from lcssl import cli

    cli.user_errors(main)()
