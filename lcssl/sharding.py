"""The one place where devices, meshes and shardings are decided.

One `Mesh` with axes ('data', 'model') spans every device of every process. Batches are sharded on
'data' along their leading axis; the training state is replicated for now, and `state_shardings` is
the single rule to change when parameters get a 'model' axis. Everything else just calls `jax.jit`
on arrays that already carry these shardings (no pmap).

    host batch  {name: np.ndarray [b, ...]}   per-host share, b = B / process_count
      --host_batch_to_global-->  {name: jax.Array [B, ...]}  sharded P('data')
      --to_host-->  np.ndarray [B, ...] whole on every host (results, metrics)
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
MODEL_AXIS = "model"


def make_mesh(model_parallelism: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh of shape (num_devices / model_parallelism, model_parallelism), axes ('data', 'model').

    `devices` defaults to `jax.devices()`: all devices of all processes. Both axes are `Auto`, so XLA
    propagates shardings from the inputs and `with_sharding_constraint` hints.
    """
    devices = list(jax.devices() if devices is None else devices)
    if model_parallelism < 1 or len(devices) % model_parallelism:
        raise ValueError(
            f"model_parallelism={model_parallelism} must be >= 1 and divide the number of devices "
            f"({len(devices)})."
        )
    shape = (len(devices) // model_parallelism, model_parallelism)
    # jax.make_mesh orders devices for the physical topology (rings on TPU); it defaults to Explicit
    # axes, and we want sharding propagation, hence Auto.
    return jax.make_mesh(shape, (DATA_AXIS, MODEL_AXIS), axis_types=(AxisType.Auto,) * 2,
                         devices=devices)


def num_data_shards(mesh: Mesh) -> int:
    """How many ways the batch is split: the size of the 'data' axis."""
    return mesh.shape[DATA_AXIS]


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data'; other axes whole on each device."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device."""
    return NamedSharding(mesh, P())


def check_batch_divisible(global_batch: int, mesh: Mesh, what: str = "global batch") -> None:
    """Raise a ValueError naming both numbers unless the batch splits evenly over 'data'."""
    shards = num_data_shards(mesh)
    if global_batch % shards:
        raise ValueError(
            f"The {what} ({global_batch}) is not divisible by the number of data devices "
            f"({shards} = mesh axis '{DATA_AXIS}'); choose a batch size that is a multiple of {shards}."
        )


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-host numpy batch {name: [b, ...]} -> global jax.Arrays {name: [b * processes, ...]}.

    Each process passes its own share; `jax.make_array_from_process_local_data` places the rows on
    this host's devices so that the global array is sharded on 'data' along axis 0.
    """
    sizes = {name: np.shape(x)[0] for name, x in batch.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"Host batch fields disagree on the leading (batch) size: {sizes}.")
    if not sizes:
        return {}
    local_batch = next(iter(sizes.values()))
    check_batch_divisible(local_batch * jax.process_count(), mesh)
    sharding = data_sharding(mesh)
    return {
        name: jax.make_array_from_process_local_data(sharding, np.asarray(x))
        for name, x in batch.items()
    }


def to_host(x: jax.Array) -> np.ndarray:
    """A global jax.Array -> numpy on every host (replicated: local copy; sharded: all-gather)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """Sharding of every leaf of the state: replicated today.

    This is the one rule to extend for model parallelism (e.g. split large kernels on 'model' by
    path or shape); `init_sharded` and checkpoint restore both read it.
    """
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def init_sharded(init_fn: Callable[..., Any], mesh: Mesh, *args: Any) -> Any:
    """Run `init_fn(*args)` under jit so that the state is created already laid out on the mesh.

    The state never exists whole on one device first; its leaves come out with `state_shardings`.
    """
    abstract = jax.eval_shape(init_fn, *args)
    return jax.jit(init_fn, out_shardings=state_shardings(abstract, mesh))(*args)
