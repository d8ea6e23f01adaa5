"""Scores -> numbers: ROC, operating points, confusion-based metrics, bootstrap CIs, calibration
(ECE, reliability), pointing game.

Pure numpy/scipy; no plotting, no Ray, no torch. Conventions shared with the rest of the package:
label 1 is PNEUMONIA (the positive class), 0 is NORMAL; ``score`` is the PNEUMONIA probability
(any monotone score works); a case is predicted positive when ``score >= threshold``.

Every function takes lists or arrays and raises ``ValueError`` naming the bad argument.
Ratios that are 0/0 (e.g. PPV when nothing is predicted positive) come back as ``None`` so the
result dicts go straight into JSON reports and Parquet metadata.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from ..model.calibration import calibrated, nll

RATIO_METRICS = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1")
CI_METRICS = RATIO_METRICS + ("roc_auc",)
ECE_BINS = 10


# ---------------------------------------------------------------- validation

def _labels(y, name: str = "y_true") -> np.ndarray:
    a = np.asarray(y)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}.")
    if a.size and not np.isin(a, (0, 1)).all():
        bad = np.unique(a[~np.isin(a, (0, 1))])[:5]
        raise ValueError(f"{name} must hold only 0 (NORMAL) and 1 (PNEUMONIA), found {bad.tolist()}.")
    return a.astype(np.int8)


def _scores(s, name: str = "score") -> np.ndarray:
    try:
        a = np.asarray(s, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numeric: {e}") from None
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}.")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds {int((~np.isfinite(a)).sum())} NaN or infinite values.")
    return a


def _pair(y_true, score, *, need_both: bool = False) -> tuple[np.ndarray, np.ndarray]:
    y, s = _labels(y_true), _scores(score)
    if y.shape != s.shape:
        raise ValueError(f"y_true and score differ in length: {y.size} vs {s.size}.")
    if y.size == 0:
        raise ValueError("y_true and score are empty.")
    if need_both and (y.min() == y.max()):
        raise ValueError(f"Need both classes in y_true to pick a threshold, found only {int(y[0])}.")
    return y, s


def _ratio(num, den):
    """num/den with 0/0 -> None (scalars) or NaN (arrays, so percentiles can skip them)."""
    if np.ndim(den) == 0:
        return None if den == 0 else float(num) / float(den)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


# ---------------------------------------------------------------- ranking metrics

def roc_auc(y_true, score) -> float:
    """Area under the ROC curve = P(score of a random positive > a random negative), ties count 1/2.

    Computed as Mann-Whitney U / (n_pos * n_neg) from average ranks, so ties are exact and it
    costs one sort. NaN when a class is absent (the AUC is undefined, not 0.5)."""
    y, s = _pair(y_true, score)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)  # average ranks: a tie between a positive and a negative scores 1/2
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(y_true, score) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), one point per distinct score, highest threshold first.

    Like sklearn's with ``drop_intermediate=False``: the first point is (0, 0) at threshold +inf
    and the last is (1, 1) at the lowest score. Point i is what ``score >= thresholds[i]``
    gives. A missing class makes its axis NaN (as sklearn does, without the warning)."""
    y, s = _pair(y_true, score)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    # The last index of each run of equal scores: the curve only moves between distinct scores.
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), s.size - 1]
    tps = np.cumsum(y_sorted)[last]
    fps = (last + 1) - tps
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    thresholds = np.r_[np.inf, s_sorted[last]]
    n_pos, n_neg = tps[-1], fps[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tps / n_pos if n_pos else np.full(tps.shape, np.nan)
        fpr = fps / n_neg if n_neg else np.full(fps.shape, np.nan)
    return fpr.astype(np.float64), tpr.astype(np.float64), thresholds


def youden_threshold(y_true, score) -> float:
    """The observed score that maximises sensitivity + specificity - 1 (Youden's J).

    Ties go to the highest such threshold (fewest positive calls). The result is one of the
    scores, so ``score >= threshold`` reproduces the optimum exactly on this set."""
    y, s = _pair(y_true, score, need_both=True)
    fpr, tpr, thr = roc_curve(y, s)
    j = tpr[1:] - fpr[1:]  # skip the +inf point: a threshold nobody reaches is no operating point
    return float(thr[1:][int(np.argmax(j))])


def threshold_for_sensitivity(y_true, score, target: float) -> float:
    """The highest observed score whose threshold still catches >= ``target`` of the positives.

    For screening, where a missed pneumonia costs more than a false alarm. Counts, not float
    ratios, decide "meets the target", so 0.9 of 10 positives is exactly 9."""
    if not 0.0 <= float(target) <= 1.0:
        raise ValueError(f"target sensitivity must be in [0, 1], got {target}.")
    y, s = _pair(y_true, score)
    n_pos = int(y.sum())
    if n_pos == 0:
        raise ValueError("y_true has no positives (PNEUMONIA), so sensitivity is undefined.")
    _, tpr, thr = roc_curve(y, s)
    need = max(1, int(np.ceil(float(target) * n_pos - 1e-9)))
    tps = np.rint(tpr[1:] * n_pos)
    return float(thr[1:][int(np.argmax(tps >= need))])  # thresholds descend, tps ascend


# ---------------------------------------------------------------- operating-point metrics

def confusion(y_true, y_pred) -> dict:
    """{"tn", "fp", "fn", "tp"} as ints; rows of the matrix are the truth, columns the prediction."""
    y, p = _labels(y_true), _labels(y_pred, "y_pred")
    if y.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {y.size} vs {p.size}.")
    tp = int(np.sum((y == 1) & (p == 1)))
    fp = int(np.sum((y == 0) & (p == 1)))
    fn = int(np.sum((y == 1) & (p == 0)))
    return {"tn": int(y.size - tp - fp - fn), "fp": fp, "fn": fn, "tp": tp}


def _from_counts(tn, fp, fn, tp) -> dict:
    """The six ratios from confusion counts; works on scalars and on arrays of bootstrap counts."""
    return {
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def binary_metrics(y_true, score, threshold) -> dict:
    """Everything a report needs about one operating point. 0/0 ratios and an undefined AUC are None."""
    y, s = _pair(y_true, score)
    threshold = float(threshold)
    c = confusion(y, (s >= threshold).astype(np.int8))
    auc = roc_auc(y, s)
    return {
        **_from_counts(c["tn"], c["fp"], c["fn"], c["tp"]),
        "roc_auc": None if np.isnan(auc) else auc,
        "n": int(y.size), "n_pos": int(y.sum()), "threshold": threshold, "confusion": c,
    }


def _bootstrap_block(y, s, pred, idx) -> dict:
    """Metric arrays (one value per resample) for a block of resample indices (B, n)."""
    yb, pb = y[idx].astype(bool), pred[idx]
    tp = np.sum(yb & pb, axis=1)
    fp = np.sum(~yb & pb, axis=1)
    fn = np.sum(yb & ~pb, axis=1)
    tn = idx.shape[1] - tp - fp - fn
    out = _from_counts(tn, fp, fn, tp)
    n_pos = tp + fn
    n_neg = idx.shape[1] - n_pos
    ranks = rankdata(s[idx], axis=1)  # average ranks within each resample
    u = np.where(yb, ranks, 0.0).sum(axis=1) - n_pos * (n_pos + 1) / 2.0
    out["roc_auc"] = _ratio(u, n_pos * n_neg)
    return out


def resamples(n_cases: int, n_boot: int, seed: int = 0):
    """Case resamples for a bootstrap: (k, n_cases) index arrays, ``n_boot`` rows in all, from one
    seeded generator. In blocks, so memory stays ~a few million cells whatever the number of cases."""
    rng = np.random.default_rng(seed)
    block = max(1, 4_000_000 // max(1, n_cases))
    for start in range(0, int(n_boot), block):
        yield rng.integers(0, n_cases, size=(min(block, int(n_boot) - start), n_cases))


def bootstrap_ci(y_true, score, threshold, *, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> dict:
    """{metric: [low, high]} percentile intervals from ``n_boot`` case resamples, threshold fixed.

    The threshold stays fixed because it was chosen on another split; re-picking it per resample
    would answer a different question. Resamples where a metric is 0/0 (e.g. no positives drawn)
    are left out of that metric's interval; a metric undefined in every resample gets None."""
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}.")
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}.")
    y, s = _pair(y_true, score)
    pred = s >= float(threshold)
    parts = [_bootstrap_block(y, s, pred, idx) for idx in resamples(y.size, n_boot, seed)]
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    out = {}
    for m in CI_METRICS:
        vals = np.concatenate([p[m] for p in parts])
        vals = vals[~np.isnan(vals)]
        out[m] = [float(v) for v in np.percentile(vals, q)] if vals.size else None
    return out


# ---------------------------------------------------------------- calibration
# ECE (expected calibration error) here is that of P(PNEUMONIA): 10 equal-width bins on [0, 1]
# (the last one closed), ECE = sum over bins of (share of cases in the bin) x |mean P(PNEUMONIA) -
# share of PNEUMONIA|. It is the reliability diagram's gap, weighted by how many cases sit where.

def bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    """The bin of each probability among ``n_bins`` equal bins of [0, 1] (the reliability diagram's,
    and the report's histogram)."""
    return np.clip((p * n_bins).astype(np.int64), 0, n_bins - 1)  # p = 1.0 belongs to the last bin


def _probs(y, p) -> tuple[np.ndarray, np.ndarray]:
    y, p = _pair(y, p)
    if not ((p >= 0).all() and (p <= 1).all()):
        raise ValueError("score must hold probabilities in [0, 1].")
    return y.astype(np.float64), p


def reliability(y, p, n_bins: int = ECE_BINS) -> dict:
    """Per bin: edges, count, mean P(PNEUMONIA), share of PNEUMONIA (None where empty), and the ECE."""
    y, p = _probs(y, p)
    b = bin_index(p, n_bins)
    count = np.bincount(b, minlength=n_bins)
    sum_p = np.bincount(b, weights=p, minlength=n_bins)
    sum_y = np.bincount(b, weights=y, minlength=n_bins)

    def mean(s):
        return [float(v / c) if c else None for v, c in zip(s, count)]

    return {"edges": np.linspace(0, 1, n_bins + 1).tolist(), "count": count.tolist(), "mean_p": mean(sum_p),
            "frac_pos": mean(sum_y), "ece": float(np.abs(sum_p - sum_y).sum() / y.size)}


def ece(y, p, n_bins: int = ECE_BINS) -> float:
    return reliability(y, p, n_bins)["ece"]


def _ece_resamples(y, p, idx, n_bins) -> np.ndarray:
    """ECE of each resample (rows of ``idx``): sum over bins of |sum (p - y)| / n."""
    d = (p - y)[idx]
    b = bin_index(p, n_bins)[idx] + n_bins * np.arange(idx.shape[0])[:, None]
    s = np.bincount(b.ravel(), weights=d.ravel(), minlength=idx.shape[0] * n_bins)
    return np.abs(s.reshape(idx.shape[0], n_bins)).sum(1) / idx.shape[1]


def ece_bootstrap(y, p_before, p_after, *, n_boot: int = 1000, seed: int = 0, n_bins: int = ECE_BINS,
                  alpha: float = 0.05) -> dict:
    """Percentile CIs for the ECE before and after calibration and for their change (after - before),
    from the same case resamples (paired: the change's CI is narrower than the two apart)."""
    y, pb = _probs(y, p_before)
    _, pa = _probs(y, p_after)
    before, after = [], []
    for idx in resamples(y.size, n_boot, seed):
        before.append(_ece_resamples(y, pb, idx, n_bins))
        after.append(_ece_resamples(y, pa, idx, n_bins))
    before, after = np.concatenate(before), np.concatenate(after)
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    return {k: [float(v) for v in np.percentile(a, q)] for k, a in
            (("before", before), ("after", after), ("change", after - before))}


def calibration_report(y, margin, temperature: float, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """What evaluate reports: ECE before (T = 1) and after (the model's T), CIs, and both diagrams."""
    p_before, p_after = calibrated(margin, 1.0), calibrated(margin, temperature)
    rb, ra = reliability(y, p_before), reliability(y, p_after)
    ci = ece_bootstrap(y, p_before, p_after, n_boot=n_boot, seed=seed)
    return {"temperature": float(temperature), "bins": ECE_BINS,
            "binning": f"P(PNEUMONIA) in {ECE_BINS} equal-width bins on [0, 1]",
            "ece_before": rb["ece"], "ece_before_ci95": ci["before"], "ece_after": ra["ece"],
            "ece_after_ci95": ci["after"], "ece_change_ci95": ci["change"],
            "nll_before": nll(margin, y, 1.0), "nll_after": nll(margin, y, temperature),
            "reliability_before": rb, "reliability_after": ra}


# ---------------------------------------------------------------- localisation

def _points(a, k: int, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.size == 0:
        a = a.reshape(0, k)  # an empty list is a valid "no cases", whatever its nesting
    if a.ndim != 2 or a.shape[1] != k:
        raise ValueError(f"{name} must have shape (N, {k}), got {a.shape}.")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or infinite values; drop those rows first.")
    return a


def pointing_game(peaks_xy, truth_xyr, *, tolerance: float = 1.5, aspect: float = 1.0) -> dict:
    """Does the CAM peak land on the lesion? A hit when dist(peak, centre) <= tolerance * radius.

    ``peaks_xy`` (N, 2) and the centres in ``truth_xyr`` (N, 3) are (x, y) fractions of the
    image's width and height; the radius is a fraction of the width. Distances are measured in
    width fractions, so y offsets are divided by ``aspect`` = width / height (1 for the square
    images the model sees; transforms resizes the whole image, so fractions carry over)."""
    peaks, truth = _points(peaks_xy, 2, "peaks_xy"), _points(truth_xyr, 3, "truth_xyr")
    if peaks.shape[0] != truth.shape[0]:
        raise ValueError(f"peaks_xy and truth_xyr differ in N: {peaks.shape[0]} vs {truth.shape[0]}.")
    if tolerance < 0 or aspect <= 0:
        raise ValueError(f"tolerance must be >= 0 and aspect > 0, got {tolerance} and {aspect}.")
    if (truth[:, 2] <= 0).any():
        raise ValueError("Every lesion radius in truth_xyr[:, 2] must be > 0.")
    dx = (peaks[:, 0] - truth[:, 0]) / truth[:, 2]
    dy = (peaks[:, 1] - truth[:, 1]) / float(aspect) / truth[:, 2]
    in_radii = np.hypot(dx, dy)
    n = int(peaks.shape[0])
    hits = int(np.sum(in_radii <= float(tolerance)))
    return {
        "n": n, "hits": hits, "rate": hits / n if n else None, "tolerance": float(tolerance),
        "median_distance_in_radii": float(np.median(in_radii)) if n else None,
        # The signed mean offset (x right, y down) says whether peaks miss at random or all one way:
        # a systematic shift is a fault of the map's geometry or of what the network learned.
        "mean_dx_in_radii": float(np.mean(dx)) if n else None,
        "mean_dy_in_radii": float(np.mean(dy)) if n else None,
        # Whether a shift depends on where the lesion is: a mean offset of 0 can hide upper lesions
        # found too low and lower ones too high (on the realistic phantom every trained map did that).
        "follow_x": _follow(truth[:, 0], peaks[:, 0]),
        "follow_y": _follow(truth[:, 1], peaks[:, 1]),
    }


def _follow(lesion: np.ndarray, peak: np.ndarray) -> float | None:
    """Least-squares slope of the peak's position on the lesion's, along one axis: 1 when the peaks
    move with the lesions, below 1 when they are pulled towards one place (0: the same place for
    every lesion). None with fewer than 3 lesions or all at one position."""
    if len(lesion) < 3 or np.ptp(lesion) == 0:
        return None
    return float(np.polyfit(lesion, peak, 1)[0])
