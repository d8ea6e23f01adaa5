"""What both HTML reports share: the Jinja2 environment (autoescaping: file names are untrusted),
value formatting, relative links, gallery tiles and the rows that describe a checkpoint."""

from __future__ import annotations

import os
import time
from functools import lru_cache
from urllib.parse import quote

from ... import CLASSES, __version__
from ...archive import storage
from ...archive.results import cam_uri

# Checkpoint entries shown in their own rows, or not at all (arch and size are in the model's rows).
_CHECKPOINT_SHOWN = {"uri", "same_file", "model_id", "settings", "metrics", "epoch", "epochs_trained", "threshold",
                     "arch", "image_size", "cam_stride", "cam_layer"}


@lru_cache(maxsize=1)
def _env():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("cxr_batch.reports.html", "templates"),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.globals["classes"] = CLASSES
    return env


def render(template: str, **context) -> str:
    context.setdefault("banners", [])
    return _env().get_template(template).render(version=__version__, generated=time.strftime("%Y-%m-%d %H:%M"),
                                                **context)


def link(target: str | None, page: str) -> str | None:
    """A relative, URL-quoted link from the page to ``target`` when both are on the local disk."""
    if not target or storage.is_uri(target) or storage.is_uri(page):
        return None
    rel = os.path.relpath(storage.absolute(target), os.path.dirname(storage.absolute(page)))
    return quote(rel.replace(os.sep, "/"))


def pct(n: int, d: int) -> str:
    return f"{100 * n / d:.1f}%" if d else "–"


def _cam_of(r: dict, cam_dir: str | None) -> str | None:
    """The row's CAM PNG; when the table and its CAMs were moved or copied together (the stored
    path is absolute), the same relative name under ``cam_dir``."""
    cam = r.get("cam_path")
    if cam and cam_dir and not storage.exists(cam):
        moved = cam_uri(cam_dir, r["path"])
        return moved if storage.exists(moved) else cam
    return cam


def gallery_items(table, page: str, archive: str | None, *, cam_dir: str | None = None, badge=None,
                  value: str = "prob_pneumonia") -> list[dict]:
    """Gallery rows -> tiles: a CAM thumbnail (else the archive image itself) and a link to the full PNG;
    each captioned with its ``value`` column (P(pneumonia), or ood_score)."""
    from .plots import thumbnails

    rows = table.to_pylist() if table is not None else []
    sources = []
    for r in rows:
        cam = _cam_of(r, cam_dir)
        if cam:
            sources.append((cam, True))
        elif archive and ".." not in r["path"].split("/"):
            sources.append((storage.join(archive, *r["path"].split("/")), False))
        else:
            sources.append((None, False))
    thumbs = thumbnails(sources)
    items = []
    for r, (src, is_cam), thumb in zip(rows, sources, thumbs):
        b = badge(r) if badge else None
        items.append({"path": r["path"], "prob": r[value], "thumb": thumb,
                      "value_label": "P(pneumonia)" if value == "prob_pneumonia" else value,
                      "href": link(src, page) if thumb and is_cam else None,
                      "missing": "CAM not written" if not r.get("cam_path") else "CAM PNG not found",
                      "badge": b[0] if b else None, "badge_cls": b[1] if b else ""})
    return items


def kv_rows(d: dict, skip=()) -> list[tuple[str, str]]:
    return [(k.replace("_", " "), show(v)) for k, v in d.items() if k not in skip]


def show(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {show(x)}" for k, x in v.items()) or "–"
    if isinstance(v, (list, tuple)):
        return ", ".join(show(x) for x in v) or "–"
    return str(v)


def checkpoint_rows(ck: dict) -> list[tuple[str, str]]:
    """What a reader asks of a checkpoint: which file, trained on what, how long, how good on validation."""
    metrics = ck.get("metrics") or {}
    train = ck.get("settings") or {}
    rows = [("file", ck["uri"]), ("same file as scored", ck.get("same_file")), ("training data", train.get("data")),
            ("initial weights", train.get("weights"))]
    if ck.get("epochs_trained"):
        rows.append(("epochs", f"best epoch {ck.get('epoch')} of {ck['epochs_trained']} trained"))
    if metrics.get("val_n"):
        rows.append(("validation", f"AUC {show(metrics.get('val_auc'))}, accuracy {show(metrics.get('val_acc'))}"
                                   f" on {show(metrics.get('val_n'))} images"))
    rows.append(("threshold", f"{show(ck.get('threshold'))} ({metrics.get('threshold_rule', 'rule not recorded')})"))
    rows += [(k.replace("_", " "), v) for k, v in ck.items() if k not in _CHECKPOINT_SHOWN]
    return [(k, show(v)) for k, v in rows if v is not None]
