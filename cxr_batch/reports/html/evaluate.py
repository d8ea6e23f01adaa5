"""The evaluation page: ``report.html`` in the folder that ``cxr-batch evaluate`` wrote.

Built from what the folder holds, not from evaluate's internals, so each section appears when its
data exists and the page still works without it: metrics.json (metrics with 95% CIs, confusion,
threshold, pointing; whatever else later versions add lands in "Other results"), the PNG plots
beside it (ROC, confusion, training curves, reliability, deletion...; unknown ones in "More
figures"), and predictions.parquet/ with cams/ for the distribution and the most confident errors.
"""

from __future__ import annotations

import json
import posixpath
import re

from markupsafe import Markup

from ... import CLASSES
from ...archive import storage
from ...errors import InputError
from .page import checkpoint_rows, gallery_items, kv_rows, pct, render, show

# metrics.json keys that have a section of their own; every other key goes to "Other results".
KNOWN_KEYS = {"checkpoint", "model_id", "folder", "threshold", "threshold_rule", "n_files", "n_scored", "n_errors",
              "metrics", "ci95", "scoring", "settings", "pointing"}
METRIC_NAMES = [("accuracy", "Accuracy"), ("sensitivity", "Sensitivity (recall)"), ("specificity", "Specificity"),
                ("ppv", "PPV (precision)"), ("npv", "NPV"), ("f1", "F1"), ("roc_auc", "ROC AUC")]
# Which section a figure or a metrics.json key belongs to, by name.
SECTIONS = [("calibration", r"calib|reliab|ece|temperature|brier"), ("localisation", r"deletion|pointing|insertion|cam"),
            ("training", r"training|history|curve"), ("roc", r"^roc")]
# The gallery shows the montage's images, larger and linked; the page draws the confusion matrix itself.
SKIP_FIGURES = {"errors_montage.png", "confusion.png"}
CAPTIONS = {"roc": "ROC curve", "training_curves": "Training curves", "reliability": "Reliability diagram"}


def _section_of(name: str) -> str:
    return next((sec for sec, pattern in SECTIONS if re.search(pattern, name, re.I)), "other")


def _figures(folder: str) -> dict:
    figs: dict = {}
    for name in sorted(storage.list_dir(folder)):
        if name.lower().endswith((".png", ".svg", ".jpg")) and name not in SKIP_FIGURES:
            figs.setdefault(_section_of(name), []).append({"src": name, "caption": _caption(name)})
    return figs


def _caption(name: str) -> str:
    stem = posixpath.splitext(name)[0]
    return CAPTIONS.get(stem) or re.sub(r"[_-]+", " ", stem).strip().capitalize()


def flatten(d: dict, prefix: str = "") -> list[tuple[str, str]]:
    """Nested dicts -> ("a › b", text) rows. A value with a ``<key>_ci95`` pair beside it shows its
    interval in its own row; long lists (curves, per-bin counts) are counted, not printed."""
    rows = []
    for k, v in d.items():
        if k.endswith("_ci95") and k[: -len("_ci95")] in d:
            continue
        name = f"{prefix} › {k}" if prefix else str(k)
        if isinstance(v, dict):
            rows += flatten(v, name)
        else:
            rows.append((name.replace("_", " "), _value(v, d.get(f"{k}_ci95"))))
    return rows


def _value(v, ci=None) -> str:
    if isinstance(v, (list, tuple)) and len(v) > 6:
        return f"{len(v)} values (in metrics.json)"
    if isinstance(v, (int, float)) and not isinstance(v, bool) and isinstance(ci, (list, tuple)) and len(ci) == 2:
        return f"{show(v)} (95% CI {show(ci[0])} – {show(ci[1])})"
    return show(v)


def _metric_rows(m: dict) -> list[dict]:
    values, ci = m.get("metrics") or {}, m.get("ci95") or {}
    rows = []
    for key, name in METRIC_NAMES:
        v, lohi = values.get(key), ci.get(key)
        if v is None and key not in values:
            continue
        rows.append({"key": key, "name": name, "value": v, "lo": lohi[0] if lohi else None, "hi": lohi[1] if lohi else None})
    return rows


def _extra_results(m: dict) -> dict:
    """metrics.json keys without a section of their own, grouped by the section their name suggests."""
    out: dict = {}
    for k, v in m.items():
        if k in KNOWN_KEYS:
            continue
        section = _section_of(k)
        if isinstance(v, dict):  # in the section of the same name, rows need no "key ›" before them
            rows = flatten(v, "" if k == section else k)
        else:
            rows = [(k.replace("_", " "), _value(v))]
        out.setdefault(section, []).extend(rows)
    return out


