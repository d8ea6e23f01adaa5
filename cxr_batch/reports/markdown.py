"""The evaluation report as Markdown (report.md), beside the PNG plots it shows."""

from __future__ import annotations


def _fmt(m: dict, ci: dict, key: str) -> str:
    v = m.get(key)
    if v is None:
        return "n/a"
    lo_hi = ci.get(key)
    return f"{v:.3f} ({lo_hi[0]:.3f}-{lo_hi[1]:.3f})" if lo_hi else f"{v:.3f}"


def report_markdown(metrics: dict, ckpt: dict) -> str:
    """report.md of `cxr-batch evaluate`: the metrics dict of jobs/evaluate.run_evaluate, with its plots."""
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
