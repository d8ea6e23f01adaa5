"""The evaluation page from a folder `cxr-batch evaluate` wrote: curated sections, not a dump of
metrics.json; a line saying why there is no pointing result; errors judged by their confidence."""

import json

from cxr_batch.jobs.evaluate import _load_truth
from cxr_batch.reports.html.evaluate import errors_lead, render_evaluate_page


def _metrics(**extra):
    m = {"checkpoint": "m.ckpt", "model_id": "abc", "folder": "data/test", "threshold": 0.5, "n_files": 10,
         "n_scored": 10, "n_errors": 0, "metrics": {"accuracy": 0.8, "roc_auc": 0.9,
                                                    "confusion": {"tp": 4, "fn": 1, "fp": 1, "tn": 4}},
         "ci95": {"accuracy": [0.6, 0.9]},
         "calibration": {"temperature": 1.3, "ece_before": 0.1, "ece_before_ci95": [0.05, 0.15], "ece_after": 0.05,
                         "ece_after_ci95": [0.02, 0.08], "reliability_before": {"counts": list(range(15))},
                         "reliability_after": {"counts": list(range(15))}, "binning": "15 bins"},
         "deletion": {"n_images": 8, "steps": 10, "auc_cam": 0.3, "auc_random": 0.5, "auc_difference": 0.2,
                      "auc_difference_ci95": [0.1, 0.3], "share_of_images_cam_faster": 0.75,
                      "cam_curve": [0.1] * 11, "p_start": [0.9] * 8, "paths": ["a"] * 8}}
    m.update(extra)
    return m


def test_the_page_shows_named_rows_and_leaves_the_raw_keys_in_metrics_json(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps(_metrics(
        pointing_note="No pointing result: truth.csv has columns file, cx; it needs path, x, y, r.",
        later_key={"a": 1})))
    html = render_evaluate_page(str(tmp_path))
    assert "ECE after scaling" in html and "gap, random − CAM" in html and "0.2 (95% CI 0.1 – 0.3)" in html
    for raw in ("p start", "cam curve", "reliability before", "values (in metrics.json)"):
        assert raw not in html, raw
    assert "more in metrics.json" in html and "later_key" in html  # named, not dumped
    assert 'id="pointing-note"' in html and "has columns file, cx" in html


def test_a_truth_file_with_unknown_columns_is_named_in_one_line(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "truth.csv").write_text("file,cx,cy\ntest/a.jpeg,0.5,0.5\n")
    truth, why = _load_truth(str(tmp_path / "test"), None)
    assert truth is None and str(tmp_path / "truth.csv") in why and "path, x, y, r" in why and "\n" not in why
    (tmp_path / "truth.csv").write_text("path,label,x,y,r\ntest/a.jpeg,PNEUMONIA,0.5,0.5,0.1\n")
    truth, why = _load_truth(str(tmp_path / "test"), None)
    assert truth == {"a.jpeg": (0.5, 0.5, 0.1)} and why is None


def test_errors_near_the_threshold_are_not_called_confident():
    unsure = [{"prob": 0.54}, {"prob": 0.46}]
    assert errors_lead(unsure, ["NORMAL", "PNEUMONIA"]).startswith("No error was confident")
    sure = [{"prob": 0.93}, {"prob": 0.54}]
    assert "1 of these 2 were confident" in errors_lead(sure, ["NORMAL", "NORMAL"])
