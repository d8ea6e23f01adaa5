"""Training end to end on a real local Ray with 2 CPU workers, then evaluate and score with the result."""

import csv
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cxr_batch import CLASSES
from cxr_batch.model.checkpoint import load_checkpoint
from cxr_batch.cli import main
from cxr_batch.jobs.evaluate import EvaluateSettings, run_evaluate
from cxr_batch.reports.metrics import binary_metrics, pointing_game
from cxr_batch.synth.archive import make_archive
from cxr_batch.jobs.train import run_train
from cxr_batch.jobs.train_config import TrainSettings
from cxr_batch.model.archs import TRAIN_STRIDE

pytestmark = pytest.mark.slow

# The fixture trains the default network (the whole ResNet-18, CAM from layer4) from scratch, briefly and small,
# on the phantom; tests/test_learning.py trains it on the other task families. Chance is 0.5: the bars say
# "learned", not "tuned" (another CPU's float rounding changes an 8-epoch run).
MIN_TEST_ACCURACY = 0.75
MIN_TEST_AUC = 0.85
# What a reader of the CAMs needs: the evidence point within 1.5 lesion radii of most lesions, unbiased.
TARGET_POINTING, TARGET_MEAN_OFFSET = 0.9, 0.25  # share of peaks within 1.5 radii; |mean offset| in radii


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = root / "data"
    make_archive(data, n_train=400, n_val=80, n_test=120, size=160, seed=11)
    # Relative paths, as the README's `cxr-batch demo --out demo` gives them: Ray Train runs its
    # workers in another directory, so paths must be made absolute before they travel.
    cwd = os.getcwd()
    os.chdir(root)
    try:
        s = TrainSettings(data="data", out="run", arch="resnet18", weights="none", epochs=8,
                          image_size=96, batch_size=16, workers=2, lr=5e-4)
        summary = run_train(s, register=True, echo=lambda *a: None)
        report = run_evaluate(EvaluateSettings(checkpoint=os.path.relpath(summary["best_checkpoint"]),
                                               folder="data/test", out="report", n_boot=300,
                                               deletion_images=16, deletion_steps=8, cam_size=200))
    finally:
        os.chdir(cwd)
    return root, s, summary, report


def test_every_epoch_is_recorded_with_metrics_over_all_workers(trained):
    root, s, summary, _ = trained
    assert summary["best_checkpoint"] == str(root / "run" / "best.ckpt")  # made absolute, in the given folder
    history = json.loads((root / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, s.epochs + 1))
    assert all(h["val_n"] == 80 for h in history)  # both workers' val shards, not rank 0's half
    ck = load_checkpoint(summary["best_checkpoint"]).ckpt
    assert ck["classes"] == list(CLASSES) and ck["settings"]["arch"] == "resnet18"
    assert 0 < ck["threshold"] < 1 and ck["epoch"] == summary["best_epoch"]
    last = load_checkpoint(str(root / "run" / "last.ckpt")).ckpt
    assert last["epoch"] == s.epochs and last["optimizer"] is not None


def test_trained_model_beats_chance_on_held_out_images(trained):
    _, _, _, report = trained
    assert report["n_scored"] == 120
    assert report["metrics"]["accuracy"] >= MIN_TEST_ACCURACY, report["metrics"]
    assert report["metrics"]["roc_auc"] >= MIN_TEST_AUC, report["metrics"]


def _true_positive_peaks(root):
    """(peaks (N, 2), lesions x, y, r (N, 3)) of the test report's correctly flagged PNEUMONIA rows."""
    truth = {r["path"]: (float(r["x"]), float(r["y"]), float(r["r"]))
             for r in csv.DictReader(open(root / "data" / "truth.csv")) if r["x"]}
    rows = [r for r in pq.read_table(root / "report" / "predictions.parquet").to_pylist()
            if r["error"] is None and r["label"] == r["pred"] == "PNEUMONIA"]
    return (np.array([(r["cam_peak_x"], r["cam_peak_y"]) for r in rows]),
            np.array([truth["test/" + r["path"]] for r in rows]))


