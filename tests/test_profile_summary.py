"""bench/profile_summary.py on a trace built like a GPU one: cuDNN convolutions in all three
directions, kernels inside a command buffer, a copy without hlo_op, a derived line, another module.
Every op is matched or named as unmatched with its reason; each direction's FLOPs are the forward
convolution's (known answer)."""
import gzip
import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("profile_summary",
                                               ROOT / "bench" / "profile_summary.py")
profile_summary = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_summary)

# A 3x3 convolution, 2x16x16x8 -> 2x8x8x12 (stride 2), its input and weight gradients as XLA:GPU
# writes them (cuDNN custom calls keep the forward window and dim_labels), and the elementwise
# work between them recorded into a command buffer.
HLO = """HloModule jit_step, is_scheduled=true, entry_computation_layout={(bf16[2,16,16,8]{3,2,1,0})}

%fused_relu (param_0.1: bf16[2,8,8,12]) -> bf16[2,8,8,12] {
  %param_0.1 = bf16[2,8,8,12]{3,2,1,0} parameter(0)
  %constant.1 = bf16[] constant(0)
  %broadcast.1 = bf16[2,8,8,12]{3,2,1,0} broadcast(%constant.1), dimensions={}
  ROOT %maximum.1 = bf16[2,8,8,12]{3,2,1,0} maximum(%param_0.1, %broadcast.1)
}

%fused_mul (param_0.2: bf16[2,8,8,12], param_1.2: bf16[2,8,8,12]) -> bf16[2,8,8,12] {
  %param_0.2 = bf16[2,8,8,12]{3,2,1,0} parameter(0)
  %param_1.2 = bf16[2,8,8,12]{3,2,1,0} parameter(1)
  ROOT %multiply.1 = bf16[2,8,8,12]{3,2,1,0} multiply(%param_0.2, %param_1.2)
}

%command_buffer (p0: bf16[2,8,8,12]) -> bf16[2,8,8,12] {
  %p0 = bf16[2,8,8,12]{3,2,1,0} parameter(0)
  %loop_maximum_fusion = bf16[2,8,8,12]{3,2,1,0} fusion(%p0), kind=kLoop, calls=%fused_relu
  ROOT %loop_multiply_fusion = bf16[2,8,8,12]{3,2,1,0} fusion(%loop_maximum_fusion, %p0), kind=kLoop, calls=%fused_mul
}

ENTRY %main.9 (x.1: bf16[2,16,16,8], w.1: bf16[12,3,3,8]) -> (bf16[2,16,16,8], bf16[12,3,3,8]) {
  %x.1 = bf16[2,16,16,8]{3,2,1,0} parameter(0)
  %w.1 = bf16[12,3,3,8]{3,2,1,0} parameter(1)
  %cudnn-conv.1 = (bf16[2,8,8,12]{3,2,1,0}, u8[0]{0}) custom-call(%x.1, %w.1), window={size=3x3 stride=2x2 pad=0_1x0_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="jit(step)/jvp()/conv_general_dilated"}
  %get-tuple-element.1 = bf16[2,8,8,12]{3,2,1,0} get-tuple-element(%cudnn-conv.1), index=0
  %call.1 = bf16[2,8,8,12]{3,2,1,0} call(%get-tuple-element.1), to_apply=%command_buffer
  %cudnn-conv-bw-input.1 = (bf16[2,16,16,8]{3,2,1,0}, u8[16]{0}) custom-call(%call.1, %w.1), window={size=3x3 stride=2x2 pad=0_1x0_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardInput", metadata={op_name="jit(step)/transpose(jvp())/conv_general_dilated"}
  %get-tuple-element.2 = bf16[2,16,16,8]{3,2,1,0} get-tuple-element(%cudnn-conv-bw-input.1), index=0
  %cudnn-conv-bw-filter.1 = (bf16[12,3,3,8]{3,2,1,0}, u8[16]{0}) custom-call(%x.1, %call.1), window={size=3x3 stride=2x2 pad=0_1x0_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardFilter", metadata={op_name="jit(step)/transpose(jvp())/conv_general_dilated"}
  %get-tuple-element.3 = bf16[12,3,3,8]{3,2,1,0} get-tuple-element(%cudnn-conv-bw-filter.1), index=0
  ROOT %tuple.1 = (bf16[2,16,16,8]{3,2,1,0}, bf16[12,3,3,8]{3,2,1,0}) tuple(%get-tuple-element.2, %get-tuple-element.3)
}
"""
FORWARD_FLOPS = 2 * (2 * 8 * 8 * 12) * (3 * 3 * 8)
DEVICE, HOST, STREAM, MODULES = 1, 2, 7, 8


def kernel(ts, dur, op, module="jit_step"):
    return {"ph": "X", "pid": DEVICE, "tid": STREAM, "ts": ts, "dur": dur, "name": f"k_{op}",
            "args": {"hlo_op": op, "hlo_module": module}}


