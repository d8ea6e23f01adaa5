"""Task families that are not the phantom: an additive opacity on a textured, low-contrast background.

The phantom (phantom.py) models the lesion on clean anatomy. Real films are different in the ways that
matter to a network learning from a few hundred images: their background is full of texture at every
scale (vessels, ribs, scanner noise, overlying soft tissue) and their contrast is low, so an opacity is
a soft, mottled lift of a few tens of grey levels that a small receptive field cannot tell from the
texture around it. These families draw exactly that, so that a training recipe is judged on more than
one kind of data (docs/decisions/001-full-network.md):

  - ``texture``: a background of 1/f noise with rib-like bands at a random angle and spacing, at low
    contrast; two oval "lung fields"; the opacity is a textured Gaussian blob in one of them.
  - ``film``: the phantom's NORMAL film (anatomy, grain, exposure) under extra texture with its
    contrast flattened; the same additive opacity in one lung field. The image source changes, the
    lesion model is the one above.

Both classes consume the generator identically (the blob is always drawn and added only for
PNEUMONIA), so nothing but the opacity tells them apart. Truth is the blob's centre and, as for the
phantom, the radius of a disc of the area above half its peak, as fractions of the side.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from . import FAMILIES
from .phantom import _resize, check_size, phantom

# The opacity: a lift of this many grey levels at its centre, radius (sigma) as a share of the side.
# The same ranges as the held-out task of real films this project is checked on.
LIFT = (45.0, 70.0)
RADIUS = (0.07, 0.12)
HALF_MAX = float(np.sqrt(2 * np.log(2)))  # a Gaussian falls to half its peak at this many sigmas


def family_image(rng: np.random.Generator, size: int, *, family: str, opacity: bool) -> tuple[np.ndarray, dict | None]:
    """One image of ``family`` (uint8, size x size) and its lesion truth {"x", "y", "r"} or None."""
    check_size(size)
    if family == "phantom":
        return phantom(rng, size, opacity=opacity)
    if family == "texture":
        base = _textured_background(rng, size)
    elif family == "film":
        base = _flattened_film(rng, size)
    else:
        raise ValueError(f"Invalid family {family}. Only {', '.join(FAMILIES)} are supported.")
    blob, truth = _opacity(rng, size)
    img = base + (blob if opacity else 0.0)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), (truth if opacity else None)


def _power_noise(rng, n: int, beta: float) -> np.ndarray:
    """Unit-variance noise with a 1/f**beta amplitude spectrum: texture at every scale."""
    fy = np.fft.fftfreq(n)[:, None]
    fx = np.fft.rfftfreq(n)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    spectrum = (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)) / f**beta
    spectrum[0, 0] = 0.0
    g = np.fft.irfft2(spectrum, s=(n, n))
    return ((g - g.mean()) / (g.std() + 1e-8)).astype(np.float32)


def _textured_background(rng, n: int) -> np.ndarray:
    """Grey levels (float) of a heavy-textured, low-contrast field: 1/f noise, rib-like bands, two
    darker lung fields, an exposure gradient and per-pixel grain."""
    y, x = (np.indices((n, n), dtype=np.float32) + 0.5) / n
    texture = _power_noise(rng, n, rng.uniform(0.9, 1.4))
    angle, spacing = rng.uniform(-0.5, 0.5), rng.uniform(0.07, 0.12)
    ribs = np.cos(2 * np.pi * ((np.cos(angle) * y + np.sin(angle) * x) / spacing + rng.uniform(0, 1))) ** 8
    lungs = _lung_fields(x, y)
    mean, contrast = rng.uniform(95, 150), rng.uniform(10, 18)
    img = mean - 0.8 * contrast * lungs + contrast * texture + rng.uniform(6, 14) * ribs
    img = img + rng.uniform(-12, 12) * (x - 0.5) + rng.uniform(-12, 12) * (y - 0.5)
    return img + rng.uniform(3, 7) * rng.standard_normal((n, n)).astype(np.float32)


def _flattened_film(rng, n: int) -> np.ndarray:
    """The phantom's NORMAL film with its contrast flattened and heavy texture laid over it."""
    film, _ = phantom(rng, n, opacity=False)
    img = film.astype(np.float32)
    img = img.mean() + rng.uniform(0.45, 0.7) * (img - img.mean())
    return img + rng.uniform(8, 14) * _power_noise(rng, n, rng.uniform(0.9, 1.3))


def _lung_fields(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Soft masks (0..1) of two oval lung fields, left and right of the midline."""
    masks = [np.exp(-(((x - cx) / 0.17) ** 2 + ((y - 0.5) / 0.3) ** 2) ** 3) for cx in (0.28, 0.72)]
    return np.maximum(*masks)


def _opacity(rng, n: int) -> tuple[np.ndarray, dict]:
    """A soft, mottled Gaussian lift in one lung field (grey levels), and its truth."""
    r = rng.uniform(*RADIUS)
    cx = rng.choice([0.28, 0.72]) + rng.uniform(-0.08, 0.08)
    cy = 0.5 + rng.uniform(-0.2, 0.2)
    y, x = (np.indices((n, n), dtype=np.float32) + 0.5) / n
    aspect, angle = rng.uniform(0.7, 1.0), rng.uniform(0, np.pi)
    du, dv = x - cx, y - cy
    a = (np.cos(angle) * du + np.sin(angle) * dv) / r
    b = (-np.sin(angle) * du + np.cos(angle) * dv) / (r * aspect)
    envelope = np.exp(-0.5 * (a**2 + b**2))
    coarse = ndimage.gaussian_filter(rng.standard_normal((max(4, n // 16),) * 2), 1.0, mode="wrap")
    mottle = 1.0 + 0.35 * _resize(((coarse - coarse.mean()) / (coarse.std() + 1e-8)).astype(np.float32), n)
    blob = rng.uniform(*LIFT) * envelope * np.clip(mottle, 0.3, None)
    return blob.astype(np.float32), {"x": float(cx), "y": float(cy), "r": float(HALF_MAX * r * np.sqrt(aspect))}
