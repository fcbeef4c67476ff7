"""Evaluation: segmentation scores over a whole split, and the online linear probe used during SSL.

Both run one jitted function over sharded batches from `pipeline.make_eval_iterator` (every example
once over all hosts; padded rows carry `example_valid=False` and never count), so the numbers are
those of the whole split whatever the number of devices.

    confusion_step(variables, batch) -> [K, K]     summed on the device over the split
    scores_from_confusion(cm)        -> per-class IoU / F1 / precision / recall, mIoU, OA
    embed_step(variables, batch)     -> pooled embedding [B, D], majority class [B], usable [B]
    linear_probe(train, eval)        -> accuracy of a closed-form ridge classifier on frozen features

The probe answers "is SSL learning?": ridge regression on standardised, stop-gradient pooled
embeddings onto the one-hot majority class of each labelled patch, scored on another split against
always guessing the most frequent training class. It is cheap (one forward pass over a few hundred
patches, a D x D solve on the host) and honest (no training of the probe on the evaluation patches).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lcssl import metrics, models, sharding
from lcssl.data import normalize
from lcssl.errors import UserError

def _apply(model, variables, batch, stats):
    batch = normalize.normalize(batch, stats)
    return model.apply(variables, *(batch[k] for k in models.INPUT_KEYS), train=False)


def confusion_step(variables, batch, *, model, stats, num_classes: int) -> jax.Array:
    """[K, K] confusion matrix of one sharded batch (rows true, columns predicted). Pure."""
    pred = jnp.argmax(_apply(model, variables, batch, stats)["logits"], axis=-1)
    return metrics.confusion_matrix(pred, batch["label"], num_classes, mask=batch["example_valid"])


def embed_step(variables, batch, *, model, stats, num_classes: int) -> dict:
    """Pooled embeddings [B, D] and each patch's majority class [B] (usable: labelled, not padding)."""
    embedding = jax.lax.stop_gradient(_apply(model, variables, batch, stats)["embedding"])
    # one_hot of the ignore label (255 >= K) is all zeros, so ignored pixels do not vote.
    votes = jnp.sum(jax.nn.one_hot(batch["label"], num_classes, dtype=jnp.int32), axis=(1, 2))
    usable = batch["example_valid"] & (jnp.sum(votes, axis=-1) > 0)
    return {"embedding": embedding, "majority": jnp.argmax(votes, axis=-1), "usable": usable}


def evaluate_split(step_fn: Callable, variables: Any, batches: Iterable[Mapping[str, np.ndarray]],
                   mesh, class_names) -> dict:
    """Scores of `step_fn` (a jitted confusion_step) over every batch of a split; JSON-ready."""
    cm = None
    for host_batch in batches:
        batch_cm = step_fn(variables, sharding.host_batch_to_global(host_batch, mesh))
        cm = batch_cm if cm is None else cm + batch_cm
    if cm is None:
        raise UserError("evaluate_split: the evaluation split has no examples; rebuild the dataset "
                        "with val/test zones (data_prep build --val-fraction / --test-fraction) or "
                        "set --config.val_split / --config.test_split to a split that has some")
    cm = sharding.to_host(cm)
    scores = metrics.scores_from_confusion(cm, class_names)
    scores["confusion_matrix"] = cm.astype(np.int64).tolist()
    return scores


def collect_embeddings(step_fn: Callable, variables: Any, batches: Iterable[Mapping[str, np.ndarray]],
                       mesh, max_examples: int) -> tuple[np.ndarray, np.ndarray]:
    """(features [N, D], majority class [N]) of up to ~max_examples usable patches."""
    feats, labels, seen = [], [], 0
    for host_batch in batches:
        out = step_fn(variables, sharding.host_batch_to_global(host_batch, mesh))
        out = {k: sharding.to_host(v) for k, v in out.items()}
        feats.append(out["embedding"][out["usable"]])
        labels.append(out["majority"][out["usable"]])
        seen += len(out["usable"])
        if seen >= max_examples:  # the same count on every host: batches are global
            break
    return np.concatenate(feats).astype(np.float64), np.concatenate(labels)


