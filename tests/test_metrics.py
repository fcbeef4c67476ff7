"""Confusion matrix and scores: hand-computed cases, ignore/invalid handling, sharding, clu merge."""
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clu import metrics as clu_metrics
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lcssl import metrics
from lcssl.data.schema import IGNORE_LABEL


def _numpy_cm(pred, label, k, keep=None):
    cm = np.zeros((k, k), np.int64)
    keep = np.ones(label.shape, bool) if keep is None else keep
    for t, p, m in zip(label.ravel(), pred.ravel(), keep.ravel()):
        if m and t != IGNORE_LABEL:
            cm[t, p] += 1
    return cm


def test_confusion_matrix_rows_are_truth_and_ignore_is_skipped():
    label = jnp.array([[0, 0, 1, 2, IGNORE_LABEL, IGNORE_LABEL]])
    pred = jnp.array([[0, 1, 1, 1, 2, 0]])
    cm = metrics.confusion_matrix(pred, label, 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [0, 1, 0]])
    assert cm.dtype == jnp.int32


def test_invalid_examples_are_skipped():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 4, size=(3, 5, 5))
    pred = rng.integers(0, 4, size=(3, 5, 5))
    valid = np.array([True, False, True])
    cm = metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(label), 4, mask=jnp.asarray(valid))
    np.testing.assert_array_equal(cm, _numpy_cm(pred[valid], label[valid], 4))
    assert int(cm.sum()) == 2 * 25


def test_weights_give_weighted_sums():
    label = jnp.array([[0, 1], [1, 1]])
    pred = jnp.array([[0, 0], [1, 1]])
    cm = metrics.confusion_matrix(pred, label, 2, weights=jnp.array([2.0, 0.5]))
    np.testing.assert_allclose(cm, [[2.0, 0.0], [2.0, 1.0]])


def test_scores_from_hand_made_matrix():
    # rows = truth. class 0: TP 3, FP 1, FN 1; class 1: TP 4, FP 2, FN 1; class 2: TP 0, FP 1, FN 2;
    # class 3: absent from truth and prediction.
    cm = np.array([[3, 1, 0, 0],
                   [0, 4, 1, 0],
                   [1, 1, 0, 0],
                   [0, 0, 0, 0]])
    s = metrics.scores_from_confusion(cm, ["a", "b", "c", "d"])
    np.testing.assert_allclose(s["iou"][:3], [3 / 5, 4 / 7, 0.0])
    assert s["iou"][3] is None and s["f1"][3] is None
    assert s["num_classes_scored"] == 3
    np.testing.assert_allclose(s["miou"], (3 / 5 + 4 / 7 + 0.0) / 3)  # class 'd' excluded
    np.testing.assert_allclose(s["oa"], 7 / 11)
    np.testing.assert_allclose(s["f1"][:3], [6 / 8, 8 / 11, 0.0])
    np.testing.assert_allclose(s["macro_f1"], (6 / 8 + 8 / 11) / 3)
    np.testing.assert_allclose(s["precision"][:3], [3 / 4, 4 / 6, 0.0])
    np.testing.assert_allclose(s["recall"][:3], [3 / 4, 4 / 5, 0.0])
    assert s["precision"][3] is None and s["recall"][3] is None
    assert s["support"] == [4.0, 5.0, 2.0, 0.0]
    json.dumps(s, allow_nan=False)  # JSON-ready: no NaN anywhere


def test_predicted_but_absent_class_counts_as_zero():
    cm = np.array([[2, 2], [0, 0]])  # class 1 never true, predicted twice
    s = metrics.scores_from_confusion(cm)
    assert s["iou"] == [0.5, 0.0]
    assert s["miou"] == 0.25
    assert s["recall"][1] is None and s["precision"][1] == 0.0


def test_empty_matrix_scores_are_none():
    s = metrics.scores_from_confusion(np.zeros((3, 3)))
    assert s["miou"] is None and s["oa"] is None and s["num_classes_scored"] == 0


