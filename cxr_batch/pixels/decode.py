"""Decode one image file's bytes into pixels: the boundary where every format becomes one array.

The contract (everything downstream relies on it):
  ``decode_image(data) -> Decoded`` with ``gray``: float32, shape (H, W), range [0, 1],
  0 = black as a radiologist sees it (air dark, bone bright); one channel whatever the input
  mode (L, RGB, RGBA, P, CMYK, 1-bit, 16-bit, float, DICOM). ``width``/``height`` are the
  file's own pixel size, before any reduced-scale decode.

Failures raise ``DecodeError`` with a one-line message, which the scoring job stores in the
row's ``error`` column: a bad file is a row, never a crashed job.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DecodeError, one_line
from .gray import window_minmax

# 100 M pixels is ~10x the largest plain chest radiograph (4,300 x 3,500 detector) and well below
# the ~1 GB of memory a decoded bomb of PIL's own limit (179 M) would take per decode task.
DEFAULT_MAX_PIXELS = 100_000_000


@dataclass(frozen=True)
class Decoded:
    gray: np.ndarray  # float32 (H, W) in [0, 1]; may be smaller than width x height (draft decode)
    width: int  # the file's own pixel width
    height: int
    format: str  # "JPEG", "PNG", "DICOM", ...
    meta: dict = field(default_factory=dict)  # DICOM attributes (modality, view position, UID)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft: int | None = None,
                 gate: dict | None = None) -> Decoded:
    """Decode ``data`` (a whole file) to a grayscale float image.

    ``draft``: the smallest side the caller needs. JPEGs are then decoded at a reduced DCT scale
    (1/2, 1/4 or 1/8) that still covers it, which is 3-10x faster on full-size radiographs.
    ``gate``: for a DICOM, gate.gate_reason's keyword arguments; a header that rules the file out
    raises ``errors.Skipped`` before any pixel is decoded. None: no gate.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    from .dicom import is_dicom, is_raw_dataset  # local import: pydicom is slow to import, and most archives hold no DICOM

    if is_dicom(data[:132]):
        return _decode_dicom(data, max_pixels, gate)
    try:
        with warnings.catch_warnings():
            # PIL warns (and only raises at 2x) above its own limit; ours is checked below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise DecodeError(f"too many pixels: {one_line(e)}") from None
    except UnidentifiedImageError:
        if is_raw_dataset(data):  # a DICOM dataset without the preamble (ACR-NEMA era exports)
            return _decode_dicom(data, max_pixels, gate)
        raise DecodeError("not an image: the bytes are no format Pillow or pydicom can read") from None
    except Exception as e:  # PIL raises many types for mangled headers
        raise DecodeError(f"unreadable image header: {one_line(e)}") from None
    width, height = im.size
    if width * height > max_pixels:
        raise DecodeError(
            f"too many pixels: {width}x{height} = {width * height:,} exceeds the limit of {max_pixels:,}"
            " (raise --max-pixels if this file is trusted)"
        )
    fmt = im.format or "unknown"
    try:
        if draft and fmt == "JPEG":
            im.draft("L", (draft, draft))  # keeps every side >= draft, so no detail the model sees is lost
        im.load()
        gray = _to_gray(im)
    except DecodeError:
        raise
    except Exception as e:  # truncated streams, bad Huffman tables, unsupported modes
        raise DecodeError(f"truncated or corrupt image data ({fmt}): {one_line(e)}") from None
    if gray.shape[0] < 1 or gray.shape[1] < 1:
        raise DecodeError(f"image has no pixels ({width}x{height})")
    return Decoded(gray, width, height, fmt)


def _decode_dicom(data: bytes, max_pixels: int, gate: dict | None) -> Decoded:
    from .dicom import decode_dicom

    gray, meta = decode_dicom(data, max_pixels=max_pixels, gate=gate)
    return Decoded(gray, int(meta["width"]), int(meta["height"]), "DICOM", meta)


def _to_gray(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> float32 [0, 1]. 8-bit modes keep their absolute scale (/255), so a JPEG means
    the same to the model at training and scoring time; deeper modes are windowed min..max because
    their bit depth (10, 12, 14 or 16 bits stored in 16) is not recorded in the file."""
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return window_minmax(np.asarray(im, dtype=np.float32))
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        # Transparent pixels carry no X-ray: put them on black, as a viewer would.
        im = im.convert("RGBA")
        black = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(black, im)
    if mode == "CMYK":
        im = im.convert("RGB")
    if im.mode != "L":
        im = im.convert("L")
    return np.asarray(im, dtype=np.float32) * np.float32(1 / 255)