def _pointing(m: dict) -> list[dict]:
    games = []
    point = (m.get("pointing") or {}).get("cam_point")
    for name, g in (m.get("pointing") or {}).items():
        if not isinstance(g, dict):
            continue
        head = ""
        if g.get("n"):
            head = (f"{g.get('hits', 0):,} of {g['n']:,} ({pct(g.get('hits', 0), g['n'])}) peak within"
                    f" {g.get('tolerance', '?')} lesion radii of the lesion"
                    + (f" (--cam-point {point})" if isinstance(point, str) else ""))
        games.append({"name": name.replace("_", " "), "head": head,
                      "rows": kv_rows(g, skip=("n", "hits", "rate", "tolerance") if head else ())})
    return games


def _confident_errors(folder: str, page: str, threshold: float, k: int):
    """(histogram SVG by true class, gallery tiles) from predictions.parquet; (None, None) without it."""
    from .data import GallerySpec, aggregate
    from .plots import histogram_svg

    preds = storage.join(folder, "predictions.parquet")
    try:
        a, meta = aggregate(preds, galleries=[GallerySpec("wrong", "wrong", k)])
    except InputError:
        return None, None
    svg = Markup(histogram_svg(a.bins, a.hist, threshold)) if a.scored else None

    def truth(r):
        if r["label"] == CLASSES[0]:
            return f"FP · true {r['label']}", "flag"
        return f"FN · true {r['label']}", "error"

    tiles = gallery_items(a.galleries.get("wrong"), page, (meta.get("settings") or {}).get("archive"),
                          cam_dir=storage.join(folder, "cams"), badge=truth)
    return svg, tiles


def render_evaluate_page(folder: str, *, gallery: int = 12) -> str:
    from .model import checkpoint_facts

    m = json.loads(storage.read_bytes(storage.join(folder, "metrics.json")))
    page = storage.join(folder, "report.html")
    threshold = float(m.get("threshold", 0.5))
    hist_svg, tiles = _confident_errors(folder, page, threshold, gallery)
    figs, extra = _figures(folder), _extra_results(m)
    ck = checkpoint_facts(m["checkpoint"], m.get("model_id")) if m.get("checkpoint") else None
    c = (m.get("metrics") or {}).get("confusion") or {}
    sections = [("metrics", "Metrics"), ("roc", "ROC & confusion")]
    has = {"calibration": figs.get("calibration") or extra.get("calibration"),
           "distribution": hist_svg is not None, "training": figs.get("training") or extra.get("training"),
           "localisation": figs.get("localisation") or extra.get("localisation") or m.get("pointing"),
           "errors": tiles is not None, "other": figs.get("other") or extra.get("other")}
    names = {"calibration": "Calibration", "distribution": "P(pneumonia)", "training": "Training",
             "localisation": "CAM localisation", "errors": "Most confident errors", "other": "Other results"}
    sections += [(key, names[key]) for key in names if has[key]] + [("model", "Model")]
    return render(
        "evaluate.html.j2", kind="evaluation report", page_title=f"cxr-batch evaluation: {m.get('checkpoint')}",
        heading=f"{_tail(m.get('checkpoint'))} on {_tail(m.get('folder'))}", toc=sections, has=has, m=m,
        subtitle=[f"{m.get('n_scored', 0):,} labelled images scored", f"{m.get('n_errors', 0):,} errors",
                  f"model {m.get('model_id')}", f"threshold {threshold:.3g} ({m.get('threshold_rule', '?')})"],
        metric_rows=_metric_rows(m), confusion=c, figs=figs, extra=extra, pointing=_pointing(m), hist_svg=hist_svg,
        tiles=tiles or [], checkpoint=ck, ck_rows=_model_rows(ck),
        train_rows=kv_rows((ck or {}).get("settings") or {}), settings_rows=kv_rows(m.get("settings") or {}),
        scoring=m.get("scoring") or {}, pct=pct, threshold=threshold,
        footer="Files beside this page: metrics.json, report.md, the PNG plots, predictions.parquet/ and cams/.",
    )


def _model_rows(ck: dict | None) -> list:
    if not ck or ck.get("error"):
        return []
    model = [("architecture", ck.get("arch")), ("input size", f"{ck['image_size']} px" if ck.get("image_size") else None),
             ("model id", ck.get("model_id")), ("CAM stride", ck.get("cam_stride")),
             ("CAM layer", ck.get("cam_layer", 4 if ck.get("cam_stride") else None))]
    return [(k, str(v)) for k, v in model if v is not None] + checkpoint_rows(ck)


def _tail(path, parts: int = 2) -> str:
    """The last folders of a path: enough to recognise it in a heading (the full path is below)."""
    return "/".join(str(path or "?").rstrip("/").split("/")[-parts:])


def write_evaluate_report(folder: str, *, gallery: int = 12) -> str:
    page = storage.join(folder, "report.html")
    storage.write_bytes_atomic(page, render_evaluate_page(folder, gallery=gallery).encode("utf-8"))
    return page
