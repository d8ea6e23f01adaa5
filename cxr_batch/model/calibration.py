"""Probabilities that mean what they say: temperature scaling.

Temperature scaling (Guo et al., ICML 2017) divides the logits by one number T fitted on
validation data by maximum likelihood; T > 1 softens an over-confident model. It is monotone, so
the ranking (AUC) and the decisions at a threshold mapped with it do not change: only the
probabilities do. With two classes, softmax(logits / T)[PNEUMONIA] = sigmoid(margin / T), where
margin = logit_PNEUMONIA - logit_NORMAL, so everything here works on margins.

How well it worked is measured by the expected calibration error (``reports.metrics.ece``,
``calibration_report``). Pure numpy/scipy: the training workers, evaluate and the tests use the
same functions.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit, logit

from .. import POSITIVE

# The search range for T. Guo et al. found T of 1-3 for over-confident modern nets; a class-weighted model
# trained briefly can be under-confident (T < 1). A validation set that the model separates perfectly has no
# finite optimum (the likelihood keeps rising as T -> 0), nor do the tiny margins of an untrained head: a fit
# that ends on a bound is that artefact, not a temperature, and is not used.
MIN_T, MAX_T = 0.25, 20.0
# Fewer validation cases than this, or fewer of either class: too few to trust a fit, T = 1.
MIN_CASES, MIN_PER_CLASS = 30, 5

# The rule (fit_temperature): T = 1, and the note says why, unless (1) validation has at least MIN_CASES cases
# and MIN_PER_CLASS of each class, (2) the fit ends inside (MIN_T, MAX_T), and (3) a T fitted on each half of
# validation lowers the NLL of the other half. (3) is what keeps a fit from making things worse: one parameter
# fitted on a few dozen cases can still chase their noise, and only held-out cases show it.


def margins(logits):
    """(N, 2) logits, NORMAL then PNEUMONIA -> (N,) margins logit_PNEUMONIA - logit_NORMAL.

    A torch tensor stays a tensor on its device (the scorer and the training loop take it from the
    forward); anything else becomes float64 numpy."""
    a = logits if hasattr(logits, "detach") else np.asarray(logits, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"logits must have shape (N, 2), got {tuple(a.shape)}.")
    return a[:, POSITIVE] - a[:, 1 - POSITIVE]


def calibrated(margin, temperature: float = 1.0) -> np.ndarray:
    """P(PNEUMONIA) = sigmoid(margin / T): the same number as softmax(logits / T)[PNEUMONIA]."""
    return expit(np.asarray(margin, dtype=np.float64) / float(temperature))


def margin_from_prob(p, temperature: float) -> np.ndarray:
    """Undo ``calibrated`` for tables that kept only the probability (older tables, no margin
    column). A float32 probability of exactly 0 or 1 comes back as a large finite margin."""
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return logit(q) * float(temperature)


def nll(margin, y, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of labels ``y`` (1 = PNEUMONIA) under sigmoid(margin / T)."""
    m, y = np.asarray(margin, np.float64), np.asarray(y)
    sign = np.where(y == 1, 1.0, -1.0)
    return float(np.mean(np.logaddexp(0.0, -sign * m / float(temperature))))


def fit_temperature(margin, y) -> dict:
    """Temperature on validation margins by the rule above -> {"temperature", "fitted", "note",
    "nll_before", "nll_after"}; ``temperature`` is 1.0 whenever the rule keeps it.

    One parameter, a convex problem in 1/T: a bounded scalar search over log T is exact enough
    (to 1e-4 in log T) and takes milliseconds for the public set's validation share."""
    m, y = np.asarray(margin, np.float64), np.asarray(y)
    if m.shape != y.shape or m.ndim != 1:
        raise ValueError(f"margin and y must be 1-D of one length, got {m.shape} and {y.shape}.")
    if not np.isfinite(m).all():
        raise ValueError("margin holds NaN or infinite values.")
    before = nll(m, y) if m.size else None
    n_pos = int((y == 1).sum())
    if m.size < MIN_CASES or min(n_pos, m.size - n_pos) < MIN_PER_CLASS:
        return _kept(before, f"{m.size - n_pos} NORMAL and {n_pos} PNEUMONIA validation cases, fewer than"
                             f" {MIN_CASES} or {MIN_PER_CLASS} of a class")
    t = _search(m, y)
    if t <= MIN_T * 1.001 or t >= MAX_T * 0.999:
        why = ("the likelihood still rose toward sharper probabilities (validation separated, or tiny margins)"
               if t < 1 else "the margins carry almost no signal on validation")
        return _kept(before, f"the fit stopped at its bound {MIN_T if t < 1 else MAX_T:g}: {why}")
    held_out = _held_out_gain(m, y)
    if held_out <= 0:
        return _kept(before, f"T {t:.3g} fitted on one half of validation did not lower the other half's NLL")
    return {"temperature": t, "fitted": True, "nll_before": before, "nll_after": nll(m, y, t),
            "note": f"fitted on {m.size} validation cases (held-out NLL {held_out:.3f} lower than with T = 1)"}


def _kept(before, why: str) -> dict:
    return {"temperature": 1.0, "fitted": False, "nll_before": before, "nll_after": before, "note": f"T = 1 kept: {why}"}


def _search(m, y) -> float:
    from scipy.optimize import minimize_scalar  # here: scoring imports this module and never fits

    res = minimize_scalar(lambda log_t: nll(m, y, np.exp(log_t)), bounds=(np.log(MIN_T), np.log(MAX_T)),
                          method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


def _held_out_gain(m, y) -> float:
    """Summed NLL with T = 1 minus with a T fitted on the other half, over two class-stratified halves
    (every other case of each class, in input order): > 0 when the fit generalises."""
    half = np.zeros(m.size, dtype=bool)
    for k in (0, 1):
        idx = np.flatnonzero(y == k)
        half[idx[::2]] = True
    gain = 0.0
    for fit_on in (half, ~half):
        t = _search(m[fit_on], y[fit_on])
        gain += (nll(m[~fit_on], y[~fit_on]) - nll(m[~fit_on], y[~fit_on], t)) * int((~fit_on).sum())
    return gain / m.size
