"""What the evaluation page shows of metrics.json beyond the headline metrics: a few named rows per
section, chosen for a reader. The raw keys (curves, bins, per-image lists, settings echoes) stay in
metrics.json, which the page links; a key this page does not know is named, never dumped.
"""

from __future__ import annotations

from .page import pct, show

# metrics.json keys the page shows elsewhere (the headline metrics, the model, the pointing game).
SHOWN_ELSEWHERE = {"checkpoint", "model_id", "folder", "threshold", "threshold_rule", "n_files", "n_scored", "n_errors",
                   "metrics", "ci95", "scoring", "settings", "pointing", "pointing_note"}


def with_ci(v, ci) -> str:
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and v is not None:
        return f"{show(v)} (95% CI {show(ci[0])} – {show(ci[1])})"
    return show(v)


def calibration_rows(c: dict) -> list[tuple[str, str]]:
    return [("temperature", show(c.get("temperature"))),
            ("ECE before scaling (T = 1)", with_ci(c.get("ece_before"), c.get("ece_before_ci95"))),
            ("ECE after scaling", with_ci(c.get("ece_after"), c.get("ece_after_ci95"))),
            ("bins", show(c.get("binning")))]


def deletion_rows(d: dict) -> list[tuple[str, str]]:
    if not d.get("n_images"):
        return [("deletion curves", d.get("note") or "no image to run them on")]
    return [("deletion curves", f"{d['n_images']:,} PNEUMONIA images, {d.get('steps', '?')} steps"),
            ("area, CAM order (lower: the CAM finds the evidence)", show(d.get("auc_cam"))),
            ("area, random order", show(d.get("auc_random"))),
            ("gap, random − CAM", with_ci(d.get("auc_difference"), d.get("auc_difference_ci95"))),
            ("images where the CAM order is faster", pct(round(d.get("share_of_images_cam_faster", 0) * d["n_images"]),
                                                         d["n_images"]))]


def ood_rows(o: dict) -> list[tuple[str, str]]:
    return [("out-of-distribution check", f"{o.get('files', 0):,} foreign files in {o.get('folder')}"),
            ("foreign files refused", show(o.get("share_refused"))),
            ("labelled images wrongly put out of scope", show(o.get("share_wrongly_out_of_scope"))),
            ("AUROC of ood_score", show(o.get("auroc")))]


def curated(m: dict) -> dict:
    """metrics.json -> {section: [(name, text)]} for the page's sections."""
    out: dict = {}
    if isinstance(m.get("calibration"), dict):
        out["calibration"] = calibration_rows(m["calibration"])
    if isinstance(m.get("deletion"), dict):
        out["localisation"] = deletion_rows(m["deletion"])
    other = []
    if "n_out_of_scope" in m:
        other.append(("labelled images over the OOD threshold (kept, flagged)", show(m["n_out_of_scope"])))
    if isinstance(m.get("ood_check"), dict):
        other += ood_rows(m["ood_check"])
    unknown = sorted(k for k in m if k not in SHOWN_ELSEWHERE | {"calibration", "deletion", "n_out_of_scope", "ood_check"})
    if unknown:
        other.append(("more in metrics.json", ", ".join(unknown)))
    if other:
        out["other"] = other
    return out
