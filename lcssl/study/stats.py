"""The study's statistics (pure): mean ± std over seeds, paired differences to from scratch with
their 95% interval, each method's share of the oracle's gain."""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np

from lcssl.study.plan import BASELINE, ORACLE

# A learning-quality figure in the report is a mean +- std over at least this many seeds; cells
# with fewer show as pending (every run is still in the JSON / CSV; the screening table lists the
# seeds of the pre-trained methods that have fewer).
MIN_SEEDS = 5


def _mean_std(values: Sequence[float]) -> tuple:
    """(mean, sample std with ddof=1 (nan for one value), n) of the finite values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan"), len(v)


def paired_ci(diffs: Sequence[float], level: float = 0.95) -> tuple:
    """(low, high) of the `level` confidence interval of the mean of paired differences (Student's
    t with n - 1 degrees of freedom); (nan, nan) for fewer than 2."""
    v = np.asarray([x for x in diffs if x is not None and np.isfinite(x)], np.float64)
    if len(v) < 2:
        return float("nan"), float("nan")
    from scipy import stats

    half = stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean() - half), float(v.mean() + half)


def _finished(records: Sequence[dict]) -> dict:
    """{(arm, fraction): {seed: record}} of the fine-tuning runs with a test score."""
    by_cell = {}
    for r in records:
        if r.get("status") == "done" and r.get("test_miou") is not None and r.get("kind", "finetune") == "finetune":
            by_cell.setdefault((r["arm"], r["label_fraction"]), {})[r["seed"]] = r
    return by_cell


def paired_differences(records: Sequence[dict]) -> dict:
    """{(arm, fraction): {seed: test mIoU points of the arm's run minus the from-scratch U-T&T run of
    the same seed and label fraction}} for every arm but the baseline, seeds in order."""
    return _paired(_finished(records))


def _paired(by_cell: dict) -> dict:
    out = {}
    for (arm, fraction), seeds in by_cell.items():
        base = by_cell.get((BASELINE, fraction), {})
        if arm != BASELINE:
            out[(arm, fraction)] = {s: 100 * (seeds[s]["test_miou"] - base[s]["test_miou"])
                                    for s in sorted(seeds) if s in base}
    return out


def summarize(records: Sequence[dict]) -> dict:
    """{(arm, fraction): {'miou': (mean, std, n), 'oa': ..., 'diff': (mean, std, n) vs BASELINE,
    'ci': (low, high) of diff's 95% interval, 'gap': share of the oracle's gain}}, percent.

    The paired difference pairs runs of the same seed and label fraction: arm minus from-scratch
    U-T&T. 'gap' is the arm's mean paired difference over the oracle's (ORACLE, the ceiling): 1.0
    = as good as an encoder trained with every label, 0 = no better than from scratch. It is NaN
    where the oracle gains nothing measurable (its 95% interval reaches 0): a share of no gain is
    not a figure.
    """
    by_cell = _finished(records)
    by_seed = _paired(by_cell)
    out = {}
    for (arm, fraction), seeds in by_cell.items():
        diffs = list(by_seed.get((arm, fraction), {}).values())
        out[(arm, fraction)] = {
            "miou": _mean_std([100 * r["test_miou"] for r in seeds.values()]),
            "oa": _mean_std([100 * r["test_oa"] for r in seeds.values() if r.get("test_oa") is not None]),
            "diff": _mean_std(diffs) if arm != BASELINE else (float("nan"), float("nan"), 0),
            "ci": paired_ci(diffs) if arm != BASELINE else (float("nan"), float("nan"))}
    for (arm, fraction), cell in out.items():
        oracle = out.get((ORACLE, fraction))
        measurable = oracle and oracle["diff"][2] and not oracle["ci"][0] <= 0
        gain = oracle["diff"][0] if measurable else float("nan")
        cell["gap"] = (cell["diff"][0] / gain if np.isfinite(gain) and gain > 0 and cell["diff"][2]
                       else float("nan"))
    return out


def _pm_ci(cell: dict) -> str:
    """'+mean ± std [low, high]' of a paired difference; pending under MIN_SEEDS."""
    mean, std, n = cell["diff"]
    if n < MIN_SEEDS:
        return _pm(cell["diff"])
    low, high = cell["ci"]
    return f"{mean:+.1f} ± {std:.1f} [{low:+.1f}, {high:+.1f}]"


def _pm(stat: tuple, digits: int = 1) -> str:
    """'mean ± std' over >= MIN_SEEDS values; fewer: pending, without a figure."""
    mean, std, n = stat
    if n == 0:
        return "-"
    if n < MIN_SEEDS:
        return f"pending ({n} of {MIN_SEEDS} seeds)"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def best_arm(summary: dict, fraction: float, candidates=None) -> Optional[str]:
    """The arm other than the baseline (among `candidates`, e.g. the pre-trained ones, when given)
    with the highest mean test mIoU at `fraction`."""
    cells = [(v["miou"][0], arm) for (arm, f), v in summary.items()
             if f == fraction and arm not in (BASELINE, ORACLE) and v["miou"][2] > 0
             and (candidates is None or arm in candidates)]
    return max(cells)[1] if cells else None


def per_class_iou(records: Sequence[dict], arm: str, fraction: float) -> tuple:
    """(class names, mean IoU in percent per class over seeds (nan where never present))."""
    rows = [r for r in records if r["arm"] == arm and r["label_fraction"] == fraction and r.get("status") == "done"]
    if not rows:
        return [], np.array([])
    iou = np.array([[np.nan if v is None else 100 * v for v in r["test_iou"]] for r in rows], np.float64)
    with warnings.catch_warnings():  # a class absent from the test split: nan, shown as '-'
        warnings.simplefilter("ignore", RuntimeWarning)
        return list(rows[0]["class_names"]), np.nanmean(iou, axis=0)
