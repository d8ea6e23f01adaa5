"""metrics.py on hand-counted cases, cross-checked with scipy where scipy has the same quantity."""

import math

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from cxr_batch.reports import metrics as m


def _noisy(n, seed=0, sep=1.0):
    """Labels and scores with ties (rounded) and a moderate separation, like a real classifier."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = np.round(1 / (1 + np.exp(-(rng.normal(size=n) + sep * (2 * y - 1)))), 2)
    return y, s


# ---------------------------------------------------------------- roc_auc

@pytest.mark.parametrize("y, s, expected", [
    ([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 1.0),       # perfect
    ([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1], 0.0),       # inverted
    ([0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5], 0.5),       # constant score: every pair is a tie
    ([0, 1, 0, 1], [0.1, 0.4, 0.4, 0.8], 0.875),     # pairs: (0.4 vs 0.1)=1, (0.4 vs 0.4)=1/2, 0.8 beats both: 3.5/4
    ([0, 1, 1], [0.3, 0.3, 0.9], 0.75),              # one tie across classes counts 1/2
])
def test_roc_auc_hand_cases(y, s, expected):
    assert m.roc_auc(y, s) == pytest.approx(expected)


def test_roc_auc_matches_mann_whitney_u():
    y, s = _noisy(500)
    u = mannwhitneyu(s[y == 1], s[y == 0]).statistic
    assert m.roc_auc(y, s) == pytest.approx(u / ((y == 1).sum() * (y == 0).sum()))


def test_roc_auc_is_nan_with_one_class():
    assert math.isnan(m.roc_auc([1, 1, 1], [0.1, 0.5, 0.9]))


@pytest.mark.parametrize("y, s, match", [
    ([0, 1, 2], [0.1, 0.2, 0.3], "only 0"),
    ([0, 1], [0.1, 0.2, 0.3], "differ in length"),
    ([[0, 1]], [[0.1, 0.2]], "1-D"),
    ([0, 1], [0.1, float("nan")], "NaN"),
    ([], [], "empty"),
])
def test_bad_inputs_raise_value_error_saying_what(y, s, match):
    with pytest.raises(ValueError, match=match):
        m.roc_auc(y, s)


# ---------------------------------------------------------------- roc_curve and thresholds

def test_roc_curve_endpoints_and_area():
    y, s = _noisy(300, seed=1)
    fpr, tpr, thr = m.roc_curve(y, s)
    assert (fpr[0], tpr[0], thr[0]) == (0.0, 0.0, np.inf)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert thr[-1] == s.min()
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0) and np.all(np.diff(thr) < 0)
    # Keeping every distinct score makes the trapezoid area exactly the tie-aware AUC.
    assert np.trapezoid(tpr, fpr) == pytest.approx(m.roc_auc(y, s))


def test_roc_curve_points_are_what_the_threshold_gives():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.4, 0.8, 0.3, 0.35])
    fpr, tpr, thr = m.roc_curve(y, s)
    np.testing.assert_array_equal(thr, [np.inf, 0.8, 0.4, 0.35, 0.3, 0.1])
    for f, t, th in zip(fpr, tpr, thr):
        pred = s >= th
        assert t == pred[y == 1].mean() and f == pred[y == 0].mean()


def test_youden_on_separable_set_splits_classes():
    y = [0, 0, 0, 1, 1, 1]
    s = [0.1, 0.2, 0.3, 0.6, 0.7, 0.9]
    t = m.youden_threshold(y, s)
    assert t == 0.6  # the highest threshold with J = 1
    met = m.binary_metrics(y, s, t)
    assert met["sensitivity"] == 1.0 and met["specificity"] == 1.0


def test_youden_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        m.youden_threshold([0, 0], [0.1, 0.2])


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_threshold_for_sensitivity_meets_target_and_is_highest(target):
    y, s = _noisy(400, seed=2)
    t = m.threshold_for_sensitivity(y, s, target)
    assert m.binary_metrics(y, s, t)["sensitivity"] >= target
    higher = s[s > t]
    if higher.size:  # the next distinct score up must miss the target
        assert m.binary_metrics(y, s, higher.min())["sensitivity"] < target


def test_threshold_for_sensitivity_exact_fraction():
    # 0.9 of 10 positives is exactly 9 positives, despite float rounding of 0.9 * 10.
    y = [1] * 10 + [0] * 5
    s = [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.2] + [0.1] * 5
    assert m.threshold_for_sensitivity(y, s, 0.9) == 0.55


def test_threshold_for_sensitivity_validates():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m.threshold_for_sensitivity([0, 1], [0.1, 0.9], 1.5)
    with pytest.raises(ValueError, match="no positives"):
        m.threshold_for_sensitivity([0, 0], [0.1, 0.9], 0.9)


# ---------------------------------------------------------------- confusion and binary_metrics

def test_confusion_counts():
    c = m.confusion([0, 0, 0, 1, 1, 1, 1], [0, 1, 0, 1, 1, 0, 1])
    assert c == {"tn": 2, "fp": 1, "fn": 1, "tp": 3}
    assert all(type(v) is int for v in c.values())


def test_binary_metrics_against_hand_counts():
    # threshold 0.5 -> predictions 0 1 0 0 | 1 1 1 0 0 1: tn 3, fp 1, fn 2, tp 4
    y = [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    s = [0.1, 0.6, 0.3, 0.2, 0.9, 0.8, 0.55, 0.4, 0.3, 0.7]
    r = m.binary_metrics(y, s, 0.5)
    assert r["confusion"] == {"tn": 3, "fp": 1, "fn": 2, "tp": 4}
    assert r["accuracy"] == pytest.approx(7 / 10)
    assert r["sensitivity"] == pytest.approx(4 / 6)
    assert r["specificity"] == pytest.approx(3 / 4)
    assert r["ppv"] == pytest.approx(4 / 5)
    assert r["npv"] == pytest.approx(3 / 5)
    assert r["f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))
    assert r["roc_auc"] == pytest.approx(m.roc_auc(y, s))
    assert (r["n"], r["n_pos"], r["threshold"]) == (10, 6, 0.5)


def test_binary_metrics_threshold_is_inclusive():
    assert m.binary_metrics([0, 1], [0.2, 0.5], 0.5)["confusion"]["tp"] == 1


def test_binary_metrics_undefined_ratios_are_none():
    r = m.binary_metrics([0, 0, 0], [0.1, 0.2, 0.3], 0.5)  # no positives, none predicted
    assert r["sensitivity"] is None and r["ppv"] is None and r["f1"] is None
    assert r["roc_auc"] is None
    assert r["specificity"] == 1.0 and r["npv"] == 1.0 and r["accuracy"] == 1.0


# ---------------------------------------------------------------- bootstrap

def test_bootstrap_ci_contains_point_estimate_and_is_reproducible():
    y, s = _noisy(400, seed=3)
    t = m.youden_threshold(y, s)
    point = m.binary_metrics(y, s, t)
    ci = m.bootstrap_ci(y, s, t, n_boot=500, seed=7)
    assert set(ci) == set(m.CI_METRICS)
    for k, (lo, hi) in ci.items():
        assert lo <= point[k] <= hi, k
    assert ci == m.bootstrap_ci(y, s, t, n_boot=500, seed=7)


def test_bootstrap_ci_narrows_with_n():
    def width(n):
        y, s = _noisy(n, seed=4)
        ci = m.bootstrap_ci(y, s, 0.5, n_boot=400)
        return {k: hi - lo for k, (lo, hi) in ci.items()}
    small, large = width(100), width(1600)
    for k in small:  # 16x the cases: about 4x narrower, so 2x is a safe margin
        assert large[k] < small[k] / 2, k


def test_bootstrap_auc_matches_scalar_auc_on_one_resample():
    y, s = _noisy(50, seed=5)
    idx = np.random.default_rng(0).integers(0, 50, size=(1, 50))
    block = m._bootstrap_block(y, s, s >= 0.5, idx)
    assert block["roc_auc"][0] == pytest.approx(m.roc_auc(y[idx[0]], s[idx[0]]))
    assert block["ppv"][0] == pytest.approx(m.binary_metrics(y[idx[0]], s[idx[0]], 0.5)["ppv"])


def test_bootstrap_ci_undefined_metric_is_none():
    ci = m.bootstrap_ci([0, 0, 0, 0], [0.1, 0.2, 0.3, 0.4], 0.5, n_boot=50)
    assert ci["sensitivity"] is None and ci["roc_auc"] is None
    assert ci["specificity"] == [1.0, 1.0]


# ---------------------------------------------------------------- pointing game

def test_pointing_game_hits_and_misses():
    truth = [[0.5, 0.5, 0.1], [0.3, 0.7, 0.05], [0.2, 0.2, 0.1], [0.75, 0.4, 0.125]]
    peaks = [
        [0.5, 0.5],    # dead centre: 0 radii
        [0.35, 0.75],  # sqrt(2) * 0.05 away: 1.41 radii, inside 1.5
        [0.2, 0.4],    # 0.2 away: 2 radii, a miss
        [0.9375, 0.4], # 0.1875 away: exactly 1.5 radii (binary-exact), the boundary is a hit
    ]
    r = m.pointing_game(peaks, truth)
    assert (r["n"], r["hits"], r["rate"], r["tolerance"]) == (4, 3, 0.75, 1.5)
    assert r["median_distance_in_radii"] == pytest.approx((np.sqrt(2) + 1.5) / 2)
    assert m.pointing_game(peaks, truth, tolerance=1.0)["hits"] == 1


def test_pointing_game_mean_offset_is_signed_and_in_radii():
    """Peaks all below the lesion add up; misses to either side cancel."""
    truth = [[0.5, 0.5, 0.1], [0.3, 0.3, 0.05], [0.6, 0.4, 0.1]]
    peaks = [[0.55, 0.6], [0.25, 0.35], [0.6, 0.45]]  # dx +0.5, -1, 0 radii; dy +1, +1, +0.5 radii
    r = m.pointing_game(peaks, truth)
    assert r["mean_dx_in_radii"] == pytest.approx(-0.5 / 3) and r["mean_dy_in_radii"] == pytest.approx(2.5 / 3)
    assert m.pointing_game([], [])["mean_dy_in_radii"] is None


def test_pointing_game_follow_tells_a_pull_to_the_middle_from_a_shift():
    """Peaks pulled 30% of the way to mid-height: a mean offset of 0 (upper and lower lesions cancel),
    but they follow the lesions down by only 0.7; a plain shift keeps the slope at 1."""
    rng = np.random.default_rng(0)
    truth = np.column_stack([rng.uniform(0.2, 0.8, 40), rng.uniform(0.2, 0.8, 40), np.full(40, 0.05)])
    truth[:, 1] -= truth[:, 1].mean() - 0.5  # lesions centred on mid-height: the pull averages out
    pulled = np.column_stack([truth[:, 0], 0.5 + 0.7 * (truth[:, 1] - 0.5)])
    r = m.pointing_game(pulled, truth)
    assert r["mean_dy_in_radii"] == pytest.approx(0, abs=1e-9)
    assert r["follow_y"] == pytest.approx(0.7) and r["follow_x"] == pytest.approx(1.0)
    r = m.pointing_game(truth[:, :2] + [0.01, -0.02], truth)
    assert r["follow_x"] == pytest.approx(1.0) and r["follow_y"] == pytest.approx(1.0)
    assert r["mean_dy_in_radii"] == pytest.approx(-0.4)
    assert m.pointing_game(truth[:2, :2], truth[:2])["follow_y"] is None  # two lesions: no slope to speak of


def test_pointing_game_aspect_scales_vertical_distance():
    # On an image twice as wide as tall, 0.2 of the height is 0.1 of the width: 1 radius.
    r = m.pointing_game([[0.5, 0.7]], [[0.5, 0.5, 0.1]], tolerance=1.0, aspect=2.0)
    assert r["hits"] == 1 and r["median_distance_in_radii"] == pytest.approx(1.0)


def test_pointing_game_validates_shapes():
    with pytest.raises(ValueError, match=r"peaks_xy must have shape \(N, 2\)"):
        m.pointing_game([[0.1, 0.2, 0.3]], [[0.5, 0.5, 0.1]])
    with pytest.raises(ValueError, match="differ in N"):
        m.pointing_game([[0.1, 0.2]], [[0.5, 0.5, 0.1], [0.5, 0.5, 0.1]])
    with pytest.raises(ValueError, match="radius"):
        m.pointing_game([[0.1, 0.2]], [[0.5, 0.5, 0.0]])
    assert m.pointing_game([], [])["rate"] is None


# ---------------------------------------------------------------- calibration (ECE)

def test_ece_by_hand_and_its_bootstrap():
    y = np.array([0, 0, 1, 1, 1, 0, 1, 1])
    p = np.array([0.05, 0.15, 0.12, 0.95, 0.91, 0.99, 0.55, 1.0])
    # bins [0,.1): {.05 y0} -> |.05-0|; [.1,.2): {.15 y0, .12 y1} -> |.135-.5|*2; [.5,.6): {.55 y1} -> .45;
    # [.9,1.]: {.95, .91, .99, 1.0 with y 1, 1, 0, 1} -> |.9625-.75|*4
    want = (0.05 + 0.365 * 2 + 0.45 + 0.2125 * 4) / 8
    rel = m.reliability(y, p)
    assert rel["ece"] == pytest.approx(want) and rel["count"] == [1, 2, 0, 0, 0, 1, 0, 0, 0, 4]
    ci = m.ece_bootstrap(y, p, np.full(8, 0.75), n_boot=400, seed=0)
    assert ci["before"][0] <= want <= ci["before"][1]
    assert ci["change"][0] <= m.ece(y, np.full(8, 0.75)) - want <= ci["change"][1]
