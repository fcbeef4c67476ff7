"""Window planning and the blender, pure numpy: the blended map is the weighted mean of the
windows' logits, and it does not depend on how the mosaic is cut into column blocks."""
import numpy as np
import pytest

from lcssl.predict.blend import Blender
from lcssl.predict.windows import Plan, Window, hann_weight, window_starts


def test_windows_cover_the_mosaic_and_the_last_is_flush():
    assert window_starts(100, 32, 24) == [0, 24, 48, 68]
    assert window_starts(20, 32, 24) == [0]
    plan = Plan.make(100, 40, 32, overlap=0.25)
    assert plan.stride == 24 and plan.ys == [0, 8]
    for block in plan.blocks(30):
        # every window touching the block's columns, row by row
        assert all(w.x < block.x1 and w.x + 32 > block.x0 for w in block.windows)
        assert [w.y for w in block.windows] == sorted(w.y for w in block.windows)
    assert {w for b in plan.blocks(30) for w in b.windows} == {
        Window(x, y) for y in plan.ys for x in plan.xs}


def test_hann_weights_sum_to_one_at_half_overlap():
    w = hann_weight(16).astype(np.float64)
    v = np.sqrt(np.diag(w))                       # the 1-D profile: w = outer(v, v)
    np.testing.assert_allclose(v[:8] + v[8:], 1.0, atol=1e-6)   # float32 storage
    assert (w > 0).all()


def blend_by_blocks(plan, logits_of, num_classes, block_width):
    weight = hann_weight(plan.win)
    out = np.full((plan.height, plan.width, num_classes), np.nan)
    covered = np.zeros((plan.height, plan.width), bool)
    for block in plan.blocks(block_width):
        blender = Blender(block, plan.win, num_classes, weight)
        rows = []
        for w in block.windows:
            if logits_of(w) is not None:
                rows += blender.add(w, weight[..., None] * logits_of(w), aerial_only=w.x == 0)
        rows += blender.close(plan.height)
        for r in rows:
            h, wd = r.shape
            out[r.y0:r.y0 + h, r.x0:r.x0 + wd] = r.logits
            covered[r.y0:r.y0 + h, r.x0:r.x0 + wd] = r.covered
    return out, covered


def test_blended_rows_are_the_weighted_mean_whatever_the_blocks():
    rng = np.random.default_rng(0)
    plan = Plan.make(70, 50, 16, overlap=0.5)
    table = {Window(x, y): rng.normal(size=(16, 16, 3)) for y in plan.ys for x in plan.xs}
    skipped = Window(plan.xs[1], plan.ys[1])       # e.g. a window without a prediction
    logits_of = lambda w: None if w == skipped else table[w]
    # The reference: a whole-mosaic canvas in float64.
    num = np.zeros((50, 70, 3))
    den = np.zeros((50, 70))
    weight = hann_weight(16).astype(np.float64)
    for w, z in table.items():
        if w != skipped:
            num[w.y:w.y + 16, w.x:w.x + 16] += weight[..., None] * z
            den[w.y:w.y + 16, w.x:w.x + 16] += weight
    want = num / np.where(den > 0, den, 1)[..., None]
    for block_width in (70, 23, 8):
        got, covered = blend_by_blocks(plan, logits_of, 3, block_width)
        assert (covered == (den > 0)).all()
        np.testing.assert_allclose(got, want, atol=1e-5)   # float32 sums of O(1) terms


def test_rows_say_where_aerial_only_windows_contribute():
    plan = Plan.make(40, 16, 16, overlap=0.5)      # windows at x = 0, 8, 16, 24
    block = plan.blocks(40)[0]
    weight = hann_weight(16)
    blender = Blender(block, 16, 2, weight)
    for w in block.windows:
        blender.add(w, weight[..., None] * np.ones((16, 16, 2), np.float32),
                    aerial_only=w.x == 0)
    rows = blender.close(16)
    flag = np.concatenate([r.aerial_only for r in rows])
    assert flag[:, :16].all() and not flag[:, 16:].any()
    with pytest.raises(ValueError, match="row by row"):
        blender.add(Window(0, 0), np.zeros((16, 16, 2), np.float32))
