"""Comparing one computation across device counts and code paths: in float64.

Sharding (or tiling, or chunking) a computation changes the order of its floating-point sums:
batch-norm statistics, gradients summed over the batch, a loss's mean. In float32 the resulting
differences have no bound that holds on every CPU: a gradient whose exact value is ~0 (a bias
feeding a batch norm) is a sum of large terms that cancel, so its rounding error scales with the
terms, and how the terms are blocked depends on the CPU's vector width and the batch per device. A
tolerance measured on one machine failed on another.

So these tests run both sides in float64 (jax's x64 mode scoped to the test: the `x64` fixture of
tests/conftest.py; the model in dtype 'float64' with float64 params; the losses compute in their
inputs' dtype). A computed value's rounding error is then bounded by ~n x 1.1e-16 of the terms
it sums, not of the value (a gradient that cancels to 0 keeps ~1e-17 of noise), and the terms
of an entry are of the size of the large entries of the same quantity (the other gradients, the
other outputs). So each array may differ by RTOL64 = 1e-9 of the largest |entry| of the tree it is
compared in, whatever the CPU. Measured (2026-12-04, x86 CPU): at most 5e-14 of the scale for
the tiny U-T&T's gradients sharded vs not, 3e-16 for the losses, GradCache and accumulation;
real errors (per-device batch statistics and loss, a wrong self-mask, a per-device loss mean,
chunk gradients averaged) changed values by 0.05 to 5. Quantities of very different size (a loss,
the outputs, batch statistics, a deep network's gradients) are compared as separate trees.
"""
import contextlib

import jax
import numpy as np

RTOL64 = 1e-9
# For bounds on a few float32 roundings (e.g. one update of float32 weights), not on sums.
F32_EPS = float(np.finfo(np.float32).eps)


@contextlib.contextmanager
def float64():
    """jax's x64 mode for the enclosed code only: float64 arrays stay float64."""
    with jax.enable_x64(True):
        yield


def as_float64(tree):
    """Every floating array of a pytree (params, batch stats, inputs) as float64; others unchanged."""
    def cast(x):
        x = np.asarray(x)
        return x.astype(np.float64) if np.issubdtype(x.dtype, np.floating) else x
    return jax.tree.map(cast, tree)


def assert_trees_close(got, want, what: str = "", rtol: float = RTOL64) -> None:
    """got == want up to rtol x the largest |entry| of all of want's floating leaves; these must be
    float64 (a comparison that silently ran in float32 would need float32 tolerances: it fails)."""
    paths_want, tree = jax.tree_util.tree_flatten_with_path(want)
    flat_got, tree_got = jax.tree.flatten(got)
    assert tree == tree_got, f"{what}: tree structures differ"
    floats = [np.abs(np.asarray(w)).max() for _, w in paths_want
              if np.issubdtype(np.asarray(w).dtype, np.floating) and np.size(w)]
    scale = max(floats, default=0.0)
    for (path, w), g in zip(paths_want, flat_got):
        name = f"{what}{jax.tree_util.keystr(path)}"
        w, g = np.asarray(w), np.asarray(g)
        if not np.issubdtype(w.dtype, np.floating):
            np.testing.assert_array_equal(g, w, err_msg=name)
            continue
        assert w.dtype == g.dtype == np.float64, f"{name}: {g.dtype} vs {w.dtype}, not float64"
        np.testing.assert_allclose(g, w, rtol=0, atol=rtol * scale, err_msg=name)
