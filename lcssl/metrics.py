"""Segmentation metrics: a confusion matrix on the device, scores from it on the host.

    confusion_matrix(pred, label, K) -> [K, K]   rows = true class, cols = predicted class
    scores_from_confusion(cm)        -> dict     IoU, mIoU, OA, precision, recall, F1 (JSON-ready)
    official_miou(scores, protocol)  -> dict     the dataset's published score (FLAIR #2: 12 classes)
    ConfusionMatrix                  -> clu metric, sums matrices over steps for a metrics.Collection

Pixels labelled `IGNORE_LABEL` and examples masked out (`example_valid` False on padded eval
batches) never count. Absent classes are handled as documented in `scores_from_confusion`.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

from lcssl.data.schema import IGNORE_LABEL


def confusion_matrix(pred: jax.Array, label: jax.Array, num_classes: int, ignore_label: int = IGNORE_LABEL,
                     weights: jax.Array | None = None, mask: jax.Array | None = None) -> jax.Array:
    """Counts (label, pred) pairs. Jittable; on a batch sharded over devices the result is global.

    Args:
      pred: [B, ...] int, predicted class ids.
      label: [B, ...] int, true class ids; `ignore_label` pixels are skipped.
      num_classes: K.
      weights: optional float weights matching the leading axes of `label` (scalar, [B] or
        [B, ...]); the result is then float32 sums of weights instead of int32 counts.
      mask: optional bool matching the leading axes of `label`, e.g. `example_valid` [B]; False
        entries are skipped.

    Returns [K, K] (int32 counts, or float32 if `weights` is given). Ids outside [0, K) other than
    `ignore_label` are also skipped (their one-hot row is zero); the data pipeline guarantees none.

    A one-hot contraction per example rather than a scatter: it partitions over a sharded batch
    axis as local matmuls plus one all-reduce, and counts stay exact in float32 because one example
    holds far fewer than 2**24 pixels; the sum over examples is done in int32.
    """
    if pred.shape != label.shape:
        raise ValueError(f"confusion_matrix: pred shape {pred.shape} != label shape {label.shape}")
    if label.ndim == 0:
        raise ValueError("confusion_matrix: label must have a leading batch axis")
    keep = label != ignore_label
    if mask is not None:
        keep = keep & _broadcast_left(jnp.asarray(mask, bool), label.shape, "mask")
    batch = label.shape[0]
    true_1h = jax.nn.one_hot(label.reshape(batch, -1), num_classes, dtype=jnp.float32)  # [B, N, K]
    true_1h = true_1h * keep.reshape(batch, -1, 1)
    pred_1h = jax.nn.one_hot(pred.reshape(batch, -1), num_classes, dtype=jnp.float32)  # [B, N, K]
    if weights is None:
        per_example = jnp.einsum("bnk,bnl->bkl", true_1h, pred_1h, precision=jax.lax.Precision.HIGHEST)
        return jnp.round(per_example).astype(jnp.int32).sum(axis=0)
    weights = _broadcast_left(jnp.asarray(weights, jnp.float32), label.shape, "weights").reshape(batch, -1, 1)
    return jnp.einsum("bnk,bnl->kl", true_1h * weights, pred_1h, precision=jax.lax.Precision.HIGHEST)


def _broadcast_left(x: jax.Array, shape: tuple[int, ...], name: str) -> jax.Array:
    """Broadcasts a leading-axes array (scalar, [B], [B, H], ...) to `shape` by adding trailing axes."""
    if x.ndim > len(shape) or x.shape != shape[:x.ndim]:
        raise ValueError(f"confusion_matrix: {name} of shape {x.shape} does not match the leading axes of "
                         f"label shape {shape}")
    return jnp.broadcast_to(x.reshape(x.shape + (1,) * (len(shape) - x.ndim)), shape)


def scores_from_confusion(cm: Any, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-class and averaged scores from a [K, K] matrix (rows = true, cols = predicted). numpy.

    Per class c, with TP = cm[c, c], FP = column sum - TP, FN = row sum - TP:
      iou = TP / (TP + FP + FN), f1 = 2 TP / (2 TP + FP + FN),
      precision = TP / (TP + FP), recall = TP / (TP + FN), support = TP + FN (true pixels).

    Absent classes, explicitly:
      * a class absent from both ground truth and prediction has an undefined IoU and F1 (0 / 0);
        it is reported as None and EXCLUDED from `miou` and `macro_f1` (the means run over
        `num_classes_scored` classes). Counting it as 0 or 1 would move the mean by a class the
        evaluation set says nothing about.
      * a class absent from the ground truth but predicted somewhere has IoU = F1 = 0 and IS
        included: those are false positives.
      * precision is None for a class never predicted, recall None for a class with no true pixel.
    Undefined values are None (not NaN) so the dict is valid JSON; `oa`, `miou` and `macro_f1` are
    None when the matrix is empty.
    """
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"scores_from_confusion: expected a square [K, K] matrix, found shape {cm.shape}")
    num_classes = cm.shape[0]
    if class_names is None:
        class_names = [str(i) for i in range(num_classes)]
    class_names = list(class_names)
    if len(class_names) != num_classes:
        raise ValueError(
            f"scores_from_confusion: {len(class_names)} class names for a {num_classes}x{num_classes} matrix")
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (tp + fp + fn)
        f1 = 2 * tp / (2 * tp + fp + fn)
        precision = tp / (tp + fp)
        recall = tp / (tp + fn)
    total = cm.sum()
    scored = ~np.isnan(iou)

    def as_list(values):
        return [None if np.isnan(v) else float(v) for v in values]

    def mean_or_none(values):
        return float(np.mean(values[scored])) if scored.any() else None

    return {
        "class_names": class_names,
        "iou": as_list(iou),
        "f1": as_list(f1),
        "precision": as_list(precision),
        "recall": as_list(recall),
        "support": [float(v) for v in tp + fn],
        "miou": mean_or_none(iou),
        "macro_f1": mean_or_none(f1),
        "oa": float(tp.sum() / total) if total > 0 else None,
        "num_pixels": float(total),
        "num_classes_scored": int(scored.sum()),
    }


