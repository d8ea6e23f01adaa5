"""Temperature scaling (model/calibration.py): the fit lowers the ECE of over-confident models, and
training fits it on validation logits every epoch. Scoring applying it: test_score_stages; the
threshold on the calibrated scale: test_train_config; the ECE itself: test_metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import expit

from cxr_batch.jobs.train_config import TrainSettings, choose_threshold
from cxr_batch.model import calibration
from cxr_batch.model.calibration import calibrated, fit_temperature
from cxr_batch.model.network import build_model
from cxr_batch.reports.metrics import ece


def _known_truth(n, seed, overconfidence):
    """True log-odds z, labels drawn from them, and a model that reports overconfidence x z."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, n)
    y = (rng.random(n) < expit(z)).astype(int)
    return overconfidence * z, y


def test_temperature_scaling_lowers_the_ece_of_an_overconfident_model_with_known_truth():
    val_m, val_y = _known_truth(2000, 0, overconfidence=4.0)
    test_m, test_y = _known_truth(2000, 1, overconfidence=4.0)
    fit = fit_temperature(val_m, val_y)
    assert fit["temperature"] == pytest.approx(4.0, rel=0.15)  # it finds the over-confidence it was given
    assert fit["nll_after"] < fit["nll_before"]
    before, after = ece(test_y, calibrated(test_m)), ece(test_y, calibrated(test_m, fit["temperature"]))
    assert before > 0.08 and after < 0.03 and after < before / 3, (before, after)
    # an under-confident model gets T < 1; a calibrated one T near 1
    assert fit_temperature(*_known_truth(2000, 2, overconfidence=0.5))["temperature"] == pytest.approx(0.5, rel=0.15)
    assert fit_temperature(*_known_truth(2000, 3, overconfidence=1.0))["temperature"] == pytest.approx(1.0, rel=0.15)


def test_the_temperature_stays_1_when_validation_cannot_be_trusted_and_says_why():
    """The rule: T = 1 when validation is too small or one-class, when the fit ends on a bound, and when a T
    fitted on one half of validation does not lower the other half's NLL."""
    one_class = fit_temperature(np.array([1.0, 2.0] * 20), np.ones(40, int))
    few = fit_temperature(np.linspace(-1, 1, 20), np.r_[np.zeros(10, int), np.ones(10, int)])
    separated = fit_temperature(np.r_[-np.ones(20), np.ones(20)], np.r_[np.zeros(20, int), np.ones(20, int)])
    for fit in (one_class, few, separated):
        assert fit["temperature"] == 1.0 and not fit["fitted"] and fit["note"].startswith("T = 1 kept:"), fit
        assert fit["nll_after"] == fit["nll_before"]
    assert "fewer than" in few["note"] and "bound 0.25" in separated["note"]
    # A calibrated model on a small validation set: the full-set optimum is a little off 1 by chance, and
    # held out it does not help, so it is not used.
    kept = [fit_temperature(*_known_truth(40, seed, overconfidence=1.0)) for seed in range(20)]
    assert sum(not f["fitted"] for f in kept) >= 5, [f["note"] for f in kept]
    assert any("did not lower the other half" in f["note"] for f in kept)
    # ... while a clearly over-confident one is fitted on the same number of cases.
    fitted = [fit_temperature(*_known_truth(60, seed, overconfidence=5.0)) for seed in range(10)]
    assert sum(f["fitted"] for f in fitted) >= 8 and all(f["temperature"] > 1.5 for f in fitted if f["fitted"])


def test_a_kept_temperature_never_makes_held_out_calibration_worse_on_average():
    """Over many small validation sets, the rule's T gives a lower mean test NLL than the plain fit's."""
    from cxr_batch.model.calibration import _search, nll

    rule, plain = [], []
    for seed in range(30):
        m, y = _known_truth(40, 100 + seed, overconfidence=1.0)
        tm, ty = _known_truth(2000, 200 + seed, overconfidence=1.0)
        rule.append(nll(tm, ty, fit_temperature(m, y)["temperature"]))
        plain.append(nll(tm, ty, _search(m, y)))
    assert np.mean(rule) < np.mean(plain), (np.mean(rule), np.mean(plain))


def _features_and_truth(model, n, seed, size=32):
    """Images whose brightness g sets the true P(PNEUMONIA) = sigmoid(8 (g - 0.5)); labels drawn from it."""
    rng = np.random.default_rng(seed)
    g = rng.random(n)
    pixels = np.clip(g[:, None, None] * 200 + 30 + rng.normal(0, 12, (n, size, size)), 0, 255).astype(np.uint8)
    y = (rng.random(n) < expit(8 * (g - 0.5))).astype(np.int64)
    return pixels, y, 8 * (g - 0.5)


def test_training_fits_the_temperature_on_validation_logits_of_a_real_overconfident_network():
    """A real ResNet-18 whose head is set to read the true log-odds from its features, then made
    5x over-confident; train_worker._evaluate (what every epoch runs on validation) must find that."""
    from cxr_batch.jobs.train_worker import _evaluate
    from cxr_batch.pixels.transforms import normalize

    torch.manual_seed(0)
    model = build_model("resnet18", "none", seed=0, cam_stride=16).eval()
    fit_x, _, fit_z = _features_and_truth(model, 200, 0)
    with torch.no_grad():
        feats = model.trunk(normalize(torch.from_numpy(fit_x))).mean((2, 3)).double().numpy()
    a = np.c_[feats, np.ones(len(feats))]
    coef = np.linalg.solve(a.T @ a + 1e-3 * np.eye(a.shape[1]), a.T @ fit_z)  # ridge: margin ~ true log-odds
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor(np.stack([-coef[:-1], coef[:-1]]) * 5 / 2, dtype=torch.float32))
        model.fc.bias.copy_(torch.tensor([-coef[-1], coef[-1]]) * 5 / 2)
    s = TrainSettings(data="-", out="-", arch="resnet18", weights="none", batch_size=64)
    val_x, val_y, _ = _features_and_truth(model, 300, 1)
    va = _evaluate(model, val_x, val_y, s, torch.device("cpu"), torch.nn.CrossEntropyLoss())
    assert 3.0 < va["temperature"] < 8.0, va
    assert va["ece_after"] < va["ece_before"] / 2, va

    test_x, test_y, _ = _features_and_truth(model, 300, 2)  # held out from the fit
    with torch.no_grad():
        logits = model(normalize(torch.from_numpy(test_x)))[0].numpy()
    margin = calibration.margins(logits)
    before, after = ece(test_y, calibrated(margin)), ece(test_y, calibrated(margin, va["temperature"]))
    assert after < before / 2, (before, after)
    # the threshold is the Youden threshold of the calibrated probabilities: same decisions as the
    # raw ones mapped through the same monotone transform
    with torch.no_grad():
        vm = calibration.margins(model(normalize(torch.from_numpy(val_x)))[0].numpy())
    thr, _ = choose_threshold(val_y, calibrated(vm, va["temperature"]), None)
    assert va["threshold"] == pytest.approx(thr)
    raw_thr, _ = choose_threshold(val_y, calibrated(vm), None)
    assert np.array_equal(calibrated(vm, va["temperature"]) >= thr, calibrated(vm) >= raw_thr)