def trace_events(with_unknown=True):
    meta = [{"ph": "M", "name": "process_name", "pid": DEVICE, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": HOST, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "thread_name", "pid": DEVICE, "tid": STREAM,
             "args": {"name": "Stream #7(Compute)"}},
            {"ph": "M", "name": "thread_name", "pid": DEVICE, "tid": MODULES,
             "args": {"name": "XLA Modules"}}]
    step = [kernel(0, 30, "cudnn-conv.1"),
            kernel(30, 10, "call.1"),  # the command buffer launch, over its two kernels
            kernel(31, 4, "loop_maximum_fusion"), kernel(35, 5, "loop_multiply_fusion"),
            kernel(40, 30, "cudnn-conv-bw-input.1"), kernel(70, 40, "cudnn-conv-bw-filter.1"),
            {"ph": "X", "pid": DEVICE, "tid": STREAM, "ts": 110, "dur": 2, "name": "MemcpyD2D",
             "args": {}},
            kernel(120, 50, "fusion.77", module="jit_other"),  # another program
            {"ph": "X", "pid": DEVICE, "tid": MODULES, "ts": 0, "dur": 112, "name": "jit_step",
             "args": {"hlo_module": "jit_step"}},  # derived: spans the step
            {"ph": "X", "pid": HOST, "tid": 1, "ts": 0, "dur": 200, "name": "PjitFunction",
             "args": {}}]
    if with_unknown:
        step.append(kernel(112, 3, "input_reduce_fusion.9"))
        step.append(kernel(36, 1, "multiply.1"))  # inside loop_multiply_fusion's event
    return meta + step


def test_gpu_like_trace_every_op_matched_or_explained():
    hlo = profile_summary.parse_hlo(HLO)
    table = profile_summary.op_table(hlo)
    assert {table[n]["category"] for n in ("cudnn-conv.1", "cudnn-conv-bw-input.1",
                                           "cudnn-conv-bw-filter.1")} == {
        "conv fwd", "conv dgrad", "conv wgrad"}
    for n in ("cudnn-conv.1", "cudnn-conv-bw-input.1", "cudnn-conv-bw-filter.1"):
        assert table[n]["flops"] == FORWARD_FLOPS, n
    # kernels inside the command buffer are ops of their own
    assert table["loop_multiply_fusion"]["category"] == "elementwise fusion"
    assert table["call.1"]["inside"] == ["loop_maximum_fusion", "loop_multiply_fusion"]

    text, data = profile_summary.summarize(trace_events(), hlo)
    # op time: the convolutions and the two kernels, not the command buffer's launch over them
    assert data["op_time_s"] == pytest.approx((30 + 4 + 5 + 30 + 40) * 1e-6)
    assert data["categories_s"]["elementwise fusion"] == pytest.approx(9e-6)
    assert data["unmatched_by_reason_s"] == pytest.approx({
        "its name is not an instruction of the HLO": 3e-6,
        "no hlo_op (copy, memset or library kernel)": 2e-6})
    assert data["unmatched_share"] == pytest.approx(5 / 114)
    assert data["other_modules_s"] == pytest.approx({"jit_other": 50e-6})
    assert data["inside_fusions_s"] == pytest.approx(1e-6)
    # busy covers every op of the program, matched or not; the derived line is not an op
    assert data["busy_s"] == pytest.approx(114e-6) and data["wall_s"] == pytest.approx(115e-6)
    wgrad = next(r for r in data["ops"] if r["op"] == "cudnn-conv-bw-filter.1")
    assert wgrad["tflops_per_s"] == pytest.approx(FORWARD_FLOPS / 40e-6 / 1e12)
    assert "input_reduce_fusion.9" in text and "MemcpyD2D" in text


def test_command_buffer_traced_as_one_launch_keeps_its_time():
    """When the trace shows only the command buffer (not its kernels), its time stays in."""
    events = [e for e in trace_events(with_unknown=False)
              if (e.get("args") or {}).get("hlo_op") not in ("loop_maximum_fusion",
                                                              "loop_multiply_fusion")]
    _, data = profile_summary.summarize(events, profile_summary.parse_hlo(HLO))
    assert data["categories_s"]["container"] == pytest.approx(10e-6)
    assert data["unmatched_by_reason_s"] == pytest.approx(
        {"no hlo_op (copy, memset or library kernel)": 2e-6})


def test_summary_from_a_trace_directory(tmp_path):
    run = tmp_path / "plugins" / "profile" / "2026_12_04"
    run.mkdir(parents=True)
    with gzip.open(run / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": trace_events()}, f)
    events = profile_summary.load_trace(str(tmp_path))
    text, _ = profile_summary.summarize(events, profile_summary.parse_hlo(HLO))
    assert text.startswith("module jit_step:") and "conv wgrad" in text
    with pytest.raises(FileNotFoundError, match="no \\*.trace.json.gz"):
        profile_summary.load_trace(str(tmp_path / "plugins" / "none"))


def test_categories_beside_the_roofline_bound():
    """Measured ms per step (over the traced steps) beside the bound, in the roofline's names."""
    text = profile_summary.compare_with_roofline(
        {"conv wgrad": 6e-3, "elementwise fusion": 3e-3, "container": 1.0},
        {"conv wgrad": 1e-3, "elementwise": 2e-3, "pooling": 1e-3}, steps=3)
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[1:]}
    assert rows["conv"] == ["wgrad", "2.000", "1.000", "2.00"]
    assert rows["elementwise"] == ["1.000", "2.000", "0.50"]
    assert rows["pooling"][-3:] == ["0.000", "1.000", "0.00"]


def test_loop_bodies_and_branches_are_launched_computations():
    """A while loop's condition and body (threefry's loops on the CPU) and a conditional's branches
    run their instructions as ops of their own."""
    called = profile_summary._called
    assert called({"rest": "%t.1), condition=%cond.2, body=%body.3, metadata={op_name=\"x\"}"}) == [
        "cond.2", "body.3"]
    assert called({"rest": "%p), branch_computations={%a.1, %b.2}, metadata={}"}) == ["a.1", "b.2"]
