"""Tolerances for "sharded equals single-device" tests, derived from the numerics of the program.

Sharding a computation changes only the order in which float32 sums are taken (batch-norm
statistics, gradients summed over the batch, the loss mean). Such differences are not bounded by a
fixed rtol/atol: a gradient whose exact value is ~0 (a bias feeding a batch norm) is a sum of large
terms that cancel, and its rounding error scales with the terms, not with the result; and how large
it is depends on the CPU's vector width. So each test measures the program's own sensitivity to the
summation order on the machine it runs on: it reruns the single-device computation on the batch in
another order (mathematically the same result, other rounding), and allows `factor` times the
largest change that caused in each array, plus a floor of a few float32 ulps of the array's
magnitude. A real error (per-device batch statistics, missing negatives) changes the values at
their own scale, orders of magnitude above that.
"""
import jax
import numpy as np

F32_EPS = float(np.finfo(np.float32).eps)


def reorder_tolerances(reference, reordered, factor: float = 16.0, floor_ulps: float = 8.0):
    """Per-leaf atol: factor x max |reference - reordered| + floor_ulps x eps x max |reference|."""
    def tol(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = np.abs(a).max() if a.size else 0.0
        return factor * (np.abs(a - b).max() if a.size else 0.0) + floor_ulps * F32_EPS * scale
    return jax.tree.map(tol, reference, reordered)


def assert_trees_close(got, want, atols, what: str = "") -> None:
    paths_want, tree = jax.tree_util.tree_flatten_with_path(want)
    flat_got, tree_got = jax.tree.flatten(got)
    assert tree == tree_got, f"{what}: tree structures differ"
    for (path, w), g, atol in zip(paths_want, flat_got, jax.tree.leaves(atols)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=atol,
                                   err_msg=f"{what}{jax.tree_util.keystr(path)}")
