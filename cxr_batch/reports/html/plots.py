"""Pictures for the HTML reports: the P(pneumonia) histogram as inline SVG, image thumbnails as data URIs.

The histogram is vector (crisp at any zoom, a few KB) and its text is drawn by the browser in the
page's own font; hovering a bar tells its range and counts. Thumbnails are small JPEGs embedded in
the page, so it opens from disk anywhere; the full-size PNG stays a link.
"""

from __future__ import annotations

import base64
import html
import io
import re
from concurrent.futures import ThreadPoolExecutor

import matplotlib
import numpy as np
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.figure import Figure
from PIL import Image

from ... import CLASSES
from ...archive import storage
from ...pixels.decode import DEFAULT_MAX_PIXELS, decode_image
from ...errors import DecodeError
from ...pixels.gray import to_u8

# Colour-blind-safe pair (Okabe-Ito blue and orange) for the two classes; grey for unlabelled.
LABEL_COLOURS = {CLASSES[0]: "#0072B2", CLASSES[1]: "#E69F00", "": "#7f8c9a"}
FLAG_COLOUR = "#c0392b"
THUMB_PX = 176


def _svg(fig: Figure) -> str:
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "cxr-batch"}):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    s = buf.getvalue()
    s = s[s.index("<svg"):]  # inline SVG: no XML prolog or DOCTYPE
    s = re.sub(r"<metadata>.*?</metadata>", "", s, flags=re.S)
    s = re.sub(r"font-family:[^;\"]*", "font-family: inherit", s)  # the page's font, not DejaVu by name
    return re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', r'<svg\1 class="plot" role="img"', s, count=1)


def histogram_svg(edges: np.ndarray, hist: dict, threshold: float | None) -> str:
    """Stacked bars of P(pneumonia) per label ("" = unlabelled), the flagged side shaded."""
    fig = Figure(figsize=(11, 3.3), layout="constrained")
    FigureCanvasSVG(fig)
    ax = fig.add_subplot()
    width = np.diff(edges)
    bottom = np.zeros(len(width))
    labels = [lab for lab in (*CLASSES, "") if lab in hist and np.sum(hist[lab])]
    for j, lab in enumerate(labels):
        counts = np.asarray(hist[lab], dtype=float)
        name = f"label {lab}" if lab else "no label folder"
        bars = ax.bar(edges[:-1], counts, width=width, bottom=bottom, align="edge", color=LABEL_COLOURS[lab],
                      edgecolor="white", linewidth=0.5, label=name)
        for i, bar in enumerate(bars):
            bar.set_gid(f"bin-{i}-{j}")
        bottom += counts
    if threshold is not None:
        ax.axvspan(threshold, 1.0, color=FLAG_COLOUR, alpha=0.06, lw=0, label="flagged PNEUMONIA")
        ax.axvline(threshold, color=FLAG_COLOUR, lw=1.4, ls=(0, (4, 2)))
        right = threshold < 0.75
        ax.annotate(f"threshold {threshold:.3g}", (threshold, 1), xycoords=("data", "axes fraction"),
                    xytext=(5 if right else -5, -2), textcoords="offset points", va="top",
                    ha="left" if right else "right", color=FLAG_COLOUR, fontsize=9.5)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(1.0, float(bottom.max()) * 1.08))
    ax.set_xticks(np.linspace(0, 1, 11))
    ax.tick_params(labelsize=9, length=3)
    ax.set_xlabel("P(pneumonia)", fontsize=10)
    ax.set_ylabel("images", fontsize=10)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.grid(axis="y", alpha=0.25)
    ax.set_axisbelow(True)
    fig.legend(loc="outside upper right", ncols=4, frameon=False, fontsize=9)
    return _with_tooltips(_svg(fig), edges, hist, labels)


def _with_tooltips(svg: str, edges, hist, labels) -> str:
    def title(m):
        i = int(m.group(1))
        parts = [f"{int(hist[lab][i]):,} {lab or 'without a label folder'}" for lab in labels]
        text = f"P(pneumonia) {edges[i]:.2f}–{edges[i + 1]:.2f}: " + ", ".join(parts)
        return f"{m.group(0)}<title>{html.escape(text)}</title>"

    return re.sub(r'<g id="bin-(\d+)-\d+">', title, svg)


# ---------------------------------------------------------------- thumbnails

def _jpeg_uri(im: Image.Image, px: int) -> str:
    im.thumbnail((px, px), Image.BILINEAR)
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=82, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def thumbnail(uri: str, *, cam: bool = True, px: int = THUMB_PX, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """A data URI of a small JPEG of the image at ``uri``: a CAM overlay PNG (``cam``, kept in
    colour) or an archive file (gray). None when it cannot be read: the page then shows a
    placeholder, never a broken image."""
    try:
        data = storage.read_bytes(uri)
        if cam:
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > max_pixels:
                    return None
                return _jpeg_uri(im.copy(), px)
        # Archive files are untrusted (bombs, DICOM): the scoring job's decoder and its pixel limit.
        return _jpeg_uri(Image.fromarray(to_u8(decode_image(data, max_pixels=max_pixels, draft=px).gray)), px)
    except (OSError, DecodeError, ValueError, Image.DecompressionBombError):
        return None


def thumbnails(items: list[tuple[str | None, bool]], *, px: int = THUMB_PX, threads: int = 8) -> list[str | None]:
    """(uri, cam) pairs -> data URIs. Object stores answer each GET in tens of ms: fetched in parallel."""
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda it: thumbnail(it[0], cam=it[1], px=px) if it[0] else None, items))