def test_jitted_on_sharded_batch_equals_numpy():
    mesh = Mesh(np.array(jax.devices()).reshape(8, 1), ("data", "model"))
    rng = np.random.default_rng(1)
    label = rng.integers(0, 5, size=(16, 12, 12)).astype(np.int32)
    label[rng.random(label.shape) < 0.2] = IGNORE_LABEL
    logits = rng.normal(size=(16, 12, 12, 5)).astype(np.float32)
    valid = rng.random(16) < 0.7
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data")))

    @jax.jit
    def step(logits, label, valid):
        return metrics.confusion_matrix(jnp.argmax(logits, -1), label, 5, mask=valid)

    cm = step(shard(logits), shard(label), shard(valid))
    expected = _numpy_cm(logits.argmax(-1), label, 5, np.broadcast_to(valid[:, None, None], label.shape))
    np.testing.assert_array_equal(np.asarray(cm), expected)


@flax.struct.dataclass
class _EvalMetrics(clu_metrics.Collection):
    loss: clu_metrics.Average.from_output("loss")
    confusion: metrics.ConfusionMatrix.for_classes(4)


def test_clu_collection_merge_of_halves_equals_whole():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(6, 4, 4, 4)).astype(np.float32))
    label = jnp.asarray(rng.integers(0, 4, size=(6, 4, 4)).astype(np.int32))
    loss = jnp.asarray(rng.random(6).astype(np.float32))
    mask = jnp.array([True, True, True, True, True, False])

    compute = jax.jit(lambda lo, la, l, m: _EvalMetrics.single_from_model_output(
        loss=l, logits=lo, label=la, mask=m))
    whole = compute(logits, label, loss, mask).compute()
    halves = _EvalMetrics.empty()
    for part in (slice(0, 3), slice(3, 6)):
        halves = halves.merge(compute(logits[part], label[part], loss[part], mask[part]))
    halves = halves.compute()
    np.testing.assert_array_equal(halves["confusion"], whole["confusion"])
    np.testing.assert_allclose(halves["loss"], whole["loss"], rtol=1e-6)
    assert int(whole["confusion"].sum()) == 5 * 16


def test_metric_without_fixed_classes_infers_k_and_merges_from_empty():
    logits = jnp.zeros((1, 2, 2, 3)).at[..., 2].set(1.0)
    label = jnp.array([[[2, 1], [IGNORE_LABEL, 2]]])
    m = metrics.ConfusionMatrix.empty().merge(metrics.ConfusionMatrix.from_model_output(logits=logits, label=label))
    np.testing.assert_array_equal(m.compute(), [[0, 0, 0], [0, 0, 1], [0, 0, 2]])
    with pytest.raises(ValueError, match="for_classes"):
        metrics.ConfusionMatrix.from_model_output(pred=jnp.zeros((1, 2, 2), jnp.int32), label=label)


def test_official_miou_leaves_other_out_as_igns_metric_does():
    # IGN's FLAIR metric: per-class IoU of the whole K x K matrix, mean of ious[:-1] ('other' last);
    # 'other' pixels still count as errors of the classes they are confused with.
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 40, (4, 4)) + np.diag([90, 80, 70, 60])
    cm[2, :], cm[:, 2] = 0, 0                     # class 'c' absent: undefined, left out as nanmean does
    names = ["a", "b", "c", "other"]
    s = metrics.scores_from_confusion(cm, names)
    with np.errstate(invalid="ignore"):
        ious = np.diag(cm) / (cm.sum(0) + cm.sum(1) - np.diag(cm)).astype(np.float64)
    official = metrics.official_miou(s, {"exclude_classes": ["other"], "protocol": "FLAIR #2"})
    np.testing.assert_allclose(official["miou_official"], np.nanmean(ious[:-1]), rtol=1e-12)
    assert official["official_classes"] == ["a", "b", "c"] and official["official_protocol"] == "FLAIR #2"
    assert official["miou_official"] != pytest.approx(s["miou"])   # 'other' moved the all-class mean
    assert metrics.official_miou(s, None) == {}                     # a dataset without a protocol
    with pytest.raises(ValueError, match="'unknown'"):
        metrics.official_miou(s, {"exclude_classes": ["unknown"]})
