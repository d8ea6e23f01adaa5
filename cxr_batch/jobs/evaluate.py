"""``cxr-batch evaluate``: score a labelled folder through the scoring job, then measure.

Writes to the report folder: predictions.parquet/ (the scoring table), cams/, metrics.json
(each metric with a bootstrap 95% CI, the confusion matrix, the threshold used, calibration: ECE
before and after temperature scaling with CIs (reports.metrics), deletion curves of the CAM
(reports.faithfulness, run by jobs.deletion) and, when the archive has a truth.csv of lesion
positions, the CAM pointing rate), roc.png, confusion.png, reliability.png, deletion.png,
training_curves.png, errors_montage.png, report.md tying them together (reports.markdown), and
report.html: the same in one page a browser opens from disk, with the most confident errors' CAMs
(reports/html/evaluate.py).
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import tempfile
from dataclasses import asdict, dataclass, replace

import numpy as np

from .. import CLASSES, POSITIVE
from ..archive import storage
from ..archive.results import ERROR, OUT_OF_SCOPE, RETRY, SCORED, SKIPPED
from ..model.entries import checkpoint_entries
from ..errors import InputError
from ..fields import INPUT, METRICS, MODEL, OUTPUT, setting, setting_like
from ..reports.markdown import report_markdown
from .score_settings import ScoreSettings


@dataclass(frozen=True, kw_only=True)
class EvaluateSettings:
    checkpoint: str = setting(help="A checkpoint from `cxr-batch train`.", group=MODEL)
    folder: str  # labelled: a NORMAL/ or PNEUMONIA/ folder on each image's path
    out: str = setting(help="Report folder for report.html, report.md, metrics.json, the plots and the predictions.",
                       group=OUTPUT)
    truth: str | None = setting(None, "A truth.csv of lesion positions.", group=INPUT,
                                shown="truth.csv in FOLDER or its parents")
    limit: int | None = setting_like(ScoreSettings, "limit", help="Evaluate only the first N files, sorted by path.")
    batch_size: int = setting_like(ScoreSettings, "batch_size")
    device: str = setting_like(ScoreSettings, "device")
    precision: str = setting_like(ScoreSettings, "precision")
    n_boot: int = setting(1000, "Bootstrap resamples for the 95% confidence intervals.", group=METRICS)
    pointing_tolerance: float = 1.5  # a CAM peak within this many lesion radii of the centre is a hit
    montage_size: int = 8  # most confident errors shown
    # Deletion curves cost (2 x steps + 1) forward passes per image: a bounded, seeded sample of the
    # PNEUMONIA images, so the cost does not grow with the folder (the bare forward's rate in
    # docs/performance.md gives it for a machine).
    deletion_images: int = setting(32, "PNEUMONIA images, a seeded sample, for the CAM deletion curves; 0 skips"
                                   " them.", group=METRICS)
    deletion_steps: int = setting(10, "Steps of the deletion curves, from nothing to everything greyed out.",
                                  group=METRICS)
    cams: bool = setting_like(ScoreSettings, "cams")
    cam_size: int | None = setting_like(ScoreSettings, "cam_size")
    cam_scale: str = setting_like(ScoreSettings, "cam_scale")
    # Where the table's CAM point, and so the pointing game, comes from: a trust report can afford
    # one backward pass per batch; score defaults to map, which costs nothing.
    cam_point: str = setting_like(ScoreSettings, "cam_point", default="evidence",
                                  help="Where cam_peak_x/y, and so the pointing game, come from: evidence, the input"
                                       " pixels that make the CAM's hot spot hot; map, its centre (score's default,"
                                       " which saves the backward pass).")
    # Images the model must not score (other modalities, views, photographs): what share the
    # out-of-distribution check puts out of scope, beside the share of FOLDER it wrongly does.
    ood_check: str | None = setting(None, "Also score DIR, images the model must not score, and report the share"
                                    " that the out-of-distribution check puts out of scope.", group=INPUT,
                                    shown="no such check")

    def score_settings(self) -> ScoreSettings:
        """The scoring run behind the metrics. ood="flag": every labelled image keeps its prediction, so the
        metrics judge the model on the whole folder; the images the OOD check would have put out of scope
        are counted beside them."""
        return ScoreSettings(archive=self.folder, out=storage.join(self.out, "predictions.parquet"),
                             model=self.checkpoint, batch_size=self.batch_size, device=self.device,
                             precision=self.precision, limit=self.limit, cams=self.cams,
                             cam_dir=storage.join(self.out, "cams"), cam_size=self.cam_size, cam_scale=self.cam_scale,
                             cam_point=self.cam_point, ood="flag")


def run_evaluate(s: EvaluateSettings, *, progress=None, echo=None) -> dict:
    from ..reports.metrics import binary_metrics, bootstrap_ci
    from ..archive.results import read_table
    from .score import run_score

    if s.ood_check and checkpoint_entries(s.checkpoint, with_id=False)[0].get("ood") is None:
        raise InputError(f"--ood-check: {s.checkpoint} has no out-of-distribution statistics (written before they"
                         " existed); retrain it with `cxr-batch train` to get them.")
    score_settings = s.score_settings()
    pred_out = score_settings.out
    summary = run_score(score_settings, progress=progress, echo=echo)  # refuses a bad checkpoint before any work
    # Its small entries (threshold, history, ...): the weights were read on this driver once, by the scoring's model check.
    ckpt, model_id = checkpoint_entries(summary.model["spec"])
    if model_id != summary.model["model_id"]:
        raise InputError(f"{s.checkpoint} changed while evaluate ran (hash {summary.model['model_id']} when scored,"
                         f" {model_id} now). Run evaluate again when nothing writes to it.")
    rows = read_table(pred_out).to_pylist()
    scored = [r for r in rows if r["error"] is None and r["label"] is not None]
    if not scored:
        raise InputError(f"No labelled images scored under {s.folder}: it needs NORMAL/ and PNEUMONIA/ folders.")
    y = np.array([CLASSES.index(r["label"]) for r in scored])
    p = np.array([r["prob_pneumonia"] for r in scored], np.float64)
    threshold = float(ckpt["threshold"])
    metrics = {
        "checkpoint": s.checkpoint, "model_id": model_id, "folder": s.folder,
        "threshold": threshold, "threshold_rule": ckpt.get("metrics", {}).get("threshold_rule", "from checkpoint"),
        "n_files": len(rows), "n_scored": len(scored), "n_errors": sum(r["error"] is not None and r["status"] != OUT_OF_SCOPE for r in rows),
        "n_out_of_scope": sum(bool(r.get("out_of_scope")) for r in rows),
        "metrics": binary_metrics(y, p, threshold),
        "ci95": bootstrap_ci(y, p, threshold, n_boot=s.n_boot, seed=0),
        "scoring": {"seconds": summary.seconds, "images_per_s": summary.images_per_s},
        "settings": asdict(s),
    }
    truth = _load_truth(s.folder, s.truth)
    if truth:
        metrics["pointing"] = dict(_pointing(scored, truth, s.pointing_tolerance), cam_point=s.cam_point)
    metrics["calibration"] = _calibration(scored, y, float(summary.model.get("temperature", 1.0)), s.n_boot)
    metrics["deletion"] = _deletion(scored, score_settings, summary.model, s)
    if s.ood_check:
        metrics["ood_check"] = _ood_check(s, score_settings, rows, progress, echo)
    history = ckpt.get("history", [])
    with tempfile.TemporaryDirectory() as tmp:
        _plots(tmp, y, p, threshold, metrics, history, scored, s.montage_size)
        with open(os.path.join(tmp, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2, default=float)
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write(report_markdown(metrics, ckpt))
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                storage.write_bytes_atomic(storage.join(s.out, name), f.read())
    from ..reports.html.evaluate import write_evaluate_report

    write_evaluate_report(s.out)  # built from the folder just written: it shows whatever is there
    return metrics


def _ood_check(s: EvaluateSettings, score_settings, rows: list, progress, echo) -> dict:
    """Score the --ood-check folder (no CAMs) and compare its rows with FOLDER's: the share of foreign
    images refused (out of scope, or gated before decoding), the share of FOLDER's decoded images put
    out of scope, and the AUROC of their ood_score."""
    from ..archive.results import read_table
    from ..model.ood import auroc
    from .score import run_score

    out = storage.join(s.out, "ood-check", "predictions.parquet")
    run_score(replace(score_settings, archive=s.ood_check, out=out, cams=False, cam_point="map", ood="skip"),
              progress=progress, echo=echo)
    foreign = read_table(out).to_pylist()
    counts = {k: sum(r["status"] == k for r in foreign) for k in (SCORED, OUT_OF_SCOPE, SKIPPED, ERROR, RETRY)}
    judged = len(foreign) - counts[ERROR] - counts[RETRY]  # a file that could not be read says nothing of the check
    refused = counts[OUT_OF_SCOPE] + counts[SKIPPED]
    decoded = [r for r in rows if r["status"] == SCORED]  # the labelled folder, scored under ood="flag"
    wrong = sum(bool(r.get("out_of_scope")) for r in decoded)
    return {"folder": s.ood_check, "predictions": out, "files": len(foreign), **{f"n_{k}": v for k, v in counts.items()},
            "share_refused": refused / judged if judged else None,
            "in_distribution_files": len(decoded), "in_distribution_out_of_scope": wrong,
            "share_wrongly_out_of_scope": wrong / len(decoded) if decoded else None,
            "auroc": auroc([r["ood_score"] for r in decoded], [r["ood_score"] for r in foreign if r["ood_score"] is not None])}


def _calibration(scored, y, temperature: float, n_boot: int) -> dict:
    """ECE before (T = 1) and after (the checkpoint's T), from the table's raw logit column; tables
    written before that column existed give it back from the probability (prob = sigmoid(logit / T))."""
    from ..model.calibration import margin_from_prob
    from ..reports.metrics import calibration_report

    logits = [r.get("logit_pneumonia") for r in scored]
    if all(v is not None and np.isfinite(v) for v in logits):
        margin, source = np.asarray(logits, np.float64), "logit_pneumonia column"
    else:
        margin = margin_from_prob([r["prob_pneumonia"] for r in scored], temperature)
        source = "recovered from prob_pneumonia and the temperature"
    return {**calibration_report(y, margin, temperature, n_boot=n_boot, seed=0), "source": source}


def _deletion(scored, score_settings, model: dict, s: EvaluateSettings) -> dict | None:
    from .deletion import run_deletion

    if s.deletion_images < 1:
        return None
    return run_deletion(scored, score_settings, model, n_images=s.deletion_images, steps=s.deletion_steps,
                        n_boot=s.n_boot)


def _plots(tmp, y, p, threshold, metrics, history, scored, montage_size):
    from ..reports.plots import plot_confusion, plot_deletion, plot_montage, plot_reliability, plot_roc, plot_training_curves

    plot_roc(y, p, threshold, os.path.join(tmp, "roc.png"), title=f"ROC ({metrics['n_scored']} images)")
    cal = metrics["calibration"]
    plot_reliability(cal["reliability_before"], cal["reliability_after"], os.path.join(tmp, "reliability.png"),
                     temperature=cal["temperature"])
    if metrics.get("deletion"):
        plot_deletion(metrics["deletion"], os.path.join(tmp, "deletion.png"))
    plot_confusion(metrics["metrics"]["confusion"], os.path.join(tmp, "confusion.png"))
    plot_training_curves(history, os.path.join(tmp, "training_curves.png"))
    errors = [r for r in scored if (r["prob_pneumonia"] >= threshold) != (r["label"] == CLASSES[POSITIVE])]
    errors.sort(key=lambda r: -abs(r["prob_pneumonia"] - threshold))  # most confidently wrong first
    items = []
    for r in errors[:montage_size]:
        if r["cam_path"]:
            items.append({"image": _image_bytes(r["cam_path"]),
                          "caption": f"{posixpath.basename(r['path'])}\ntrue {r['label']}, P(pneu)={r['prob_pneumonia']:.2f}"})
    plot_montage(items, os.path.join(tmp, "errors_montage.png"), title="Most confident errors (CAM of PNEUMONIA)")


def _image_bytes(uri: str):
    from PIL import Image

    with Image.open(io.BytesIO(storage.read_bytes(uri))) as im:
        return np.asarray(im.convert("RGB"))


def _load_truth(folder: str, truth: str | None) -> dict | None:
    """truth.csv rows keyed by the image path relative to ``folder``."""
    candidates = [truth] if truth else []
    if not truth:
        base = folder.rstrip("/")
        for _ in range(3):
            candidates.append(storage.join(base, "truth.csv"))
            parent = posixpath.dirname(base) if storage.is_uri(base) else os.path.dirname(os.path.abspath(base))
            if parent == base:
                break
            base = parent
    for cand in candidates:
        if cand and storage.exists(cand):
            prefix = _relative_prefix(folder, posixpath.dirname(cand) if storage.is_uri(cand) else os.path.dirname(os.path.abspath(cand)))
            rows = csv.DictReader(io.StringIO(storage.read_bytes(cand).decode()))
            out = {}
            for r in rows:
                if r.get("x") and r["path"].startswith(prefix):
                    out[r["path"][len(prefix):]] = (float(r["x"]), float(r["y"]), float(r["r"]))
            return out
    if truth:
        raise InputError(f"--truth {truth} not found.")
    return None


def _relative_prefix(folder: str, truth_dir: str) -> str:
    a = folder.rstrip("/") if storage.is_uri(folder) else os.path.abspath(folder)
    rel = posixpath.relpath(a, truth_dir) if storage.is_uri(folder) else os.path.relpath(a, truth_dir).replace(os.sep, "/")
    return "" if rel == "." else rel + "/"


def _pointing(scored, truth, tolerance):
    from ..reports.metrics import pointing_game

    def game(rows):
        rows = [r for r in rows if r["path"] in truth and r["cam_peak_x"] is not None]
        if not rows:
            return None
        peaks = np.array([(r["cam_peak_x"], r["cam_peak_y"]) for r in rows])
        aspect = float(np.median([r["width"] / r["height"] for r in rows]))
        return pointing_game(peaks, np.array([truth[r["path"]] for r in rows]), tolerance=tolerance, aspect=aspect)

    positives = [r for r in scored if r["label"] == CLASSES[POSITIVE]]
    return {"true_positives": game([r for r in positives if r["pred"] == CLASSES[POSITIVE]]),
            "all_positives": game(positives)}