def official_miou(scores: Mapping[str, Any], protocol: Mapping[str, Any] | None) -> dict[str, Any]:
    """The score a dataset's benchmark publishes, from `scores_from_confusion` output; {} if none.

    `protocol` is the dataset card's `official_miou` entry (written by the layout; FLAIR #2:
    {'exclude_classes': ['other'], 'protocol': ...}). The FLAIR challenges average the IoU of the
    first 12 classes and leave 'other' out (IGN's metric code: nanmean(ious[:-1])); its pixels still
    count as false positives / negatives of the other classes, as there. Classes with an undefined
    IoU (absent from truth and prediction) are left out as in `miou`, which is also what nanmean does.

    Returns {'miou_official': float or None, 'official_classes': [names averaged],
    'official_protocol': text}. Raises ValueError for an excluded class the scores do not have.
    """
    if not protocol:
        return {}
    names = list(scores["class_names"])
    excluded = list(protocol["exclude_classes"])
    unknown = [n for n in excluded if n not in names]
    if unknown:
        raise ValueError(f"official_miou: the protocol excludes {unknown}, which are not among the classes {names}")
    kept = [(n, iou) for n, iou in zip(names, scores["iou"]) if n not in excluded]
    defined = [iou for _, iou in kept if iou is not None]
    return {"miou_official": float(np.mean(defined)) if defined else None,
            "official_classes": [n for n, _ in kept],
            "official_protocol": str(protocol.get("protocol", f"mIoU without {excluded}"))}


@flax.struct.dataclass
class ConfusionMatrix(clu_metrics.Metric):
    """clu metric summing [K, K] confusion matrices, for a `clu.metrics.Collection`:

        @flax.struct.dataclass
        class EvalMetrics(metrics.Collection):
            loss: metrics.Average.from_output('loss')
            confusion: ConfusionMatrix.for_classes(13)

        m = EvalMetrics.single_from_model_output(loss=loss, logits=logits, label=label, mask=valid)

    `from_model_output` takes `logits` [B, H, W, K] (argmax is taken) or `pred` [B, H, W] int,
    `label` [B, H, W] int (IGNORE_LABEL skipped) and an optional `mask` (e.g. `example_valid` [B]).
    `compute()` returns the matrix; turn it into scores with `scores_from_confusion` on the host.
    Use `for_classes(K)` so that `empty()` knows K; the plain class infers K from the logits and
    its `empty()` is a 0x0 matrix that `merge` treats as the identity.
    """

    matrix: jax.Array  # [K, K] int32

    num_classes = None  # set by for_classes(); a class attribute, not a pytree field

    @classmethod
    def for_classes(cls, num_classes: int):
        # Re-decorated so that the subclass is registered as a pytree too.
        return flax.struct.dataclass(
            type(f"ConfusionMatrix{num_classes}", (cls,), {"num_classes": int(num_classes)}))

    @classmethod
    def empty(cls) -> "ConfusionMatrix":
        k = cls.num_classes or 0
        return cls(matrix=jnp.zeros((k, k), jnp.int32))

    @classmethod
    def from_model_output(cls, label: jax.Array, logits: jax.Array | None = None, pred: jax.Array | None = None,
                          mask: jax.Array | None = None, **_) -> "ConfusionMatrix":
        if (logits is None) == (pred is None):
            raise ValueError("ConfusionMatrix.from_model_output: pass exactly one of logits= or pred=")
        num_classes = cls.num_classes
        if logits is not None:
            if num_classes is not None and logits.shape[-1] != num_classes:
                raise ValueError(
                    f"ConfusionMatrix: logits have {logits.shape[-1]} classes, metric expects {num_classes}")
            num_classes = logits.shape[-1]
            pred = jnp.argmax(logits, axis=-1)
        elif num_classes is None:
            raise ValueError("ConfusionMatrix: with pred= use ConfusionMatrix.for_classes(K) so K is known")
        return cls(matrix=confusion_matrix(pred, label, num_classes, mask=mask))

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        # A 0x0 matrix is the empty metric of the class without a fixed K (shapes are static, so
        # this branch is resolved at trace time).
        if self.matrix.shape == (0, 0):
            return other
        if other.matrix.shape == (0, 0):
            return self
        if self.matrix.shape != other.matrix.shape:
            raise ValueError(f"ConfusionMatrix.merge: shapes {self.matrix.shape} and {other.matrix.shape}")
        return type(self)(matrix=self.matrix + other.matrix)

    def compute(self) -> jax.Array:
        return self.matrix
