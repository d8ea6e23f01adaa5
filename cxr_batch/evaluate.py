"""``cxr-batch evaluate``: score a labelled folder through the scoring job, then measure.

Writes to the report folder: predictions.parquet/ (the scoring table), cams/, metrics.json
(each metric with a bootstrap 95% CI, the confusion matrix, the threshold used and, when the
archive has a truth.csv of lesion positions, the CAM pointing rate), roc.png, confusion.png,
training_curves.png, errors_montage.png, report.md tying them together, and report.html: the
same in one page a browser opens from disk, with the most confident errors' CAMs (report_evaluate.py).
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import tempfile
from dataclasses import asdict, dataclass

import numpy as np

from . import CLASSES, POSITIVE, storage
from .checkpoint import load_checkpoint
from .errors import InputError


@dataclass(frozen=True, kw_only=True)
class EvaluateSettings:
    checkpoint: str
    folder: str  # labelled: a NORMAL/ or PNEUMONIA/ folder on each image's path
    out: str
    truth: str | None = None  # truth.csv of lesion positions; None = look in folder and its parents
    batch_size: int = 16
    n_boot: int = 1000  # bootstrap resamples for the 95% CIs
    pointing_tolerance: float = 1.5  # a CAM peak within this many lesion radii of the centre is a hit
    montage_size: int = 8  # most confident errors shown


def run_evaluate(s: EvaluateSettings, *, progress=None) -> dict:
    from .metrics import binary_metrics, bootstrap_ci
    from .output import read_table
    from .score import ScoreSettings, run_score

    ck = load_checkpoint(s.checkpoint)
    pred_out = storage.join(s.out, "predictions.parquet")
    summary = run_score(ScoreSettings(archive=s.folder, out=pred_out, model=s.checkpoint, batch_size=s.batch_size,
                                      cam_dir=storage.join(s.out, "cams")), progress=progress)
    rows = read_table(pred_out).to_pylist()
    scored = [r for r in rows if r["error"] is None and r["label"] is not None]
    if not scored or len({r["label"] for r in scored}) < 1:
        raise InputError(f"No labelled images scored under {s.folder}: it needs NORMAL/ and PNEUMONIA/ folders.")
    y = np.array([CLASSES.index(r["label"]) for r in scored])
    p = np.array([r["prob_pneumonia"] for r in scored], np.float64)
    threshold = float(ck.ckpt["threshold"])
    metrics = {
        "checkpoint": s.checkpoint, "model_id": ck.model_id, "folder": s.folder,
        "threshold": threshold, "threshold_rule": ck.ckpt.get("metrics", {}).get("threshold_rule", "from checkpoint"),
        "n_files": len(rows), "n_scored": len(scored), "n_errors": sum(r["error"] is not None for r in rows),
        "metrics": binary_metrics(y, p, threshold),
        "ci95": bootstrap_ci(y, p, threshold, n_boot=s.n_boot, seed=0),
        "scoring": {"seconds": summary.seconds, "images_per_s": summary.images_per_s},
        "settings": asdict(s),
    }
    truth = _load_truth(s.folder, s.truth)
    if truth:
        metrics["pointing"] = _pointing(scored, truth, s.pointing_tolerance)
    history = ck.ckpt.get("history", [])
    with tempfile.TemporaryDirectory() as tmp:
        _plots(tmp, y, p, threshold, metrics, history, scored, s.montage_size)
        with open(os.path.join(tmp, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2, default=float)
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write(_report_md(metrics, ck.ckpt, history))
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                storage.write_bytes_atomic(storage.join(s.out, name), f.read())
    from .report_evaluate import write_evaluate_report

    write_evaluate_report(s.out)  # built from the folder just written: it shows whatever is there
    return metrics


def _plots(tmp, y, p, threshold, metrics, history, scored, montage_size):
    from .plots import plot_confusion, plot_montage, plot_roc, plot_training_curves

    plot_roc(y, p, threshold, os.path.join(tmp, "roc.png"), title=f"ROC ({metrics['n_scored']} images)")
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
    from .metrics import pointing_game

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


def _fmt(m: dict, ci: dict, key: str) -> str:
    v = m.get(key)
    if v is None:
        return "n/a"
    lo_hi = ci.get(key)
    return f"{v:.3f} ({lo_hi[0]:.3f}-{lo_hi[1]:.3f})" if lo_hi else f"{v:.3f}"


def _report_md(metrics: dict, ckpt: dict, history: list) -> str:
    m, ci = metrics["metrics"], metrics["ci95"]
    lines = [
        f"# Evaluation of `{metrics['checkpoint']}`", "",
        f"Model {ckpt['arch']} (id {metrics['model_id']}), {ckpt['image_size']} px, trained {ckpt.get('epoch')} epochs."
        f" Folder `{metrics['folder']}`: {metrics['n_files']} files, {metrics['n_scored']} labelled and scored,"
        f" {metrics['n_errors']} errors.", "",
        f"Decision threshold {metrics['threshold']:.4f} ({metrics['threshold_rule']}), chosen on validation data, never on this folder.", "",
        "| metric | value (95% bootstrap CI) |", "|---|---|",
    ]
    for key in ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "roc_auc"):
        lines.append(f"| {key} | {_fmt(m, ci, key)} |")
    c = m["confusion"]
    lines += ["", f"Confusion: TP {c['tp']}, FN {c['fn']}, FP {c['fp']}, TN {c['tn']}.", ""]
    pt = metrics.get("pointing")
    if pt and pt.get("true_positives"):
        g = pt["true_positives"]
        lines += [f"CAM pointing game (peak within {g['tolerance']} lesion radii of the planted lesion): "
                  f"{g['hits']}/{g['n']} = {g['rate']:.1%} of correctly flagged PNEUMONIA images.", ""]
    lines += ["![ROC](roc.png)", "", "![Confusion matrix](confusion.png)", "",
              "![Training curves](training_curves.png)", "", "![Most confident errors](errors_montage.png)", "",
              "Per-image predictions: `predictions.parquet/`; CAM overlays: `cams/`.", ""]
    return "\n".join(lines)
