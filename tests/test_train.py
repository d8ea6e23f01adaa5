"""Training end to end on a real local Ray with 2 CPU workers, then evaluate and score with the result."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cxr_batch import CLASSES
from cxr_batch.checkpoint import load_checkpoint
from cxr_batch.cli import main
from cxr_batch.evaluate import EvaluateSettings, run_evaluate
from cxr_batch.metrics import binary_metrics
from cxr_batch.synth import make_archive
from cxr_batch.train import TrainSettings, run_train

pytestmark = pytest.mark.slow

# Measured on the 2-core machine with exactly this archive and setting (note on issue 3): val accuracy
# 0.975 from epoch 5, test accuracy 0.99, AUC 1.00, CAM pointing 58/59 true positives. With
# lr 2e-3 the same run stalled near chance until epoch 7 (test acc 0.80): the bars leave room.
MIN_TEST_ACCURACY = 0.9
MIN_POINTING_RATE = 0.75


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
                          image_size=128, batch_size=16, workers=2, lr=5e-4)
        summary = run_train(s, register=True, echo=lambda *a: None)
        report = run_evaluate(EvaluateSettings(checkpoint=os.path.relpath(summary["best_checkpoint"]),
                                               folder="data/test", out="report", n_boot=300))
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


def test_cam_peak_falls_on_the_planted_opacity(trained):
    _, _, _, report = trained
    game = report["pointing"]["true_positives"]
    assert game["n"] >= 40
    assert game["rate"] >= MIN_POINTING_RATE, game


def test_evaluate_writes_every_file_and_its_metrics_match_the_parquet(trained):
    root, _, _, report = trained
    out = root / "report"
    for name in ("metrics.json", "report.md", "report.html", "roc.png", "confusion.png", "training_curves.png", "errors_montage.png"):
        assert (out / name).stat().st_size > 0, name
    from PIL import Image

    for png in out.glob("*.png"):
        with Image.open(png) as im:
            assert im.size[0] > 200
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


def test_evaluate_page_shows_the_folder_in_a_browser(trained, browser, tmp_path):
    """report.html beside report.md: loads from disk with every image, its numbers are metrics.json's,
    and a section appears when its data is in the folder (and the page still works without it)."""
    import re
    import shutil

    from browser import open_page

    from cxr_batch.report_evaluate import write_evaluate_report

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
    assert pg.locator("#localisation").count() == 1 and pg.locator("#calibration").count() == 0
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
