"""Mesh construction, host->global batch placement and sharded init on 8 virtual CPU devices."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcssl import sharding


def test_mesh_spans_all_devices_with_data_and_model_axes():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data", "model")
    assert dict(mesh.shape) == {"data": 8, "model": 1}
    assert dict(sharding.make_mesh(model_parallelism=2).shape) == {"data": 4, "model": 2}
    assert dict(sharding.make_mesh(devices=jax.devices()[:2]).shape) == {"data": 2, "model": 1}
    with pytest.raises(ValueError, match="model_parallelism=3"):
        sharding.make_mesh(model_parallelism=3)


def test_host_batch_becomes_global_array_sharded_on_data():
    mesh = sharding.make_mesh()
    host = {
        "aerial": np.arange(16 * 4 * 4 * 3, dtype=np.uint8).reshape(16, 4, 4, 3),
        "label": np.arange(16 * 4 * 4, dtype=np.int32).reshape(16, 4, 4),
    }
    batch = sharding.host_batch_to_global(host, mesh)
    for name, x in batch.items():
        assert x.shape == host[name].shape  # one process: global batch = host batch
        assert x.dtype == host[name].dtype
        assert x.sharding.is_equivalent_to(sharding.data_sharding(mesh), x.ndim)
        np.testing.assert_array_equal(np.asarray(x), host[name])
        # Two rows per device, each device holding its own contiguous slice.
        for shard in x.addressable_shards:
            assert shard.data.shape[0] == 2
            np.testing.assert_array_equal(np.asarray(shard.data), host[name][shard.index])


def test_indivisible_batch_error_names_both_numbers():
    mesh = sharding.make_mesh()
    with pytest.raises(ValueError, match=r"global batch \(12\).*data devices \(8"):
        sharding.host_batch_to_global({"aerial": np.zeros((12, 2), np.float32)}, mesh)
    with pytest.raises(ValueError, match="disagree"):
        sharding.host_batch_to_global(
            {"aerial": np.zeros((8, 2)), "label": np.zeros((16, 2))}, mesh)


def test_init_sharded_creates_replicated_state_equal_to_plain_init():
    mesh = sharding.make_mesh()
    model = nn.Dense(3)
    x = jnp.ones((2, 5))

    def init(rng):
        return model.init(rng, x)

    rng = jax.random.key(0)
    state = sharding.init_sharded(init, mesh, rng)
    expected = init(rng)
    for leaf, ref in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
        assert leaf.sharding.is_equivalent_to(sharding.replicated(mesh), leaf.ndim)
        assert len(leaf.sharding.device_set) == 8
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(ref), rtol=1e-6)
