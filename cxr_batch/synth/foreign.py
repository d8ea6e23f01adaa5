"""Foreign images: inputs a frontal chest radiograph model must not score, made offline.

``make_foreign(out)`` writes ``OUT/<kind>/*``, one folder per kind:
  lateral   a side view of the chest (spine behind, heart in front, one lung field), as JPEG
  abdomen   a frontal abdomen film (spine, pelvis, bowel gas, no lungs), as JPEG
  limb      a long bone in soft tissue on an empty background, as JPEG
  text      a page of text (a scanned request form), drawn with Pillow, as PNG
  photo     crops of the photographs that ship inside matplotlib (sample_data), as JPEG
  dicom     pydicom's own test files that hold pixels: CT, MR, US, NM, RT dose, secondary captures,
            segmentations, multi-frame cines
The radiograph-like kinds go through the chest phantom's own film (synth/phantom.film): the same
noise, edge enhancement and grain, so what sets them apart is the anatomy, not the film.
No folder is named NORMAL or PNEUMONIA: the rows have no label.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import InputError
from .phantom import JPEG_QUALITY, check_size, film

KINDS = ("lateral", "abdomen", "limb", "text", "photo", "dicom")
WORK = 256  # anatomy is drawn at this side; the film resizes it


def make_foreign(out_dir, *, n: int = 20, size: int = 256, seed: int = 0, kinds=KINDS) -> list[Path]:
    """Write ``n`` images of each generated kind (and of photo crops; every corpus file for dicom) under
    ``out_dir``; returns the files written. Each image has its own generator seeded from (seed, kind, index)."""
    check_size(size)
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise InputError(f"Invalid foreign kind {', '.join(unknown)}. Only {', '.join(KINDS)} are supported.")
    out = Path(out_dir)
    written = []
    for k, kind in enumerate(KINDS):
        if kind not in kinds:
            continue
        folder = out / kind
        folder.mkdir(parents=True, exist_ok=True)
        if kind == "dicom":
            written += _copy_dicom_corpus(folder)
            continue
        for i in range(n):
            rng = np.random.default_rng([seed, k, i, 7_919])
            if kind == "photo":
                img = _photo(rng, size)
            elif kind == "text":
                img = _text_page(rng, size)
            else:
                img = film(rng, _DRAW[kind](rng, *_grid(rng)), size)
            path = folder / f"{kind}-{i:04d}.{'png' if kind == 'text' else 'jpeg'}"
            if img is None:
                break
            Image.fromarray(img).save(path, **({} if kind == "text" else {"quality": JPEG_QUALITY}))
            written.append(path)
    return written


def _grid(rng):
    """Canonical coordinates (u, v) in [-1, 1] with a small random pose (shift, rotation, scale)."""
    t = np.linspace(-1, 1, WORK, dtype=np.float32)
    v, u = np.meshgrid(t, t, indexing="ij")
    a = np.deg2rad(rng.uniform(-6, 6))
    s = rng.uniform(0.9, 1.1)
    du, dv = rng.uniform(-0.08, 0.08, 2)
    return (np.cos(a) * u - np.sin(a) * v) * s + du, (np.sin(a) * u + np.cos(a) * v) * s + dv


def _blob(u, v, cu, cv, ru, rv, edge=0.08):
    """Soft-edged ellipse: 1 inside, 0 outside."""
    r = np.sqrt(((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2)
    return np.clip((1 - r) / edge, 0, 1)


def _vertebrae(u, v, cu, width, top, bottom, height, rng):
    """A column of vertebral bodies centred at u = cu."""
    column = np.zeros_like(u)
    for c in np.arange(top, bottom, height * 1.25):
        column = np.maximum(column, _blob(u, v, cu + rng.normal(0, 0.01), c, width, height / 2, edge=0.3))
    return column


def _lateral(rng, u, v):
    body = _blob(u, v, 0, 0.1, rng.uniform(0.75, 0.9), 1.3, edge=0.05)
    lung = _blob(u, v, rng.uniform(-0.05, 0.05), -0.15, rng.uniform(0.5, 0.6), rng.uniform(0.6, 0.7), edge=0.3)
    heart = _blob(u, v, rng.uniform(-0.35, -0.2), 0.25, rng.uniform(0.3, 0.38), rng.uniform(0.3, 0.36), edge=0.4)
    spine = _vertebrae(u, v, rng.uniform(0.5, 0.6), 0.12, -1.0, 1.0, 0.16, rng)
    sternum = _blob(u, v, -0.7, -0.1, 0.04, 0.5, edge=0.5)
    below = np.clip((v - 0.45 - 0.2 * u ** 2) / 0.1, 0, 1)  # the diaphragm
    return body * 1.1 - 0.8 * lung * (1 - below) + 0.4 * heart * lung + 0.7 * spine + 0.4 * sternum


def _abdomen(rng, u, v):
    body = _blob(u, v, 0, 0.05, rng.uniform(0.85, 0.95), 1.4, edge=0.05)
    spine = _vertebrae(u, v, 0.0, 0.13, -1.0, 0.4, 0.18, rng)
    pelvis = sum(_blob(u, v, side * 0.45, 0.75, 0.35, 0.2, edge=0.3) * (1 - _blob(u, v, side * 0.45, 0.8, 0.25, 0.12, 0.3))
                 for side in (-1, 1))
    gas = np.zeros_like(u)
    for _ in range(rng.integers(8, 20)):
        gas = np.maximum(gas, _blob(u, v, rng.uniform(-0.6, 0.6), rng.uniform(-0.7, 0.5), *rng.uniform(0.04, 0.14, 2), 0.5))
    return body * 1.3 + 0.7 * spine + 0.8 * pelvis - 0.5 * gas


def _limb(rng, u, v):
    a = rng.uniform(-0.6, 0.6)
    x = np.cos(a) * u + np.sin(a) * v  # across the limb
    tissue = np.clip((rng.uniform(0.3, 0.45) - np.abs(x)) / 0.05, 0, 1)
    w = rng.uniform(0.08, 0.14)
    shaft = np.clip((w - np.abs(x)) / 0.02, 0, 1)
    marrow = np.clip((w * 0.55 - np.abs(x)) / 0.02, 0, 1)
    return 0.6 * tissue + 0.9 * shaft - 0.5 * marrow


_DRAW = {"lateral": _lateral, "abdomen": _abdomen, "limb": _limb}

_WORDS = ("patient", "name", "date", "request", "chest", "radiology", "clinical", "history", "cough", "fever",
          "ward", "signed", "referring", "physician", "exam", "urgent", "report", "findings", "none", "id")


def _text_page(rng, size: int) -> np.ndarray:
    """A grey-on-white page of words in lines, with a box or two, as a scanned form looks."""
    page = Image.new("L", (size, size), int(rng.integers(225, 255)))
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=max(8, size // int(rng.integers(18, 30))))
    y = int(size * rng.uniform(0.03, 0.1))
    while y < size * 0.93:
        words = " ".join(rng.choice(_WORDS, int(rng.integers(2, 9))))
        draw.text((int(size * rng.uniform(0.03, 0.12)), y), words, fill=int(rng.integers(0, 80)), font=font)
        y += int(font.size * rng.uniform(1.4, 2.4))
    for _ in range(rng.integers(0, 3)):
        x0, y0 = (rng.uniform(0.05, 0.6, 2) * size).astype(int)
        draw.rectangle([x0, y0, x0 + size // 3, y0 + size // 8], outline=int(rng.integers(0, 90)))
    return np.asarray(page)


def _sample_photos() -> list[str]:
    """Photographs that ship inside matplotlib (no download)."""
    try:
        import matplotlib
    except ImportError:
        return []
    folder = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data")
    names = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")
    return [os.path.join(folder, n) for n in names if os.path.exists(os.path.join(folder, n))]


def _photo(rng, size: int) -> np.ndarray | None:
    """A random square crop (40-100% of the short side) of one of the bundled photographs, in colour."""
    sources = _sample_photos()
    if not sources:
        return None
    with Image.open(sources[int(rng.integers(len(sources)))]) as im:
        im = im.convert("RGB")
        side = int(min(im.size) * rng.uniform(0.4, 1.0))
        x0, y0 = int(rng.integers(0, im.width - side + 1)), int(rng.integers(0, im.height - side + 1))
        return np.asarray(im.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.BILINEAR))


def _copy_dicom_corpus(folder: Path) -> list[Path]:
    """pydicom's bundled test files that carry pixel data (none of them a chest radiograph)."""
    try:
        import pydicom
        from pydicom.data import get_testdata_files
    except ImportError:
        return []
    written = []
    for f in sorted(get_testdata_files("*.dcm")):
        try:
            if "PixelData" not in pydicom.dcmread(f, specific_tags=["PixelData"]):
                continue
        except Exception:  # a deliberately broken file of the corpus: not an image we want
            continue
        written.append(Path(shutil.copy(f, folder / os.path.basename(f))))
    return written