def _ridge_fit(train_x: np.ndarray, train_y: np.ndarray, num_classes: int, ridge: float):
    """(predict(x) -> class, weights) of a ridge classifier on standardised features (+ bias)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    design = lambda x: np.concatenate([(x - mean) / std, np.ones((len(x), 1))], axis=1)
    a = design(train_x)
    reg = ridge * len(a) * np.eye(a.shape[1])
    reg[-1, -1] = 0.0  # no penalty on the bias
    w = np.linalg.solve(a.T @ a + reg, a.T @ np.eye(num_classes)[train_y])
    return lambda x: np.argmax(design(x) @ w, axis=1)


def choose_ridge(train_x: np.ndarray, train_y: np.ndarray, num_classes: int, candidates,
                 folds: int = 5, seed: int = 0) -> tuple[float, dict]:
    """The ridge of `candidates` with the best k-fold cross-validated accuracy on the training
    patches alone (the held-out split is never seen), and every candidate's CV accuracy. Ties go to
    the stronger ridge (the simpler classifier)."""
    order = np.random.default_rng(seed).permutation(len(train_y))
    parts = [p for p in np.array_split(order, min(folds, len(train_y))) if len(p)]
    scores = {}
    for ridge in sorted(candidates):
        correct = 0
        for held in parts:
            fit = np.setdiff1d(order, held)
            if len(fit) == 0:
                continue
            predict = _ridge_fit(train_x[fit], train_y[fit], num_classes, ridge)
            correct += int(np.sum(predict(train_x[held]) == train_y[held]))
        scores[float(ridge)] = correct / len(train_y)
    best = max(scores.items(), key=lambda kv: (kv[1], kv[0]))[0]
    return best, scores


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, eval_x: np.ndarray, eval_y: np.ndarray,
                 num_classes: int, ridge: float = 1e-2, ridge_candidates=()) -> dict:
    """Closed-form ridge classifier: fit on (train_x, train_y), accuracy on (eval_x, eval_y).

    Features are standardised with the training mean/std; the ridge term is relative to the mean
    feature variance (1 after standardising). With `ridge_candidates`, the ridge is chosen among
    them by cross-validation on the training patches (`choose_ridge`); otherwise `ridge` is used.
    """
    if len(train_y) == 0 or len(eval_y) == 0:
        return {"accuracy": None, "baseline_accuracy": None, "num_train": len(train_y),
                "num_eval": len(eval_y)}
    cv = {}
    if len(ridge_candidates) and len(train_y) >= 2:
        ridge, cv = choose_ridge(train_x, train_y, num_classes, ridge_candidates)
    predict = _ridge_fit(train_x, train_y, num_classes, ridge)
    most_frequent = np.bincount(train_y, minlength=num_classes).argmax()
    out = {"accuracy": float(np.mean(predict(eval_x) == eval_y)),
           "baseline_accuracy": float(np.mean(eval_y == most_frequent)),
           "train_accuracy": float(np.mean(predict(train_x) == train_y)),
           "ridge": float(ridge), "num_train": int(len(train_y)), "num_eval": int(len(eval_y))}
    if cv:
        out["cv_accuracy"] = cv[ridge]
    return out


def format_scores(scores: Mapping[str, Any], title: str) -> str:
    """A plain-text table: per-class IoU and F1, then mIoU, the dataset's official mIoU where it
    has one (metrics.official_miou) and OA (percent)."""
    pct = lambda v: "   n/a" if v is None else f"{100 * v:6.2f}"
    totals = [("mIoU", scores["miou"])]
    if "miou_official" in scores:
        totals.append((f"mIoU official ({len(scores['official_classes'])} cl.)", scores["miou_official"]))
    totals.append(("OA", scores["oa"]))
    width = max(len(n) for n in [*scores["class_names"], *(name for name, _ in totals)])
    lines = [title, f"  {'class'.ljust(width)}    IoU     F1"]
    for name, iou, f1 in zip(scores["class_names"], scores["iou"], scores["f1"]):
        lines.append(f"  {name.ljust(width)} {pct(iou)} {pct(f1)}")
    lines += [f"  {name.ljust(width)} {pct(value)}" for name, value in totals]
    return "\n".join(lines)
