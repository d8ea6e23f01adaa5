"""Test images of every mode and a few broken files, written with Pillow."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def gradient(h=96, w=80) -> np.ndarray:
    """A horizontal ramp 0..255 with a bright square, as uint8 (h, w)."""
    a = np.tile(np.linspace(0, 255, w), (h, 1))
    a[10:30, 10:30] = 255
    return a.astype(np.uint8)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def all_modes() -> dict[str, bytes]:
    g = gradient()
    L = Image.fromarray(g)
    rgb = Image.merge("RGB", [L, L, L])
    rgba = rgb.copy()
    rgba.putalpha(255)
    out = {
        "L.png": encode(L, "PNG"),
        "L.jpeg": encode(L, "JPEG", quality=95),
        "RGB.jpeg": encode(rgb, "JPEG", quality=95),
        "RGB.png": encode(rgb, "PNG"),
        "RGBA.png": encode(rgba, "PNG"),
        "P.png": encode(L.convert("P"), "PNG"),
        "CMYK.jpeg": encode(rgb.convert("CMYK"), "JPEG", quality=95),
        "1bit.png": encode(L.point(lambda v: 255 if v > 127 else 0).convert("1"), "PNG"),
        "progressive.jpeg": encode(L, "JPEG", quality=95, progressive=True),
        "bmp.bmp": encode(L, "BMP"),
        "tiff.tiff": encode(L, "TIFF"),
    }
    # 12-bit data in a 16-bit PNG: values 0..4095, which an 8-bit read would clip to white.
    a16 = (g.astype(np.uint16) * 16).astype(np.uint16)
    out["I16.png"] = encode(Image.fromarray(a16), "PNG")
    return out


def broken() -> dict[str, bytes]:
    good = encode(Image.fromarray(gradient()), "JPEG", quality=95)
    return {
        "empty.jpeg": b"",
        "text.jpeg": b"this is not an image\n" * 10,
        "truncated.jpeg": good[: len(good) // 3],
    }
