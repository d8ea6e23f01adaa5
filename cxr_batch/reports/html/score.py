"""``cxr-batch report``: one HTML page that shows what a scoring run found.

A results table -> data.aggregate (one streaming pass) -> page context -> Jinja2 template
(templates/score.html.j2) -> one self-contained file: CSS, JS, the histogram (SVG) and the
gallery thumbnails are inline, so it opens from disk, offline, anywhere; full-size CAM PNGs are
relative links when the report and the CAMs are on the same disk. Every value from the table (file
names are untrusted) is HTML-escaped by the template engine.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from markupsafe import Markup

from ... import CLASSES, POSITIVE
from ...archive import storage
from ...errors import InputError
from ...archive.results import default_cam_dir, part_files, read_metadata
from .data import MAX_FOLDERS_AUTO, Aggregate, GallerySpec, aggregate
from .model import provenance
from .page import checkpoint_rows, gallery_items, kv_rows, pct, render, show


@dataclass(frozen=True, kw_only=True)
class ReportSettings:
    results: str  # the Parquet output folder of `cxr-batch score` (local or s3://)
    out: str | None = None  # None: <results>-report.html beside the results
    folder_depth: int | None = None  # None: the shallowest level that splits the table into 2+ folders
    gallery: int = 12  # images in each gallery
    max_folders: int = 500  # table rows; more folders are summarised (the largest shown)

    def __post_init__(self):
        if self.folder_depth is not None and self.folder_depth < 1:
            raise InputError("--folder-depth must be at least 1.")
        if self.gallery < 0:
            raise InputError("--gallery must be 0 or more.")

    def resolved_out(self) -> str:
        if self.out:
            return self.out
        base = self.results.rstrip("/")
        return (base[: -len(".parquet")] if base.endswith(".parquet") else base) + "-report.html"


@dataclass
class ReportResult:
    path: str
    files: int
    seconds: float  # all of it: the pass over the table, the checkpoint, thumbnails, the page
    pass_seconds: float  # the one pass over the table
    damaged: list = field(default_factory=list)  # names of damaged part files, skipped


# ---------------------------------------------------------------- the score page

def write_score_report(s: ReportSettings) -> ReportResult:
    t0 = time.perf_counter()
    out = s.resolved_out()
    specs = [GallerySpec("suspicious", "prob", s.gallery), GallerySpec("uncertain", "margin", s.gallery),
             GallerySpec("out_of_scope", "ood", s.gallery)]
    with ThreadPoolExecutor(1) as pool:
        # The checkpoint's facts need torch (seconds to import): fetched while the table streams.
        prov = pool.submit(lambda: provenance(read_metadata(s.results)) if part_files(s.results) else {})
        a, _ = aggregate(s.results, depth=s.folder_depth, galleries=specs)
        t_pass = time.perf_counter() - t0
        html = render_score_page(a, prov.result(), s, out)
    storage.write_bytes_atomic(out, html.encode("utf-8"))
    return ReportResult(path=storage.absolute(out), files=a.files, seconds=time.perf_counter() - t0, pass_seconds=t_pass,
                        damaged=a.damaged)


def render_score_page(a: Aggregate, prov: dict, s: ReportSettings, out: str) -> str:
    model = prov["model"]
    banners = []
    if model and not model.get("trained", True):
        banners.append({"level": "bad", "text": f"Scored with {model.get('spec')}: an UNTRAINED 2-class head. "
                        "Probabilities and CAMs are meaningless except as a smoke test."})
    ck = prov["checkpoint"] or {}
    if ck.get("same_file") is False:
        banners.append({"level": "warn", "text": f"The checkpoint at {ck['uri']} has changed since this table was scored"
                        f" (id {ck['model_id']}, the table says {prov['model_id']}): its details below describe the new file."})
    archive = prov["settings"].get("archive")
    return render(
        "score.html.j2", kind="scoring report", page_title=f"cxr-batch report: {s.results}",
        heading=storage.absolute(s.results), banners=banners,
        subtitle=[f"{a.files:,} files", f"model {prov['model_id'] or '?'}", f"scored {prov['started'] or '?'}"],
        toc=[("counts", "Counts"), ("distribution", "P(pneumonia)"), ("folders", "Folders"), ("errors", "Errors"),
             ("suspicious", "Most suspicious"), ("uncertain", "Most uncertain"), ("out_of_scope", "Out of scope"),
             ("model", "Model"), ("run", "Run")],
        counts=_counts(a), hist=_hist(a), folders=_folders(a, s.max_folders), errors=_errors(a),
        galleries=_galleries(a, out, archive, s.gallery, _default_cam_dir(s.results)), model=_model(prov),
        run=_run(prov, a),
        footer=f"Regenerate: cxr-batch report {s.results} --out {out}",
    )


def _default_cam_dir(results: str) -> str:
    """Where `cxr-batch score` puts the CAMs of RESULTS by default (<results>-cams beside it)."""
    return default_cam_dir(results)


def _counts(a: Aggregate) -> dict:
    lead = (f"{a.files:,} files in {a.parts:,} Parquet part{'s' if a.parts != 1 else ''}"
            f"{f', written by {a.runs} runs (resumed)' if a.runs > 1 else ''}.")
    return {"files": a.files, "scored": a.scored, "errors": a.count("error"), "retry": a.retry,
            "flagged": a.flagged, "lead": lead, "not_scored": a.count("skipped"),
            "scored_note": f"{pct(a.scored, a.files)} of files",
            "flagged_note": f"{pct(a.flagged, a.scored)} of scored: P ≥ threshold",
            "other": sorted(a.other_statuses.items())}


def _threshold(a: Aggregate) -> float | None:
    return None if a.threshold is None else float(a.threshold[0])


def _hist(a: Aggregate) -> dict:
    from .plots import histogram_svg

    thr = _threshold(a)
    if not a.scored:
        return {"svg": None, "lead": "No image was scored.", "by_label": []}
    varies = a.threshold is not None and a.threshold[1] - a.threshold[0] > 1e-6
    lead = (f"{a.scored:,} scored images in {len(a.bins) - 1} bins. Threshold {thr:.3g}"
            + (f" to {a.threshold[1]:.3g} (differs between rows)" if varies else "")
            + f": {a.flagged:,} images ({pct(a.flagged, a.scored)}) are at or above it and flagged PNEUMONIA."
            + " Hover a bar for its counts.")
    by_label = [{"label": lab or "(no label folder)", "scored": d["scored"], "flagged": d["flagged"],
                 "share": pct(d["flagged"], d["scored"])}
                for lab, d in sorted(a.by_label.items(), key=lambda kv: (kv[0] == "", kv[0]))]
    return {"svg": Markup(histogram_svg(a.bins, a.hist, thr)), "lead": lead,
            "by_label": by_label if any(r["label"] in CLASSES for r in by_label) else []}


def _folders(a: Aggregate, max_rows: int) -> dict:
    many = (f" Depth {', '.join(map(str, a.too_many_folders))} has more than {MAX_FOLDERS_AUTO:,} folders"
            " and is left out.") if a.too_many_folders else ""
    if a.folders is None:
        return {"rows": [], "lead": ("The table is empty." if not a.files else "") + many, "has_retry": False}
    f = a.folders.sort_by([("files", "descending"), ("folder", "ascending")]).slice(0, max_rows)
    rows = []
    for r in f.to_pylist():  # at most max_rows folders, not files
        r["rate"] = r["flagged"] / r["scored"] if r["scored"] else None
        r["mean_p"] = r["prob_sum"] / r["scored"] if r["scored"] else None
        rows.append(r)
    lead = (f"{a.folder_count:,} folder{'s' if a.folder_count != 1 else ''} at depth {a.folder_depth}"
            " (the first path components below the archive root; choose with --folder-depth)."
            " Flagged rate = flagged / scored.")
    if a.folder_count > len(rows):
        lead += f" Showing the {len(rows):,} largest."
    lead += many
    return {"rows": rows, "lead": lead, "has_retry": a.has_status}


def _errors(a: Aggregate) -> dict:
    # "skipped" is no failure: the file is not what the model was made for (the "Not scored" count).
    skipped = a.count("skipped")
    bad = a.files - a.scored - skipped
    if not bad:
        also = f", or not scored by design ({skipped:,} skipped)" if skipped else ""
        return {"groups": [], "lead": f"No errors: every file was scored{also}."}
    lead = (f"{bad:,} files not scored, in {len(a.errors):,} groups of the same message (numbers, names and"
            " paths in a message are replaced by …/N), largest first, with a few example paths.")
    if a.other_error_rows:
        lead += f" {a.other_error_rows:,} more files had rarer messages not listed."
    return {"groups": [g for g in a.errors if g.status != "skipped"], "lead": lead}


def _galleries(a: Aggregate, out: str, archive: str | None, k: int, cam_dir: str) -> list[dict]:
    def flagged(r):
        return ("flagged", "flag") if r["pred"] == CLASSES[POSITIVE] else ("not flagged", "ok")

    thr = _threshold(a)
    thr_text = f"{thr:.3g}" if thr is not None else "the threshold"
    return [
        {"id": "suspicious", "title": "Most suspicious", "empty": "No image was scored.",
         "lead": f"The {k} images with the highest P(pneumonia). Each thumbnail is the CAM overlay (where the model"
                 " looked: red is most PNEUMONIA-like); click it for the full-size PNG.",
         "tiles": gallery_items(a.galleries.get("suspicious"), out, archive, cam_dir=cam_dir, badge=flagged)},
        {"id": "uncertain", "title": "Most uncertain", "empty": "No image was scored.",
         "lead": f"The {k} images closest to the threshold ({thr_text}): the model's hardest calls, worth a second look.",
         "tiles": gallery_items(a.galleries.get("uncertain"), out, archive, cam_dir=cam_dir, badge=flagged)},
        _out_of_scope(a, out, archive, k),
    ]


def _out_of_scope(a: Aggregate, out: str, archive: str | None, k: int) -> dict:
    """The files the out-of-distribution check kept from the model, and the farthest of them as the archive shows them."""
    n = a.count("out_of_scope")
    lead = (f"{n:,} files ({pct(n, a.files)}) do not look like the frontal chest radiographs the model was trained on"
            " (ood_score above the model's threshold): they have status out_of_scope and no prediction. Shown: the"
            f" {min(k, n)} farthest from the training images, as they are in the archive.")
    # Why each file was kept from the model: the gate's reasons (one per tag and value) and the OOD check's.
    reasons = [g for g in a.errors if g.status in ("skipped", "out_of_scope")]
    return {"id": "out_of_scope", "title": "Not scored: out of scope", "lead": lead, "reasons": reasons,
            "empty": "No file was put out of scope.",
            "tiles": gallery_items(a.galleries.get("out_of_scope"), out, archive, value="ood_score")}


def _model(prov: dict) -> dict:
    m, ck = prov["model"], prov["checkpoint"]
    rows = [("model", m.get("spec")), ("model id", prov["model_id"]), ("architecture", m.get("arch")),
            ("input size", f"{m['image_size']} px" if m.get("image_size") else None),
            ("threshold", m.get("threshold")), ("trained head", m.get("trained")), ("CAM stride", m.get("cam_stride")),
            ("CAM layer", m.get("cam_layer"))]
    if "temperature" in m:
        rows.append(("calibration temperature", m["temperature"]))
    rows += [(k.replace("_", " "), v) for k, v in m.items()
             if k not in {"spec", "model_id", "arch", "image_size", "threshold", "trained", "cam_stride", "cam_layer",
                          "temperature"}]
    out = {"rows": [(k, show(v)) for k, v in rows], "checkpoint_rows": [], "training_rows": [],
           "lead": "As recorded in the table's Parquet metadata (key cxr_batch) when it was scored."}
    if ck and ck.get("error"):
        out["lead"] += f" The checkpoint could not be read now: {ck['error']}"
    elif ck:
        out["checkpoint_rows"] = checkpoint_rows(ck)
        out["training_rows"] = kv_rows(ck.get("settings") or {})
    return out


def _run(prov: dict, a: Aggregate) -> dict:
    st = prov["settings"]
    lead = f"The settings of the scoring run{' that wrote the first part' if a.runs > 1 else ''}, as saved with the table."
    return {"rows": [("started", prov["started"] or "–")] + kv_rows(st), "lead": lead}

