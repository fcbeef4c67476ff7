"""lcssl.models.ops computes what the plain layers compute, forward and gradients.

Exactness is checked in float64 (jax's x64 mode, for these tests only): both forms are then the
same real-number function evaluated with different association, so they agree to a few hundred
float64 roundings (rtol 1e-10, against ~1e-13 expected). The bf16 resampling is checked against
its fp32 form with the rounding bound of bf16 arithmetic."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcssl.models import fusion, ops

RTOL64 = 1e-10


def _close(a, b, rtol=RTOL64):
    a, b = np.asarray(a), np.asarray(b)
    scale = max(np.abs(b).max(), 1e-30)
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * scale)


def _reference_upsample_conv(x, skip, kernel):
    u = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if skip is not None:
        u = jnp.concatenate([u, skip], axis=-1)
    return jax.lax.conv_general_dilated(u, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("with_skip", [False, True])
def test_upsample_conv_equals_upsample_then_conv(x64, with_skip):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 6, 3)))  # odd sizes: every border phase is exercised
    skip = jnp.asarray(rng.normal(size=(2, 10, 12, 2))) if with_skip else None
    module = ops.UpsampleConcatConv(4, dtype=jnp.float64)
    params = module.init(jax.random.key(0), x, skip)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3 + (2 if with_skip else 0), 4)))
    params = {"params": {"kernel": kernel}}
    cot = jnp.asarray(rng.normal(size=(2, 10, 12, 4)))

    def fast(x, skip, kernel):
        return jnp.vdot(module.apply({"params": {"kernel": kernel}}, x, skip), cot)

    def ref(x, skip, kernel):
        return jnp.vdot(_reference_upsample_conv(x, skip, kernel), cot)

    _close(module.apply(params, x, skip), _reference_upsample_conv(x, skip, kernel))
    argnums = (0, 1, 2) if with_skip else (0, 2)
    for g_fast, g_ref in zip(jax.grad(fast, argnums)(x, skip, kernel),
                             jax.grad(ref, argnums)(x, skip, kernel)):
        _close(g_fast, g_ref)


def test_upsample_conv_does_four_ninths_of_the_multiply_adds():
    from lcssl import flops
    x = jax.ShapeDtypeStruct((1, 16, 16, 8), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 8, 4), jnp.float32)
    fast = flops.count_flops(ops.upsample_conv3x3, x, w).conv
    ref = flops.count_flops(lambda x, w: _reference_upsample_conv(x, None, w), x, w).conv
    # 4 of 9 taps, on the (16 + 1)^2 positions of the padded input's 2x2 windows.
    assert fast == ref * 4 / 9 * (17 * 17) / (16 * 16)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_act_equals_flax_batch_norm_then_relu(x64, with_residual, train):
    rng = np.random.default_rng(1)
    c = 5
    x = jnp.asarray(rng.normal(2.0, 3.0, size=(4, 6, 6, c)))
    res = jnp.asarray(rng.normal(size=x.shape)) if with_residual else None
    variables = {"params": {"scale": jnp.asarray(rng.normal(size=c)),
                            "bias": jnp.asarray(rng.normal(size=c))},
                 "batch_stats": {"mean": jnp.asarray(rng.normal(size=c)),
                                 "var": jnp.asarray(rng.uniform(0.5, 2.0, size=c))}}
    cot = jnp.asarray(rng.normal(size=x.shape))
    fused = ops.BatchNormAct(not train, momentum=0.9, dtype=jnp.float64)
    plain = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         dtype=jnp.float64)

    def run_fused(params, x, res):
        y, upd = fused.apply({**variables, "params": params}, x, res, mutable=["batch_stats"])
        return jnp.vdot(y, cot), (y, upd)

    def run_plain(params, x, res):
        y, upd = plain.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        y = nn.relu(y + res) if res is not None else nn.relu(y)
        return jnp.vdot(y, cot), (y, upd)

    argnums = (0, 1, 2) if with_residual else (0, 1)
    (_, (y_f, upd_f)), g_f = jax.value_and_grad(run_fused, argnums, has_aux=True)(
        variables["params"], x, res)
    (_, (y_p, upd_p)), g_p = jax.value_and_grad(run_plain, argnums, has_aux=True)(
        variables["params"], x, res)
    _close(y_f, y_p)
    for name in ("mean", "var"):
        _close(upd_f["batch_stats"][name], upd_p["batch_stats"][name])
    for a, b in zip(jax.tree.leaves(g_f), jax.tree.leaves(g_p)):
        _close(a, b)


def test_batch_norm_act_statistics_outputs_have_exact_gradients(x64):
    """The batch mean and variance are outputs too; a loss on them differentiates exactly."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(3, 4, 4, 2)))
    scale, bias = jnp.ones(2), jnp.zeros(2)

    def fused(x):
        _, mean, var = ops.bn_act_train(x, scale, bias, None, 1e-5)
        return jnp.sum(mean * jnp.array([1.0, -2.0])) + jnp.sum(var * jnp.array([0.5, 3.0]))

    def plain(x):
        mean = jnp.mean(x, (0, 1, 2))
        var = jnp.mean(jnp.square(x), (0, 1, 2)) - jnp.square(mean)
        return jnp.sum(mean * jnp.array([1.0, -2.0])) + jnp.sum(var * jnp.array([0.5, 3.0]))

    _close(jax.grad(fused)(x), jax.grad(plain)(x))


