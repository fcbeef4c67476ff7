"""bench/roofline.py: known-answer FLOPs and bytes for a convolution and a batch norm, categories of
the backward convolutions, and model totals equal to lcssl.flops'."""
import importlib.util
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from lcssl import flops, models

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("roofline", ROOT / "bench" / "roofline.py")
roofline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(roofline)

B, H, CI, CO, K = 2, 16, 8, 12, 3


def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_single_conv_forward_known_answer():
    x = jax.ShapeDtypeStruct((B, H, H, CI), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((K, K, CI, CO), jnp.bfloat16)
    (kernel,) = roofline.analyze(conv, x, w)
    assert kernel.category == "conv fwd" and not kernel.backward
    assert kernel.flops == 2 * B * H * H * CO * K * K * CI
    assert kernel.bytes == 2 * (B * H * H * CI + K * K * CI * CO + B * H * H * CO)  # bf16 in + out
    peak, bw = 1e12, 1e9
    assert kernel.bound_s(peak, bw) == max(kernel.flops / peak, kernel.bytes / bw)


def test_conv_backward_passes_are_named_and_cost_the_forward_flops():
    def loss(x, w):
        return jnp.sum(conv(x, w).astype(jnp.float32) ** 2)

    x = jax.ShapeDtypeStruct((B, H, H, CI), jnp.float32)
    w = jax.ShapeDtypeStruct((K, K, CI, CO), jnp.float32)
    kernels = roofline.analyze(jax.grad(loss, argnums=(0, 1)), x, w)
    convs = {k.category: k for k in kernels if k.category.startswith("conv")}
    assert sorted(convs) == ["conv dgrad", "conv fwd", "conv wgrad"]
    fwd = 2 * B * H * H * CO * K * K * CI
    assert all(k.flops == fwd for k in convs.values())
    assert convs["conv dgrad"].backward and convs["conv wgrad"].backward
    # The weight gradient reads the input and the output gradient, writes a kernel (fp32).
    assert convs["conv wgrad"].bytes == 4 * (B * H * H * CI + B * H * H * CO + K * K * CI * CO)


def test_batch_norm_reads_its_input_twice_and_writes_once():
    c, n = 16, B * H * H

    def bn(x):
        return nn.BatchNorm(use_running_average=False).apply(
            {"params": {"scale": jnp.ones(c), "bias": jnp.zeros(c)},
             "batch_stats": {"mean": jnp.zeros(c), "var": jnp.ones(c)}},
            x, mutable=["batch_stats"])

    x = jax.ShapeDtypeStruct((B, H, H, c), jnp.float32)
    kernels = roofline.analyze(bn, x)
    assert sum(k.flops for k in kernels) == 0
    stats = [k for k in kernels if k.category == "reduction" and k.bytes >= 4 * n * c]
    # Mean and mean-square: one multi-output reduction pass over x.
    assert len(stats) == 1
    total = sum(k.bytes for k in kernels)
    big = 4 * n * c * 3  # x read by the statistics pass and the normalization, y written
    # Beside those, only per-channel vectors move: batch stats, scale, bias and their updates,
    # fewer than 32 vectors of c floats read or written.
    assert big <= total < big + 32 * 4 * c


def test_model_totals_agree_with_lcssl_flops():
    cfg = models.tiny_config()
    step, state = roofline.supervised_step(cfg)
    batch = roofline.abstract_batch(cfg, batch=2, dates=3)
    kernels = roofline.analyze(step, *state, batch)
    expected = flops.count_flops(step, *state, batch).total
    # Same eqns, same formulas: only the summation order differs.
    assert sum(k.flops for k in kernels) == pytest.approx(expected, rel=1e-12)
    layers = {k.layer for k in kernels}
    assert "aerial_encoder/stem_conv" in layers and "aerial_decoder/block4/conv2" in layers
    summary = roofline.summarize(kernels, *roofline.CHIPS["h100"])
    assert summary["total"]["bound_s"] == pytest.approx(
        sum(k.bound_s(*roofline.CHIPS["h100"]) for k in kernels), rel=1e-12)
    assert set(summary["categories"]) <= set(roofline.CATEGORIES)


def test_chip_presets_follow_the_device_kind():
    assert roofline.chip_for("NVIDIA H100 80GB HBM3") == "h100"
    assert roofline.chip_for("NVIDIA H200") == "h200"
    assert roofline.chip_for("NVIDIA H100 PCIe") == "h100-pcie"
    assert roofline.CHIPS["h100-pcie"] == (756e12, 2.0e12)
    assert roofline.chip_peak("h200", "float32") == 494.5e12
    assert roofline.chip_for("cpu") is None


def test_profile_summary_parses_a_real_trace(tmp_path):
    """bench/profile_summary.py on a jax.profiler trace made here: convolution passes classified,
    FLOPs read off the compiled HLO, busy time within wall time."""
    spec = importlib.util.spec_from_file_location("profile_summary",
                                                  ROOT / "bench" / "profile_summary.py")
    profile_summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile_summary)

    def loss(x, w):
        return jnp.sum(jax.nn.relu(conv(x, w)) ** 2)

    x, w = jnp.ones((B, H, H, CI)), jnp.ones((K, K, CI, CO))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile()
    jax.block_until_ready(compiled(x, w))
    with jax.profiler.trace(str(tmp_path / "trace")):
        for _ in range(2):
            jax.block_until_ready(compiled(x, w))
    hlo = profile_summary.parse_hlo(compiled.as_text())
    text, data = profile_summary.summarize(profile_summary.load_trace(str(tmp_path / "trace")),
                                           hlo)
    assert {"conv fwd", "conv wgrad"} <= set(data["categories_s"])
    assert 0 < data["busy_s"] <= data["wall_s"] and data["op_time_s"] > 0
    fwd = 2 * B * H * H * CO * K * K * CI
    table = profile_summary.op_table(hlo)
    convs = [v for v in table.values() if v["category"].startswith("conv")]
    assert len(convs) == 3 and all(v["flops"] == fwd for v in convs)
    assert all(row["calls"] == 2 for row in data["ops"] if row["category"].startswith("conv"))
    assert "busy" in text and "conv wgrad" in text
