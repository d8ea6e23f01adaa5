"""Temperature scaling and ECE: the fit lowers the ECE of over-confident models, training fits it on
validation logits, and scoring applies the checkpoint's temperature."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import expit

from cxr_batch import calibration
from cxr_batch.calibration import calibrated, ece, ece_bootstrap, fit_temperature, reliability
from cxr_batch.model import build_model
from cxr_batch.train import TrainSettings, choose_threshold


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


def test_ece_by_hand_and_its_bootstrap():
    y = np.array([0, 0, 1, 1, 1, 0, 1, 1])
    p = np.array([0.05, 0.15, 0.12, 0.95, 0.91, 0.99, 0.55, 1.0])
    # bins [0,.1): {.05 y0} -> |.05-0|; [.1,.2): {.15 y0, .12 y1} -> |.135-.5|*2; [.5,.6): {.55 y1} -> .45;
    # [.9,1.]: {.95, .91, .99, 1.0 with y 1, 1, 0, 1} -> |.9625-.75|*4
    want = (0.05 + 0.365 * 2 + 0.45 + 0.2125 * 4) / 8
    rel = reliability(y, p)
    assert rel["ece"] == pytest.approx(want) and rel["count"] == [1, 2, 0, 0, 0, 1, 0, 0, 0, 4]
    ci = ece_bootstrap(y, p, np.full(8, 0.75), n_boot=400, seed=0)
    assert ci["before"][0] <= want <= ci["before"][1]
    assert ci["change"][0] <= ece(y, np.full(8, 0.75)) - want <= ci["change"][1]


def _features_and_truth(model, n, seed, size=32):
    """Images whose brightness g sets the true P(PNEUMONIA) = sigmoid(8 (g - 0.5)); labels drawn from it."""
    rng = np.random.default_rng(seed)
    g = rng.random(n)
    pixels = np.clip(g[:, None, None] * 200 + 30 + rng.normal(0, 12, (n, size, size)), 0, 255).astype(np.uint8)
    y = (rng.random(n) < expit(8 * (g - 0.5))).astype(np.int64)
    return pixels, y, 8 * (g - 0.5)


def test_training_fits_the_temperature_on_validation_logits_of_a_real_overconfident_network():
    """A real ResNet-18 whose head is set to read the true log-odds from its features, then made
    5x over-confident; train_loop._evaluate (what every epoch runs on validation) must find that."""
    from cxr_batch.train_loop import _evaluate
    from cxr_batch.transforms import normalize

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
    va = _evaluate(model, val_x, val_y, s, torch.device("cpu"), False, torch.nn.CrossEntropyLoss())
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


def test_scoring_applies_the_checkpoint_temperature_and_old_checkpoints_mean_t_1(tmp_path):
    from cxr_batch.checkpoint import make_checkpoint, save_checkpoint
    from cxr_batch.registry import describe
    from cxr_batch.score import Scorer, decode_batch
    from cxr_batch.transforms import normalize
    from images import encode
    from PIL import Image

    net = build_model("resnet18", "none", seed=3, cam_stride=16).eval()
    with torch.no_grad():
        net.fc.weight.mul_(300)  # a spread of probabilities, not all 0.5
    rng = np.random.default_rng(0)
    for i in range(6):
        (tmp_path / "a").mkdir(exist_ok=True)
        (tmp_path / "a" / f"{i}.png").write_bytes(encode(Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)), "PNG"))
    batch = decode_batch({"path": np.array([f"{i}.png" for i in range(6)], dtype=object)}, archive=str(tmp_path / "a"),
                         image_size=64, max_pixels=10**7)
    with torch.no_grad():
        margin = calibration.margins(net(normalize(torch.from_numpy(batch["pixels"])))[0].numpy())
        net.fc.bias.add_(torch.tensor([0.5, -0.5]) * float(np.median(margin)))  # centre: some above 0.5, some below
        margin = calibration.margins(net(normalize(torch.from_numpy(batch["pixels"])))[0].numpy())
    for temperature in (3.0, None):
        ck = make_checkpoint(net, arch="resnet18", image_size=64, threshold=0.5, settings={}, cam_stride=16,
                             temperature=temperature or 1.0)
        if temperature is None:
            del ck["temperature"]  # as written before calibration existed
        save_checkpoint(ck, str(tmp_path / "m.ckpt"))
        info = describe(str(tmp_path / "m.ckpt"))
        assert info.temperature == (temperature or 1.0)
        out = Scorer(info.to_dict(), threads=1, precision="fp32", compile=False, channels_last=True)(dict(batch))
        assert np.allclose(out["logit_pneumonia"], margin, atol=1e-3)
        assert np.allclose(out["prob_pneumonia"], calibrated(margin, temperature or 1.0), atol=1e-4)
        assert out["prob_pneumonia"].min() < 0.4 and out["prob_pneumonia"].max() > 0.6


def test_the_threshold_is_that_of_the_calibrated_probabilities():
    from cxr_batch.train_loop import calibrated_threshold

    margin, y = _known_truth(400, 5, overconfidence=3.0)
    thr, rule = calibrated_threshold(y, margin, 3.0, None)
    assert thr == pytest.approx(choose_threshold(y, calibrated(margin, 3.0), None)[0]) and "Youden" in rule
    assert thr != pytest.approx(choose_threshold(y, calibrated(margin), None)[0], abs=1e-3)  # not the raw scale
    raw_thr, _ = choose_threshold(y, margin, None)
    assert np.array_equal(calibrated(margin, 3.0) >= thr, margin >= raw_thr)  # the same decisions
    thr95, _ = calibrated_threshold(y, margin, 3.0, 0.95)
    assert (calibrated(margin[y == 1], 3.0) >= thr95).mean() >= 0.95
    assert calibrated_threshold(np.ones(5, int), np.ones(5), 2.0, None)[0] == 0.5