@pytest.mark.slow
def test_low_precision_resample_within_bf16_rounding_of_the_fp32_one():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.bfloat16)
    for footprint, out in ((5.12, 32), (5.12, 4), (5.12, 2)):  # up- and antialiased downsampling
        ref = fusion.footprint_resize(x.astype(jnp.float32), footprint, (out, out))
        low = ops.footprint_resize_lowp(x, footprint, (out, out))
        assert low.dtype == jnp.bfloat16 and low.shape == ref.shape
        # Same weights: the fp32 op's response to |x| bounds every partial sum.
        mh = ops._resample_matrix(8, out, out / footprint, -out / footprint * (8 - footprint) / 2)
        taps = int((np.abs(np.asarray(mh)) > 0).sum(1).max())
        bound = fusion.footprint_resize(jnp.abs(x).astype(jnp.float32), footprint, (out, out))
        # Four roundings to bf16, each at most u = 2^-8 relative to a partial result bounded by
        # the response to |x|: the two weight vectors, the row pass and the output (x is already
        # bf16); fp32 accumulation adds taps * 2^-24; (1 + 8u) covers the products of roundings.
        u = 2.0 ** -8
        tol = (4 * u + taps * 2.0 ** -24) * (1 + 8 * u) * np.asarray(bound)
        assert np.all(np.abs(np.asarray(low, np.float32) - np.asarray(ref)) <= tol)


def _same_block(plain, fast, *inputs):
    """Same variables, outputs, batch-statistics updates and gradients (params and inputs)."""
    variables = plain.init(jax.random.key(0), *inputs)
    assert (jax.tree.structure(fast.init(jax.random.key(0), *inputs))
            == jax.tree.structure(variables))
    rng = np.random.default_rng(5)
    variables = jax.tree.map(lambda v: jnp.asarray(rng.uniform(0.5, 1.5, v.shape)), variables)

    def run(module, params, *inputs):
        y, upd = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                              *inputs, mutable=["batch_stats"])
        return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), (y, upd)

    argnums = tuple(range(len(inputs) + 1))
    (_, out_p), g_p = jax.value_and_grad(lambda *a: run(plain, *a), argnums, has_aux=True)(
        variables["params"], *inputs)
    (_, out_f), g_f = jax.value_and_grad(lambda *a: run(fast, *a), argnums, has_aux=True)(
        variables["params"], *inputs)
    for a, b in zip(jax.tree.leaves((out_f, g_f)), jax.tree.leaves((out_p, g_p))):
        _close(a, b)


@pytest.mark.parametrize("with_skip", [False, True])
def test_decoder_block_with_the_fast_forms_equals_the_plain_one(x64, with_skip):
    from lcssl.models.unet import DecoderBlock
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(2, 3, 4, 6)))
    inputs = (x, jnp.asarray(rng.normal(size=(2, 6, 8, 3)))) if with_skip else (x,)
    plain = DecoderBlock(4, train=True, dtype=jnp.float64)
    _same_block(plain, plain.clone(phase_conv=True, fused_bn_act=True), *inputs)


@pytest.mark.parametrize("strides", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_basic_block_with_fused_bn_act_equals_the_plain_one(x64, strides):
    from lcssl.models.unet import BasicBlock
    x = jnp.asarray(np.random.default_rng(7).normal(size=(2, 6, 6, 4)))
    plain = BasicBlock(4 * strides, strides, train=True, dtype=jnp.float64)
    _same_block(plain, plain.clone(fused_bn_act=True), x)


def test_utt_param_tree_is_the_same_with_every_fast_form():
    from lcssl import models
    cfg = models.tiny_config()
    plain = models.build_model(cfg)
    fast = plain.clone(decoder_phase_conv=True, fused_bn_act=True, low_precision_resample=True)
    shapes = [jax.tree.map(lambda v: (v.shape, v.dtype), jax.eval_shape(
        lambda m=m: m.init(jax.random.key(0), *models.dummy_inputs(cfg), train=False)))
        for m in (plain, fast)]
    assert shapes[0] == shapes[1]
