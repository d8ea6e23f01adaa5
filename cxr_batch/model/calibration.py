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

# The search range for T. Guo et al. found T of 1-3 for over-confident modern nets; a class-
# weighted model trained briefly can be under-confident (T = 0.4-0.7 on the phantoms). A validation
# set that the model separates perfectly has no finite optimum (the likelihood keeps rising as
# T -> 0), nor do tiny margins of an untrained head: the fit then stops at the bound and says so.
# The floor is 0.25 (sharpen at most 4x): below it the "optimum" is that artefact of a separated
# validation set, and probabilities of wide margins would round to exactly 0 or 1.
MIN_T, MAX_T = 0.25, 20.0
# Fewer validation cases than this, or fewer of either class: no fit, T = 1. On 12 cases (a smoke
# run) the fit went to the bound and tripled the ECE of the test set.
MIN_CASES, MIN_PER_CLASS = 30, 5


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
    """Maximum-likelihood T on validation margins -> {"temperature", "note", "nll_before", "nll_after"}.

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
        return {"temperature": 1.0, "nll_before": before, "nll_after": before,
                "note": f"not fitted: {m.size - n_pos} NORMAL and {n_pos} PNEUMONIA validation cases, fewer than"
                        f" {MIN_CASES} or {MIN_PER_CLASS} of a class"}
    from scipy.optimize import minimize_scalar  # here: scoring imports this module and never fits (0.3 s)

    res = minimize_scalar(lambda log_t: nll(m, y, np.exp(log_t)), bounds=(np.log(MIN_T), np.log(MAX_T)),
                          method="bounded", options={"xatol": 1e-4})
    t = float(np.exp(res.x))
    note = f"fitted on {m.size} validation cases"
    if t <= MIN_T * 1.001:
        note += f"; stopped at the bound {MIN_T:g}: the likelihood still rose toward sharper probabilities" \
                " (validation separated perfectly, or tiny margins)"
    elif t >= MAX_T * 0.999:
        note += f"; stopped at the bound {MAX_T:g}: the margins carry almost no signal on validation"
    return {"temperature": t, "note": note, "nll_before": before, "nll_after": nll(m, y, t)}
