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
        how = {"map": "the centre of the CAM's hot spot", "evidence": "the input pixels that make the CAM's hot spot hot"}
        lines += [f"CAM pointing game (peak within {g['tolerance']} lesion radii of the planted lesion; the peak is"
                  f" {how.get(pt.get('cam_point'), 'the table’s cam_peak_x/y')}, `--cam-point {pt.get('cam_point', 'map')}`): "
                  f"{g['hits']}/{g['n']} = {g['rate']:.1%} of correctly flagged PNEUMONIA images;"
                  f" mean offset of the peak dx {g['mean_dx_in_radii']:+.2f}, dy {g['mean_dy_in_radii']:+.2f} lesion"
                  f" radii (x right, y down), median distance {g['median_distance_in_radii']:.2f} radii."
                  + (f" The peaks follow the lesions by {g['follow_x']:.2f} across and {g['follow_y']:.2f} down"
                     " (least-squares slope; 1 = exactly, below 1 = pulled towards the middle)."
                     if g.get("follow_y") is not None else ""), ""]
    lines += _calibration_md(metrics["calibration"]) + _deletion_md(metrics.get("deletion"))
    lines += ["![ROC](roc.png)", "", "![Confusion matrix](confusion.png)", "",
              "![Training curves](training_curves.png)", "", "![Most confident errors](errors_montage.png)", "",
              "Per-image predictions: `predictions.parquet/`; CAM overlays: `cams/`.", ""]
    return "\n".join(lines)


def _calibration_md(c: dict) -> list:
    def ci(key):
        return f"{c[key][0]:.3f}-{c[key][1]:.3f}"

    return ["## Calibration", "",
            f"Temperature T = {c['temperature']:.3f}, fitted on the validation data at training time; scoring reports"
            f" softmax(logits / T). Expected calibration error (ECE) of {c['binning']}, 95% bootstrap CI:", "",
            "| | ECE | NLL |", "|---|---|---|",
            f"| before (T = 1) | {c['ece_before']:.3f} ({ci('ece_before_ci95')}) | {c['nll_before']:.3f} |",
            f"| after (T = {c['temperature']:.2f}) | {c['ece_after']:.3f} ({ci('ece_after_ci95')}) | {c['nll_after']:.3f} |",
            "", f"Change after - before: {c['ece_after'] - c['ece_before']:+.3f} (paired 95% CI"
            f" {c['ece_change_ci95'][0]:+.3f} to {c['ece_change_ci95'][1]:+.3f})."
            f" Logits: {c['source']}.", "", "![Reliability diagram](reliability.png)", ""]


def _deletion_md(d: dict | None) -> list:
    if not d or not d.get("n_images"):
        return []
    lo, hi = d["auc_difference_ci95"]
    return ["## Faithfulness of the CAM (deletion curves)", "",
            f"{d['n_images']} PNEUMONIA images (a seeded sample): {d['regions']} ({'x'.join(map(str, d['grid']))}),"
            f" greyed out in {d['steps']} steps with {d['fill']}, against {d['order_random']}. Area under mean"
            f" P(PNEUMONIA) over the share deleted: CAM order {d['auc_cam']:.3f}, random order {d['auc_random']:.3f};"
            f" gap (random - CAM) {d['auc_difference']:.3f} (95% CI {lo:.3f} to {hi:.3f}; larger = the CAM finds"
            f" the evidence sooner; the CAM order falls faster on {d['share_of_images_cam_faster']:.0%} of images)."
            f" {d['seconds']:.0f} s.", "", "![Deletion curves](deletion.png)", ""]
