"""Model FLOPs from the jaxpr (lcssl.flops): known answers for convolutions and matmuls, their
gradients, loops, branches and shard_map; the count does not depend on how the batch is sharded."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcssl import flops, gradcache, losses, sharding


def conv(x, w, stride=1):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_convolution_counts_two_flops_per_multiply_add():
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    assert flops.count_flops(conv, x, w).conv == 2 * (2 * 8 * 8 * 4) * (3 * 3 * 3)
    # stride 2: a quarter of the outputs
    assert flops.count_flops(functools.partial(conv, stride=2), x, w).total == 2 * (2 * 4 * 4 * 4) * 27


def test_grouped_convolution_reads_input_features_per_group():
    x, w = jnp.ones((1, 8, 8, 6)), jnp.ones((3, 3, 2, 6))  # 3 groups of 2 input features
    f = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=3)
    assert flops.count_flops(f, x, w).total == 2 * (8 * 8 * 6) * (3 * 3 * 2)


def test_matmul_and_its_gradient():
    a, b = jnp.ones((5, 7)), jnp.ones((7, 3))
    forward = 2 * 5 * 7 * 3
    assert flops.count_flops(jnp.matmul, a, b).dot == forward
    # backward: one matmul for each operand's gradient
    grads = jax.grad(lambda a, b: jnp.sum(a @ b), argnums=(0, 1))
    assert flops.count_flops(grads, a, b).dot == 3 * forward


@pytest.mark.parametrize("stride", [1, 2])
def test_convolution_gradient_is_three_forward_passes(stride):
    """Forward + input gradient + kernel gradient; with stride 2 the input gradient is a
    transposed convolution whose inserted zeros are not counted."""
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    f = functools.partial(conv, stride=stride)
    forward = flops.count_flops(f, x, w).total
    grads = jax.grad(lambda x, w: jnp.sum(f(x, w)), argnums=(0, 1))
    assert flops.count_flops(grads, x, w).total == 3 * forward


def test_scan_counts_every_trip_and_cond_its_costliest_branch():
    w = jnp.ones((4, 4))
    one = 2 * 4 * 4 * 4

    def scanned(xs):
        return jax.lax.scan(lambda c, x: (c + x @ w, None), jnp.zeros((4, 4)), xs)[0]

    assert flops.count_flops(scanned, jnp.ones((6, 4, 4))).total == 6 * one
    assert flops.count_flops(lambda xs: jax.lax.map(lambda x: x @ w, xs), jnp.ones((5, 4, 4))).total == 5 * one

    def branchy(x, p):
        return jax.lax.cond(p, lambda: x @ w @ w, lambda: x)

    assert flops.count_flops(branchy, jnp.ones((4, 4)), True).total == 2 * one


def test_while_loop_is_flagged_not_guessed():
    w = jnp.ones((4, 4))
    f = lambda x: jax.lax.while_loop(lambda c: c[1] < 3, lambda c: (c[0] @ w, c[1] + 1), (x, 0))[0]
    count = flops.count_flops(f, jnp.ones((4, 4)))
    assert count.unknown_trip_loops == 1 and count.total == 2 * 4 * 4 * 4


def test_remat_counts_the_recomputation_apart_from_model_flops():
    w = jnp.ones((16, 16))
    block = lambda x: jnp.tanh(x @ w)
    plain = jax.grad(lambda x: jnp.sum(block(x)))
    remat = jax.grad(lambda x: jnp.sum(jax.checkpoint(block)(x)))
    x = jnp.ones((8, 16))
    count, reference = flops.count_flops(remat, x), flops.count_flops(plain, x)
    assert count.total == reference.total + 2 * 8 * 16 * 16
    assert count.recomputed == 2 * 8 * 16 * 16 and reference.recomputed == 0
    assert count.model == reference.model == reference.total


def test_gradcache_second_forward_is_recomputation_not_model_flops():
    """GradCache runs the encoder forward twice; the model FLOPs are those of plain
    value_and_grad on the whole batch, the hardware's one forward more."""
    w1, w2 = jnp.ones((6, 16)), jnp.ones((16, 4))
    params = {"w1": w1, "w2": w2}
    embed = lambda p, x: (jnp.tanh(x @ p["w1"]) @ p["w2"], None)
    loss = lambda z: (jnp.sum(z ** 2), None)
    x = jnp.ones((8, 6))
    cached = flops.count_flops(
        lambda p: gradcache.grad_cached_value_and_grad(embed, p, x, loss, num_chunks=4), params)
    plain = flops.count_flops(jax.value_and_grad(lambda p: loss(embed(p, x)[0])[0]), params)
    forward = 2 * 8 * 6 * 16 + 2 * 8 * 16 * 4
    assert cached.total == plain.total + forward
    assert cached.recomputed == forward and cached.model == plain.model == plain.total


def test_peak_of_the_dtype_run_and_the_form_factor():
    """Device kinds as jax reports them (the CUDA device name): the PCIe H100 is not the SXM one,
    and a float32 step (TF32 on the tensor cores) has half the bf16 peak."""
    sxm, pcie = flops.peak_flops("NVIDIA H100 80GB HBM3"), flops.peak_flops("NVIDIA H100 PCIe")
    assert sxm == 989e12 and pcie == 756e12
    assert flops.peak_flops("NVIDIA H100 80GB HBM3", "float32") == sxm / 2
    assert flops.peak_flops("NVIDIA H100 NVL") == 835e12
    assert flops.peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert flops.peak_flops("TPU v4", "float32") is None
    assert flops.peak_flops("cpu") is None
    assert flops.peak_flops("NVIDIA H200", "float16") is None  # no table entry: no MFU claimed


def test_sharded_blockwise_loss_counts_the_global_work():
    """The shard_map path runs 1/8 of the tiles on each of 8 devices: x 8 gives the global count,
    equal to the unsharded program's (same tiles, same recomputation)."""
    mesh = sharding.make_mesh()
    assert mesh.shape["data"] == 8
    rng = np.random.default_rng(0)
    z1, z2 = (jnp.asarray(rng.normal(size=(32, 16)), jnp.float32) for _ in range(2))
    loss = functools.partial(losses.nt_xent_blockwise, temperature=0.1, block_size=16)
    single = flops.count_flops(jax.grad(loss, argnums=(0, 1)), z1, z2).total
    z1s, z2s = (jax.device_put(z, sharding.data_sharding(mesh)) for z in (z1, z2))
    sharded = flops.count_flops(jax.jit(jax.grad(functools.partial(loss, mesh=mesh), argnums=(0, 1))),
                                z1s, z2s).total
    assert single > 0
    assert sharded == pytest.approx(single, rel=1e-6)


def test_close_to_xla_on_a_conv_net():
    """XLA's CPU cost analysis also counts elementwise work, so it is a little above ours on a conv
    net that is almost all convolution. It also leaves out the window taps that fall on padding,
    which we count as the hardware does them: so a forward pass with VALID padding to compare (the
    input gradient of a VALID convolution is a padded one)."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            for width in (16, 32, 32):
                x = nn.relu(nn.Conv(width, (3, 3), padding="VALID")(x))
            return nn.Dense(10)(x.mean((1, 2)))

    net = Net()
    x = jnp.ones((2, 32, 32, 3))
    params = net.init(jax.random.key(0), x)
    step = jax.jit(net.apply)
    ours = flops.count_flops(step, params, x).total
    cost = step.lower(params, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert ours <= cost["flops"] <= 1.05 * ours
