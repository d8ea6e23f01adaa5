"""What the training driver and its workers share: settings checks, the lr schedule, the threshold
rule (on the calibrated scale) and the one rule for the best epoch."""

import random

import numpy as np
import pytest

from cxr_batch.errors import InputError
from cxr_batch.jobs.train_config import (WEAK_VAL_AUC, TrainSettings, best_epoch, calibrated_threshold,
                                         choose_threshold, lr_at, still_learning, weak_model)
from cxr_batch.model.calibration import calibrated


def row(epoch, auc, loss):
    return {"epoch": epoch, "val_auc": auc, "val_loss": loss}


def test_best_epoch_is_the_highest_auc_ties_to_the_lower_loss():
    history = [row(1, 0.8, 0.5), row(2, 0.9, 0.6), row(3, 0.9, 0.4), row(4, 0.85, 0.1)]
    assert best_epoch(history)["epoch"] == 3


def test_without_any_auc_the_best_epoch_is_the_lowest_val_loss_not_the_last():
    history = [row(1, None, 0.7), row(2, None, 0.3), row(3, None, 0.5)]
    assert best_epoch(history)["epoch"] == 2


def saved_as_best(history):
    """The epoch best.ckpt holds at the end: the worker writes it after every epoch that is, at that
    moment, best_epoch of the history so far (train_worker._save)."""
    saved = None
    for i in range(len(history)):
        if best_epoch(history[: i + 1])["epoch"] == history[i]["epoch"]:
            saved = history[i]["epoch"]
    return saved


def test_best_ckpt_holds_the_epoch_the_summary_reports():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 8)
        one_class = rng.random() < 0.3  # val with one class: no AUC in any epoch
        history = [row(e + 1, None if one_class else rng.choice([0.7, 0.8, 0.9, round(rng.random(), 2)]),
                       rng.choice([0.2, 0.3, round(rng.random(), 2)])) for e in range(n)]
        assert saved_as_best(history) == best_epoch(history)["epoch"], history


def curve(train_acc, train_loss, val_auc):
    return [dict(row(e + 1, auc, 0.5), train_acc=acc, train_loss=loss)
            for e, (acc, loss, auc) in enumerate(zip(train_acc, train_loss, val_auc))]


def test_the_summary_says_when_a_run_ended_while_still_learning():
    # A run cut short, in shape: accuracy 0.80 and rising, loss falling, best epoch the last.
    rising = curve([0.5, 0.6, 0.66, 0.7, 0.74, 0.77, 0.8], [0.70, 0.66, 0.63, 0.61, 0.59, 0.57, 0.55],
                   [0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93])
    assert "still learning" in still_learning(rising) and "0.80" in still_learning(rising)
    # Fitted (training accuracy 0.97), a plateau (the loss no longer falls) or a best epoch long past: no note.
    fitted = curve([0.6, 0.8, 0.9, 0.94, 0.95, 0.96, 0.97], [0.6, 0.4, 0.3, 0.2, 0.15, 0.12, 0.1], [0.8] * 6 + [0.95])
    plateau = curve([0.8] * 7, [0.5] * 7, [0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93])
    past = [dict(r, val_auc=0.95 if r["epoch"] == 2 else r["val_auc"]) for r in rising]
    for h in (fitted, plateau, past, rising[:2], [dict(r, train_acc=None) for r in rising]):
        assert still_learning(h) is None, h