def test_cam_peaks_point_at_the_lesions_far_more_often_than_chance(trained):
    """Chance measured on the same images: every peak scored against every other image's lesion. A map
    that lights up the same anatomy whatever the lesion (the heart, a dome) scores about chance."""
    root, _, _, report = trained
    peaks, lesions = _true_positive_peaks(root)
    game = pointing_game(peaks, lesions)
    reported = report["pointing"]["true_positives"]
    # >= 30 true positives (38 of 60 in the run above) for a rate that can tell 3x chance from chance
    assert game["n"] == reported["n"] >= 30 and game["hits"] == reported["hits"]
    chance = np.mean([pointing_game(np.roll(peaks, k, axis=0), lesions)["rate"] for k in range(1, len(peaks))])
    assert game["rate"] >= 3 * chance, (game, chance)


@pytest.mark.xfail(strict=True, reason="8 epochs at 96 px are too few: the default network's fixture"
                                       " points 38/42 (90%), but with mean dy +0.52 radii, with the evidence point")
def test_cam_localisation_meets_the_target(trained):
    game = trained[3]["pointing"]["true_positives"]
    assert game["rate"] >= TARGET_POINTING, game
    assert max(abs(game["mean_dx_in_radii"]), abs(game["mean_dy_in_radii"])) < TARGET_MEAN_OFFSET, game


def test_evaluate_writes_every_file_and_its_metrics_match_the_parquet(trained):
    root, _, _, report = trained
    out = root / "report"
    for name in ("metrics.json", "report.md", "report.html", "roc.png", "confusion.png", "training_curves.png",
                 "errors_montage.png", "reliability.png", "deletion.png"):
        assert (out / name).stat().st_size > 0, name
    from PIL import Image

    for png in out.glob("*.png"):
        with Image.open(png) as im:
            assert im.size[0] > 200
    cams = sorted((out / "cams").rglob("*.png"))
    assert len(cams) == 120  # one overlay per test image, at the asked size (the model saw 96 px)
    for png in cams[:5]:
        with Image.open(png) as im:
            assert im.size == (200, 200)
    table = pq.read_table(out / "predictions.parquet").to_pylist()
    y = np.array([CLASSES.index(r["label"]) for r in table if r["error"] is None])
    p = np.array([r["prob_pneumonia"] for r in table if r["error"] is None])
    again = binary_metrics(y, p, report["threshold"])
    saved = json.loads((out / "metrics.json").read_text())
    for k in ("accuracy", "sensitivity", "specificity", "roc_auc", "f1"):
        assert again[k] == pytest.approx(saved["metrics"][k]), k
        lo, hi = saved["ci95"][k]
        assert lo <= saved["metrics"][k] <= hi
    assert saved["metrics"]["confusion"] == again["confusion"]


def test_finished_run_is_the_default_model_of_score(trained, tmp_path):
    root, _, summary, _ = trained
    r = CliRunner().invoke(main, ["score", str(root / "data" / "val"), "--out", str(tmp_path / "r.parquet"), "--no-cams"])
    assert r.exit_code == 0, r.output
    rows = pq.read_table(tmp_path / "r.parquet").to_pylist()
    assert len(rows) == 80 and {r["model"] for r in rows} == {load_checkpoint(summary["best_checkpoint"]).model_id}


@pytest.fixture(scope="module")
def tiny_with_bad_files(tmp_path_factory):
    from images import broken

    data = tmp_path_factory.mktemp("tiny") / "data"
    make_archive(data, n_train=24, n_val=0, n_test=0, size=64, seed=2)
    for name, blob in broken().items():
        (data / "train" / "NORMAL" / name).write_bytes(blob)
    return data


