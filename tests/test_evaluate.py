"""The online linear probe (lcssl.evaluate.linear_probe) on features with known answers; the score table."""
import numpy as np

from lcssl import evaluate, metrics


def clusters(labels, rng, spread=0.05, dim=4):
    """Feature k + noise for class k: linearly separable, one direction per class."""
    return np.eye(dim)[labels] * 3.0 + rng.normal(scale=spread, size=(len(labels), dim))


def test_separable_classes_are_all_found_and_the_baseline_is_the_commonest_training_class():
    rng = np.random.default_rng(0)
    train_y = np.array([0] * 10 + [1] * 6 + [2] * 4)
    eval_y = np.array([0, 1, 1, 2, 2, 2, 2, 2])
    out = evaluate.linear_probe(clusters(train_y, rng), train_y, clusters(eval_y, rng), eval_y,
                                num_classes=3)
    assert out == {"accuracy": 1.0, "baseline_accuracy": 1 / 8, "train_accuracy": 1.0,
                   "ridge": 1e-2, "num_train": 20, "num_eval": 8}


def test_the_probe_is_scored_on_the_eval_labels_not_fitted_to_them():
    rng = np.random.default_rng(1)
    train_y = np.array([0, 1] * 8)
    eval_y = np.array([0, 1] * 4)
    out = evaluate.linear_probe(clusters(train_y, rng), train_y, clusters(eval_y, rng), 1 - eval_y,
                                num_classes=2)
    assert out["accuracy"] == 0.0 and out["train_accuracy"] == 1.0


def test_an_overwhelming_ridge_leaves_only_the_bias_which_predicts_the_commonest_class():
    rng = np.random.default_rng(2)
    train_y = np.array([0] * 3 + [1] * 9 + [2] * 4)
    eval_y = np.array([0, 1, 2, 1, 1, 0])
    out = evaluate.linear_probe(clusters(train_y, rng), train_y, clusters(eval_y, rng), eval_y,
                                num_classes=3, ridge=1e8)
    assert out["accuracy"] == out["baseline_accuracy"] == 3 / 6


def test_no_usable_patch_gives_no_accuracy():
    out = evaluate.linear_probe(np.zeros((0, 4)), np.zeros(0, int), np.ones((3, 4)),
                                np.zeros(3, int), num_classes=2)
    assert out["accuracy"] is None and out["num_train"] == 0 and out["num_eval"] == 3


def test_probe_ridge_chosen_by_cross_validation_does_not_score_below_the_majority_class():
    # The study's old failure: as many patches as features (32), features that say nothing about
    # the class, a commonest class of ~50%. A weak fixed ridge interpolates the training patches
    # (train accuracy 1) and scores below always guessing the commonest class; the ridge chosen by
    # cross-validation on the training patches alone falls back to that guess.
    for seed in (1, 2, 3):
        rng = np.random.default_rng(seed)
        shares = [0.5, 0.3, 0.2]
        train_y, eval_y = rng.choice(3, 32, p=shares), rng.choice(3, 400, p=shares)
        train_x, eval_x = rng.normal(size=(32, 32)), rng.normal(size=(400, 32))
        weak = evaluate.linear_probe(train_x, train_y, eval_x, eval_y, 3, ridge=1e-2)
        chosen = evaluate.linear_probe(train_x, train_y, eval_x, eval_y, 3, ridge=1e-2,
                                       ridge_candidates=(1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0))
        assert weak["train_accuracy"] == 1.0
        assert weak["accuracy"] < weak["baseline_accuracy"] - 0.05
        assert chosen["ridge"] == 100.0
        assert chosen["accuracy"] >= chosen["baseline_accuracy"] - 0.01
        assert 0.0 <= chosen["cv_accuracy"] <= 1.0


def test_score_table_prints_the_official_miou_only_where_the_dataset_has_one():
    cm = np.array([[5, 1, 0], [1, 3, 0], [2, 0, 4]])
    scores = metrics.scores_from_confusion(cm, ["building", "water", "other"])
    plain = evaluate.format_scores(scores, "test")
    assert "official" not in plain and plain.splitlines()[-2].split() == ["mIoU", f"{100 * scores['miou']:.2f}"]
    scores.update(metrics.official_miou(scores, {"exclude_classes": ["other"]}))
    official = [line for line in evaluate.format_scores(scores, "test").splitlines() if "official" in line]
    assert official == [f"  mIoU official (2 cl.) {100 * (5 / 9 + 3 / 5) / 2:6.2f}"]
