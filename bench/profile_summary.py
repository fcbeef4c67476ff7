"""Where a step's time goes, from a jax.profiler trace: a short text summary, made on the machine
that ran the step (the trace itself is too big to bring back from a lent GPU).

    python bench/profile_summary.py --batch 32 --dtype bfloat16 --steps 3 --out /tmp/prof
        # capture: the supervised model step (bench/roofline.py's), traced for --steps steps after
        # a warm-up, then summarized; writes OUT/trace/..., OUT/hlo.txt, OUT/summary.txt
    python bench/profile_summary.py --trace /tmp/prof/trace --hlo /tmp/prof/hlo.txt
        # summarize an existing trace of the program whose compiled HLO is in --hlo

The summary: device busy time (union of op intervals) against wall time (first op start to last op
end), time by category (convolution forward / input gradient / weight gradient, matmul,
reductions, elementwise fusions, copies / transposes, other) and the top ops with their calls,
time, TFLOP/s and GB/s. FLOPs and bytes per op are read off the compiled HLO (`compiled.as_text()`):
2 x multiply-adds of each convolution / dot (inside fusions too), bytes = operands + result of the
top-level instruction (cuDNN scratch buffers left out). Trace events are matched to HLO
instructions through their `hlo_op` / `hlo_module` args; on a GPU only the device's events count.
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
    out = ins["shapes"][0][1] if ins["shapes"] else ()
    window = re.search(r"window=\{size=([\dx]+)", ins["rest"])
    labels = re.search(r"dim_labels=\w+_(\w+)->", ins["rest"])
    if not (out and labels and len(ins["operands"]) >= 2):
        return 0.0
    kernel = comp.get(ins["operands"][1])
    if kernel is None or not kernel["shapes"]:
        return 0.0
    kdims = kernel["shapes"][0][1]
    cin = kdims[labels.group(1).index("i")] if "i" in labels.group(1) else 1
    taps = math.prod(int(s) for s in window.group(1).split("x")) if window else 1
    return 2.0 * math.prod(out) * taps * cin


def _dot_flops(ins, comp):
    out = ins["shapes"][0][1] if ins["shapes"] else ()
    contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins["rest"])
    lhs = comp.get(ins["operands"][0]) if ins["operands"] else None
    if lhs is None or not lhs["shapes"] or contract is None:
        return 0.0
    dims = lhs["shapes"][0][1]
    return 2.0 * math.prod(out) * math.prod(dims[int(d)] for d in contract.group(1).split(",") if d)


def op_table(hlo: dict) -> dict:
    """{entry instruction: {'category', 'flops', 'bytes'}} for the entry computation."""
    comps = hlo["computations"]
    entry = comps.get(hlo["entry"], {})
    table = {}
    for name, ins in entry.items():
        op = ins["opcode"]
        called = re.search(r"calls=%([\w.\-]+)", ins["rest"])
        body = comps.get(called.group(1), {}) if called else {}
        inner = [(i, body) for i in body.values()] if body else [(ins, entry)]
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
        operand_bytes = sum(_nbytes(entry[o]["shapes"], True) for o in ins["operands"]
                            if o in entry)
        nbytes = operand_bytes + _nbytes(ins["shapes"], skip_u8=True)
        if op in ("parameter", "constant", "tuple", "get-tuple-element", "bitcast"):
            continue
        table[name] = {"category": _category(ins, body, conv, comps, entry), "flops": flops,
                       "bytes": float(nbytes)}
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


def summarize(events: list, hlo: dict, top: int = 15) -> tuple[str, dict]:
    table = op_table(hlo)
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {p for p, n in procs.items() if "/device:" in n}
    ops = []
    unmatched = 0.0
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        if device_pids and e["pid"] not in device_pids:
            continue
        args = e.get("args") or {}
        name = args.get("hlo_op") or e.get("name", "")
        module = args.get("hlo_module")
        if module and hlo["module"] and module != hlo["module"]:
            continue
        if name in table:
            ops.append((float(e["ts"]), float(e["dur"]), name))
        elif args.get("hlo_op"):
            unmatched += float(e["dur"])
    if not ops:
        raise ValueError("no trace event matches an instruction of the HLO: wrong --hlo file?")
    ops.sort()
    wall = max(t + d for t, d, _ in ops) - ops[0][0]
    busy, end = 0.0, -math.inf
    for t, d, _ in ops:  # union of the intervals
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
    lines = [f"module {hlo['module']}: {len(ops)} op executions, wall {wall / 1e3:.2f} ms, "
             f"busy {busy / 1e3:.2f} ms ({busy / wall:.0%}), op time {op_time / 1e3:.2f} ms"
             + (f", unmatched op time {unmatched / 1e3:.2f} ms" if unmatched else ""),
             f"{'category':<20} {'ms':>9} {'share':>6}"]
    for c in CATEGORIES:
        if c in cats:
            lines.append(f"{c:<20} {cats[c] / 1e3:>9.2f} {cats[c] / op_time:>6.1%}")
    lines.append(f"top {top} ops: {'op':<34} {'category':<18} {'calls':>5} {'ms':>8} "
                 f"{'TFLOP/s':>8} {'GB/s':>8}")
    rows = []
    for name, (n, d) in sorted(per_op.items(), key=lambda kv: -kv[1][1]):
        info = table[name]
        secs = d / 1e6
        row = {"op": name, "category": info["category"], "calls": n, "time_s": secs,
               "tflops_per_s": info["flops"] * n / secs / 1e12 if secs else None,
               "gb_per_s": info["bytes"] * n / secs / 1e9 if secs else None}
        rows.append(row)
        if len(rows) <= top:
            lines.append(f"          {name[:34]:<34} {info['category']:<18} {n:>5} "
                         f"{d / 1e3:>8.3f} {row['tflops_per_s'] or 0:>8.3f} "
                         f"{row['gb_per_s'] or 0:>8.1f}")
    return "\n".join(lines), {"wall_s": wall / 1e6, "busy_s": busy / 1e6, "op_time_s": op_time / 1e6,
                              "unmatched_s": unmatched / 1e6,
                              "categories_s": {c: v / 1e6 for c, v in cats.items()}, "ops": rows}


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
    compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(*state, batch).compile()
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
        args.timing = (f"step {step_s * 1e3:.2f} ms (median of {len(times)}), "
                       f"{args.batch / step_s:.2f} samples/s on {kind}"
                       + (f"; {step_s / bound['bound_s']:.2f}x the {bound['chip']} roofline bound "
                          f"({bound['bound_s'] * 1e3:.2f} ms)" if bound else ""))
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
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    if not args.trace:
        text = (f"supervised step, {args.preset}, batch {args.batch}, {args.dtype}, "
                f"{args.steps} steps traced\n" + (getattr(args, "timing", "") + "\n") + text)
    print(text)
    if args.summary:
        with open(args.summary, "w") as f:
            f.write(text + "\n")
        with open(os.path.splitext(args.summary)[0] + ".json", "w") as f:
            json.dump(data, f, indent=1)


if __name__ == "__main__":
    main()