def test_workers_notes_reach_the_driver_and_each_epoch_is_one_line(ray_session, tiny_with_bad_files, tmp_path):
    """Workers' own output stays in Ray's logs; what the user must know comes back through the driver."""
    r = CliRunner().invoke(main, ["train", str(tiny_with_bad_files), "--out", str(tmp_path / "run"), "--arch", "resnet18",
                                  "--weights", "none", "--epochs", "2", "--image-size", "64", "--batch-size", "8",
                                  "--workers", "2", "--cam-quiet", "0.5", "--no-register"])
    assert r.exit_code == 0, r.output
    assert "quiet-NORMAL loss 0.5" in r.stderr  # and the two DDP workers train with it
    notes = [line for line in r.stderr.splitlines() if line.startswith("rank ") and "unreadable images" in line]
    assert notes and {n.split(":")[0] for n in notes} <= {"rank 0", "rank 1"}, r.stderr
    assert sum(int(n.split("skipped ")[1].split()[0]) for n in notes) == len(broken_names())  # each bad file once
    epochs = [line for line in r.stderr.splitlines() if line.startswith("epoch ")]
    assert [e.split()[1] for e in epochs] == ["1/2", "2/2"] and "ETA" in epochs[0], r.stderr


def broken_names():
    from images import broken

    return list(broken())


def test_a_failure_in_the_workers_is_one_line(ray_session, tmp_path):
    data = tmp_path / "data"
    make_archive(data, n_train=4, n_val=0, n_test=0, size=64, seed=2)
    for jpeg in (data / "train").rglob("*.jpeg"):
        jpeg.write_bytes(b"not an image")
    r = CliRunner().invoke(main, ["train", str(data), "--out", str(tmp_path / "run"), "--arch", "resnet18",
                                  "--weights", "none", "--epochs", "1", "--image-size", "64", "--workers", "1",
                                  "--max-failures", "0", "--no-register"])
    assert r.exit_code == 1, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "Training failed in its workers: rank 0: InputError" in errors[0], r.output
    assert "could be read" in errors[0] and "Traceback" not in r.output


def test_the_checkpoint_temperature_is_fitted_on_validation_and_applied_by_scoring(trained):
    from scipy.special import expit

    from cxr_batch.reports.metrics import ece

    root, _, summary, report = trained
    ck = load_checkpoint(summary["best_checkpoint"]).ckpt
    best = json.loads((root / "run" / "history.json").read_text())[summary["best_epoch"] - 1]
    assert ck["temperature"] == best["temperature"] == summary["temperature"]
    assert (ck["temperature"] != 1.0) or best["temperature_note"].startswith("T = 1 kept:"), best["temperature_note"]
    assert ck["threshold"] == best["threshold"]  # chosen on the calibrated probabilities (see test_calibration)
    rows = [r for r in pq.read_table(root / "report" / "predictions.parquet").to_pylist() if r["error"] is None]
    logit = np.array([r["logit_pneumonia"] for r in rows])
    assert np.allclose([r["prob_pneumonia"] for r in rows], expit(logit / ck["temperature"]), atol=1e-5)
    assert {r["temperature"] for r in rows} == {np.float32(ck["temperature"])}
    y = np.array([CLASSES.index(r["label"]) for r in rows])
    cal = report["calibration"]
    assert cal["ece_before"] == pytest.approx(ece(y, expit(logit)), abs=1e-6)
    assert cal["ece_after"] == pytest.approx(ece(y, expit(logit / ck["temperature"])), abs=1e-6)
    assert cal["ece_before_ci95"][0] <= cal["ece_before"] <= cal["ece_before_ci95"][1]
    assert cal["source"] == "logit_pneumonia column"
    assert ck["val_files"] == json.loads((root / "run" / "val_files.json").read_text())["files"]
    assert len(ck["val_files"]) == 80 and all(f.startswith("val/") for f in ck["val_files"])  # relative to DATA
    # two CPU workers on the session's 2-CPU Ray: one CPU (and torch thread) each, recorded with the run
    assert json.loads((root / "run" / "settings.json").read_text())["cpus_per_worker"] == 1
    assert ck["settings"]["cpus_per_worker"] == 1