def test_a_near_chance_model_is_weak_and_not_registered_unless_asked(tmp_path, monkeypatch):
    """A run at chance (the default network cut too early can end there on real films) prints a verdict and is
    not made the default model of `cxr-batch score`; --register still does it; a good model is registered."""
    from cxr_batch.jobs.train import register_if_fit
    from cxr_batch.model.registry import default_spec

    monkeypatch.setenv("CXR_BATCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CXR_BATCH_MODEL", raising=False)
    flat = curve([0.55] * 12, [0.69] * 12, [0.5, 0.55, 0.56, 0.58, 0.595, 0.59, 0.57, 0.58, 0.59, 0.56, 0.55, 0.57])
    good = curve([0.6, 0.8, 0.9, 0.95, 0.96, 0.97], [0.6, 0.4, 0.3, 0.2, 0.15, 0.12], [0.8, 0.9, 0.95, 0.97, 0.98, 0.98])
    assert "0.595" in weak_model(flat) and f"{WEAK_VAL_AUC:g}" in weak_model(flat) and weak_model(good) is None
    one_class = [dict(r, val_auc=None) for r in good]
    assert "one class" in weak_model(one_class)

    summary = register_if_fit({"best_checkpoint": str(tmp_path / "weak.ckpt")}, flat, complete=True, register=None)
    assert "registered_as_default" not in summary and "--register" in summary["not_registered"]
    assert default_spec() is None
    from cxr_batch.cli.summaries import format_train_summary

    text = format_train_summary(dict(summary, epochs=12, seconds=1.0, images_per_s_per_worker=1.0, best_epoch=5,
                                     val_auc=0.595, val_acc=0.5, threshold=0.5, validation="val/", temperature=1.0))
    assert "WEAK MODEL" in text and "not as the default model" in text
    from cxr_batch.cli.summaries import format_eval_summary

    metrics = {"accuracy": 0.5, "roc_auc": 0.609, "sensitivity": 0.5, "specificity": 0.5}
    evaluated = format_eval_summary({"n_scored": 100, "threshold": 0.5, "metrics": metrics, "ci95": {}}, "r")
    assert "WEAK MODEL    AUC 0.609" in evaluated and "AUC 0.968 (Kermany" in evaluated
    metrics["roc_auc"] = 0.95
    evaluated = format_eval_summary({"n_scored": 100, "threshold": 0.5, "metrics": metrics, "ci95": {}}, "r")
    assert "WEAK" not in evaluated and "AUC 0.968 (Kermany" in evaluated
    register_if_fit({"best_checkpoint": str(tmp_path / "weak.ckpt")}, flat, complete=True, register=True)
    assert default_spec() == str(tmp_path / "weak.ckpt")
    register_if_fit({"best_checkpoint": str(tmp_path / "good.ckpt")}, good, complete=True, register=None)
    assert default_spec() == str(tmp_path / "good.ckpt")
    register_if_fit({"best_checkpoint": str(tmp_path / "cut.ckpt")}, good, complete=False, register=None)
    assert default_spec() == str(tmp_path / "good.ckpt")  # a run stopped early is never registered


def test_learning_rate_warms_up_then_decays_by_cosine():
    s = TrainSettings(data="d", out="o", epochs=5, warmup_epochs=1, lr=1e-3)
    phases = [lr_at(s, e) for e in range(1, 6)]
    assert phases[0] == ("warmup", s.warmup_lr)
    finetune = [lr for phase, lr in phases[1:]]
    assert finetune[0] == pytest.approx(1e-3) and all(a > b for a, b in zip(finetune, finetune[1:]))
    assert TrainSettings(data="d", out="o", weights="none", epochs=3).n_warmup == 0  # nothing to protect


def test_threshold_rules():
    y, p = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert choose_threshold(y, p, None) == (0.8, "Youden's J on val")  # ties go to the higher threshold
    t, rule = choose_threshold(y, p, 1.0)
    assert t == 0.35 and rule == "sensitivity >= 1 on val"
    assert choose_threshold([1, 1], [0.2, 0.9], None) == (0.5, "default 0.5 (val has one class)")


@pytest.mark.parametrize("kwargs,match", [({"arch": "resnet99"}, "Invalid arch"), ({"epochs": 0}, "at least 1"),
                                          ({"placement": "EVERYWHERE"}, "Invalid --placement"),
                                          ({"target_sensitivity": 1.5}, "between 0 and 1"),
                                          ({"translate": 0.5}, "--translate"), ({"translate": -0.1}, "--translate"),
                                          ({"cam_quiet": -0.5}, "--cam-quiet"), ({"cam_consistency": -1}, "--cam-quiet and --cam-consistency")])
def test_bad_settings_are_input_errors(kwargs, match):
    with pytest.raises(InputError, match=match):
        TrainSettings(data="d", out="o", **kwargs)


def test_the_threshold_is_that_of_the_calibrated_probabilities():
    from test_calibration import _known_truth

    margin, y = _known_truth(400, 5, overconfidence=3.0)
    thr, rule = calibrated_threshold(y, margin, 3.0, None)
    assert thr == pytest.approx(choose_threshold(y, calibrated(margin, 3.0), None)[0]) and "Youden" in rule
    assert thr != pytest.approx(choose_threshold(y, calibrated(margin), None)[0], abs=1e-3)  # not the raw scale
    raw_thr, _ = choose_threshold(y, margin, None)
    assert np.array_equal(calibrated(margin, 3.0) >= thr, margin >= raw_thr)  # the same decisions
    thr95, _ = calibrated_threshold(y, margin, 3.0, 0.95)
    assert (calibrated(margin[y == 1], 3.0) >= thr95).mean() >= 0.95
    assert calibrated_threshold(np.ones(5, int), np.ones(5), 2.0, None)[0] == 0.5


