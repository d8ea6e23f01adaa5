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


def test_no_fit_without_both_classes_and_a_bounded_fit_on_separable_data():
    assert fit_temperature(np.array([1.0, 2.0] * 20), np.ones(40, int))["temperature"] == 1.0
    assert fit_temperature(np.linspace(-1, 1, 20), np.r_[np.zeros(10, int), np.ones(10, int)])["temperature"] == 1.0
    fit = fit_temperature(np.r_[-np.ones(20), np.ones(20)], np.r_[np.zeros(20, int), np.ones(20, int)])
    assert fit["temperature"] == pytest.approx(calibration.MIN_T, rel=0.01) and "separated perfectly" in fit["note"]


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