def test_deletion_curves_start_at_the_scored_probability_and_the_cam_beats_random(trained):
    root, s, _, report = trained
    d = report["deletion"]
    assert (s.cam_layer, s.cam_stride) == (4, TRAIN_STRIDE[4])  # the default: the whole network's map
    side = -(-s.image_size // s.cam_stride)
    assert d["n_images"] == 16 and len(d["cam_curve"]) == 9 and d["grid"] == [side, side]
    table = {r["path"]: r["prob_pneumonia"] for r in pq.read_table(root / "report" / "predictions.parquet").to_pylist()}
    # step 0 is the scoring job's own number: the same model, preparation and precision
    assert np.allclose(d["p_start"], [table[p] for p in d["paths"]], atol=1e-4)
    assert all(p.startswith("PNEUMONIA/") for p in d["paths"])
    assert d["auc_difference"] > 0, d  # a model that learned the lesion: its CAM finds the evidence sooner


def test_evaluate_page_shows_the_folder_in_a_browser(trained, browser, tmp_path):
    """report.html beside report.md: loads from disk with every image, its numbers are metrics.json's,
    and a section appears when its data is in the folder (and the page still works without it)."""
    import re
    import shutil

    from browser import open_page

    from cxr_batch.reports.html.evaluate import write_evaluate_report
    from cxr_batch.reports.html.page import show

    root, _, _, _ = trained
    saved = json.loads((root / "report" / "metrics.json").read_text())
    pg, check = open_page(browser, root / "report" / "report.html", tmp_path / "evaluate-report.png")
    keep = os.environ.get("CXR_REPORT_SCREENSHOTS")
    if keep:
        os.makedirs(keep, exist_ok=True)
        shutil.copy(tmp_path / "evaluate-report.png", os.path.join(keep, "evaluate-report.png"))
    assert check.console == [] and check.requests_failed == [] and check.external == []
    assert check.images and all(i["ok"] for i in check.images), check.images
    for key in ("accuracy", "sensitivity", "specificity", "roc_auc"):
        shown = pg.locator(f"tr[data-metric='{key}'] td.num").first.inner_text()
        assert float(shown) == pytest.approx(saved["metrics"][key], abs=5e-4), key
    cells = dict(pg.eval_on_selector_all("#confusion td[data-cell]", "cs => cs.map(c => [c.dataset.cell, c.querySelector('.metric-big').textContent])"))
    assert {k: int(v.replace(",", "")) for k, v in cells.items()} == saved["metrics"]["confusion"]
    assert pg.locator("#errors figure.tile").count() == min(12, sum(saved["metrics"]["confusion"][k] for k in ("fp", "fn")))
    # this evaluation's own calibration and deletion results, with their plots
    assert pg.locator("#localisation").count() == 1 and pg.locator("#calibration").count() == 1
    assert pg.locator("#calibration img").count() == 1 and pg.locator("#localisation img").count() >= 1
    ece_after = show(saved["calibration"]["ece_after"])  # as the page writes numbers (4 significant digits)
    assert f"ece after\t{ece_after}" in pg.locator("#calibration").inner_text()
    pg.close()

    # A later evaluate adds a reliability diagram and a calibration entry; an older one lacks predictions.
    folder = tmp_path / "report"
    shutil.copytree(root / "report", folder, ignore=shutil.ignore_patterns("predictions.parquet"))
    from PIL import Image

    Image.new("RGB", (320, 240), "white").save(folder / "reliability.png")  # only its name matters here
    saved["calibration"] = {"temperature": 1.7, "ece_before": 0.081, "ece_before_ci95": [0.05, 0.11], "ece_after": 0.032,
                            "ece_after_ci95": [0.02, 0.05], "reliability_after": {"ece": 0.032, "counts": list(range(15))}}
    (folder / "metrics.json").write_text(json.dumps(saved))
    pg, check = open_page(browser, write_evaluate_report(str(folder)), tmp_path / "changed.png")
    assert check.console == [] and all(i["ok"] for i in check.images)
    calibration = pg.locator("#calibration").inner_text()
    assert "ece after\t0.032 (95% CI 0.02 – 0.05)" in calibration and "ci95" not in calibration
    assert "reliability after › counts\t15 values" in calibration and pg.locator("#calibration img").count() == 1
    assert pg.locator("#errors").count() == 0 and pg.locator("#distribution").count() == 0
    assert re.search(r"Metrics", pg.locator("nav.toc").inner_text())
    pg.close()