def test_a_rerun_resumes_only_a_run_of_the_same_settings(tmp_path):
    """Re-running an --out continues its last.ckpt: with other settings, or a file that is not a
    checkpoint, it must stop in one line before any Ray work instead of mixing two runs."""
    import torch

    from cxr_batch.errors import CheckpointError
    from cxr_batch.jobs.train import check_resumable
    from cxr_batch.model.checkpoint import make_checkpoint, save_checkpoint
    from cxr_batch.model.network import build_model
    from dataclasses import asdict, replace

    s = TrainSettings(data=str(tmp_path / "data"), out=str(tmp_path / "run"), arch="resnet18", weights="none",
                      epochs=3, image_size=64, cam_layer=3)
    check_resumable(s)  # nothing there yet: a new run
    (tmp_path / "run").mkdir()
    net = build_model("resnet18", "none", cam_stride=16)
    save_checkpoint(make_checkpoint(net, arch="resnet18", image_size=64, threshold=0.5, settings=asdict(s),
                                    cam_stride=16, epoch=1), str(tmp_path / "run" / "last.ckpt"))
    check_resumable(replace(s, workers=1, max_failures=3))  # how it runs may change
    with pytest.raises(InputError, match=r"cam_layer 3 -> 4"):
        check_resumable(replace(s, cam_layer=4))
    with pytest.raises(InputError, match=r"cam_layer 3 -> 4"):  # today's default
        check_resumable(TrainSettings(data=s.data, out=s.out, arch="resnet18", weights="none", epochs=3, image_size=64))
    before = {k: v for k, v in asdict(s).items() if k != "cam_layer"}  # a run from before the layer3 map
    save_checkpoint(make_checkpoint(net, arch="resnet18", image_size=64, threshold=0.5, settings=before,
                                    cam_stride=16, epoch=1), str(tmp_path / "run" / "last.ckpt"))
    check_resumable(replace(s, cam_layer=4))  # it had layer4: resumed as such
    with pytest.raises(InputError, match=r"cam_layer 4 -> 3"):
        check_resumable(s)
    with pytest.raises(InputError, match=r"arch 'resnet18' -> 'resnet50'.*image_size 64 -> 96.*new --out"):
        check_resumable(replace(s, arch="resnet50", image_size=96))
    torch.save({"state_dict": {}}, tmp_path / "run" / "last.ckpt")
    with pytest.raises(CheckpointError, match="not a cxr-batch checkpoint"):
        check_resumable(s)


def test_cpu_workers_get_the_most_cpus_that_still_place_every_worker():
    from cxr_batch.jobs.train_config import fit_worker_cpus

    assert fit_worker_cpus(1, [2.0], use_gpu=False) == 2  # one worker on a 2-CPU machine: both cores
    assert fit_worker_cpus(2, [2.0], use_gpu=False) == 1
    assert fit_worker_cpus(2, [8.0, 8.0], use_gpu=False) == 8  # one per node
    assert fit_worker_cpus(3, [8.0, 8.0], use_gpu=False) == 4  # 5 each would leave the third without a node
    assert fit_worker_cpus(3, [16.0, 2.0], use_gpu=False) == 5  # 16 // 5 = 3 fit on the big node
    assert fit_worker_cpus(4, [2.0], use_gpu=False) == 1  # more workers than CPUs: _check_fits says so
    assert fit_worker_cpus(1, [16.0], use_gpu=True) == 1  # GPU workers: the GPU does the arithmetic
    assert fit_worker_cpus(1, [], use_gpu=False) == 1


def test_train_cam_layer_gives_the_stride_its_layer_has(tmp_path):
    """`--cam-layer 2` trains the layer2 map (stride 8), `--cam-layer 3` layer3's (stride 16); a layer with a
    stride it cannot have is refused in one line; not given, the whole network, from scratch and pretrained."""
    import json

    from click.testing import CliRunner

    from cxr_batch.cli import main
    from cxr_batch.model.archs import TRAIN_STRIDE

    def settings(*args):
        r = CliRunner().invoke(main, ["train", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), *args, "--json"])
        assert "No labelled images" in r.output  # it got as far as the data
        return json.loads(r.output.split("settings: ", 1)[1].splitlines()[0])

    assert (settings("--cam-layer", "2")["cam_layer"], settings("--cam-layer", "2")["cam_stride"]) == (2, 8)
    for layer, stride in ((3, 16), (4, TRAIN_STRIDE[4])):
        assert TrainSettings(data="d", out="o", cam_layer=layer).cam_stride == stride  # the layer's, when not given
    assert TrainSettings(data="d", out="o", cam_layer=4, cam_stride=16).cam_stride == 16  # layer4 has a choice
    assert settings("--cam-stride", "16")["cam_stride"] == 16
    with pytest.raises(InputError, match="cam stride 8 with cam layer 2"):
        TrainSettings(data="d", out="o", cam_layer=2, cam_stride=16)
    # Not given: the whole network whatever the weights, its stride resolved in the settings, so a checkpoint
    # and a resume see numbers; no shifts.
    for weights in ("none", "imagenet"):
        got = settings("--weights", weights)
        assert (got["cam_layer"], got["cam_stride"], got["translate"]) == (4, TRAIN_STRIDE[4], 0.0)
    assert (TrainSettings(data="d", out="o").cam_layer, TrainSettings(data="d", out="o").translate) == (4, 0.0)
