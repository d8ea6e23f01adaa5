"""The built-in example archive: procedural chest phantoms, some with a planted opacity.

``phantom(rng, size, opacity=...)`` draws one PA chest phantom (uint8, size x size): body, two
lung fields (right diaphragm higher, left lung cut by the heart), mediastinum, trachea, spine,
clavicles, crossing posterior and anterior ribs, smooth exposure variation and film grain, under a random shift, scale, rotation,
brightness, contrast and gamma. With ``opacity=True`` it adds one soft, patchy brighter region
inside a lung and returns its centre and radius as fractions of the image side.

``synth/archive.py`` writes archives of them.

Geometry is drawn in "canonical" coordinates (u, v) in [-1, 1], u to the image right (the
patient's left), v downwards, then mapped through the per-image pose.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from ..errors import InputError

# Anatomy is drawn at most at this side and upsampled: it is smooth, so nothing is lost, and
# a 2000 px phantom then costs ~0.1 s instead of ~2 s. Only the film grain is full resolution.
WORK_SIDE = 512
MIN_SIDE = 32
# Opacity peak contrast as a fraction of how much darker lung is than soft tissue, i.e. the share
# of the air it replaces (1.0 would be as dense as the chest wall). With the patchy texture the
# lesion stays well short of white. Chosen for learnability: a 4-block CNN from scratch, 160
# images at 128 px, 8 epochs, reached test AUC 0.73-0.8 at (0.45, 0.75) but 0.87-0.99 here, with
# its CAM peak on the lesion in 77% of positives.
OPACITY_CONTRAST = (0.6, 0.9)
OPACITY_RADIUS = (0.06, 0.12)  # fraction of the image width (half-maximum radius)
JPEG_QUALITY = 90  # what the archives written from these phantoms use


def phantom(rng: np.random.Generator, size: int = 256, *, opacity: bool) -> tuple[np.ndarray, dict | None]:
    """One chest phantom: uint8 (size, size), and the opacity's {"x", "y", "r"} or None.

    Both classes consume ``rng`` identically (the opacity is always drawn, and only added when
    asked), so with the same generator state the two images differ only inside the opacity:
    no other statistic can tell the classes apart.
    """
    check_size(size)
    work = min(size, WORK_SIDE)
    u, v = _canonical_grid(rng, work)
    chest, lung, lung_depth = _anatomy(rng, u, v)
    blob, truth = _opacity(rng, lung, lung_depth=lung_depth)
    out = chest + (blob if opacity else 0.0)
    out = _exposure(rng, out)
    if work != size:
        out = _resize(out, size)
    # Grain is the one full-resolution layer; it is drawn after the resize so its
    # texture is per pixel at every size, like real film or detector noise.
    grain_sd = rng.uniform(0.015, 0.03)
    out = out + grain_sd * rng.standard_normal((size, size), dtype=np.float32)
    pixels = np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return pixels, (truth if opacity else None)


def check_size(size: int) -> None:
    if not MIN_SIDE <= size:
        raise InputError(f"Invalid size {size}: a phantom needs at least {MIN_SIDE} px to hold its anatomy.")


def _canonical_grid(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image pose: each pixel's canonical (u, v) after a random shift, scale and rotation,
    so anatomy (and hence the lesion) is never at a fixed pixel position."""
    shift = rng.uniform(-0.06, 0.06, size=2)
    scale = rng.uniform(0.9, 1.06)
    angle = np.deg2rad(rng.uniform(-4.0, 4.0))
    c = (np.arange(n, dtype=np.float32) + 0.5) / n * 2.0 - 1.0
    x, y = c[None, :] - shift[0], c[:, None] - shift[1]
    cos, sin = np.cos(angle), np.sin(angle)
    u = (cos * x + sin * y) / scale
    v = (-sin * x + cos * y) / scale
    return u.astype(np.float32), v.astype(np.float32)


def _soft(f: np.ndarray, edge: float) -> np.ndarray:
    """Soft inside-mask of the implicit shape f < 1, with a blurred edge of width ~edge."""
    return 1.0 / (1.0 + np.exp(np.clip((f - 1.0) / edge, -30, 30)))


def _anatomy(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Draw the chest before exposure. Returns the image (float32, ~[0, 1]), the lung mask
    (soft, 0..1) for lesion placement, and the lung depth that the lesion's contrast scales with."""
    n = u.shape[0]
    body = _body(rng, u, v)
    medi = _mediastinum(rng, u, v)
    lung = _lungs(rng, u, v) * (1.0 - medi) * body
    tissue = rng.uniform(0.50, 0.58)
    depth = rng.uniform(0.26, 0.34)  # how much darker air-filled lung is than soft tissue
    rib_contrast = rng.uniform(0.09, 0.13)
    # A roughly cylindrical trunk: X-rays cross less tissue near its sides, which look darker.
    thickness = 0.72 + 0.28 * np.sqrt(np.clip(1.0 - (u / 0.95) ** 2, 0, 1))
    img = 0.05 + (tissue - 0.05) * body * thickness
    # The abdomen and lower chest get thicker, hence brighter.
    img = img + 0.06 * body * np.clip(v + 0.2, 0, 1.2)
    # Lower zones overlap more soft tissue (diaphragm domes, breasts), so they are less dark.
    img = img - depth * (1.0 - 0.25 * np.clip(v / 0.5, 0, 1)) * lung
    img = img + (0.1 * medi - 0.12 * _trachea(u, v)) * body
    img = img + _hila(rng, u, v) * lung
    # Lung markings: faint, since at lesion scale they are the distractor a model must learn past.
    img = img + 0.012 * _smooth_noise(rng, n, coarse=48, sigma=1.0) * lung
    img = img + 0.05 * _spine(u, v) * body
    bones = _ribs(rng, u, v) + 1.2 * _clavicles(rng, u, v)
    # Ribs read clearly only against air; over soft tissue and the heart they fade.
    img = img + rib_contrast * bones * body * (0.35 + 0.65 * lung)
    # Uneven exposure and patient thickness: a smooth multiplicative field.
    img = img * (1.0 + 0.07 * _smooth_noise(rng, n, coarse=8, sigma=1.5))
    return img.astype(np.float32), lung, depth


def _pw(x, k):
    """|x| ** k: numpy's float32 pow is ~50x slower on negative bases, so take abs first."""
    return np.abs(x) ** k


def _body(rng, u, v):
    """Trunk with shoulders sloping down from the neck, running off the bottom; dark air outside."""
    w = rng.uniform(0.86, 0.94)
    # Shoulder line: high at the neck, sloping down to the shoulder joints at the upper corners.
    below_shoulders = (rng.uniform(-1.12, -1.05) + 0.45 * _pw(u, 1.5) - v) / 0.03
    sides = _pw(u / (w * (1.0 - 0.06 * np.clip(v - 0.3, 0, None) ** 2)), 6)
    return _soft(sides, 0.08) / (1.0 + np.exp(np.clip(below_shoulders, -30, 30)))


def _lungs(rng, u, v):
    """Two lung fields: tapered apex, dome-shaped diaphragm; the right (image-left) dome sits higher."""
    total = np.zeros_like(u)
    for side, dome in ((-1.0, rng.uniform(0.38, 0.48)), (1.0, rng.uniform(0.46, 0.56))):
        cu = side * rng.uniform(0.40, 0.45)
        a, top = rng.uniform(0.30, 0.34), rng.uniform(-0.78, -0.70)
        b = (dome - top) / 2.0 + 0.1
        cv = top + b
        # Narrower at the apex, widest near the base, like a real lung field.
        taper = 0.5 + 0.5 * np.clip((v - top) / (1.2 * b), 0, 1) ** 0.5
        ell = ((u - cu) / (a * taper)) ** 2 + ((v - cv) / b) ** 2
        # Diaphragm: below the dome curve, lowest at the costophrenic angle.
        below = (v - (dome + 0.6 * (u - cu * 0.9) ** 2)) / 0.025
        total += _soft(ell, 0.05) * (1.0 / (1.0 + np.exp(np.clip(below, -30, 30))))
    return np.clip(total, 0, 1)


def _mediastinum(rng, u, v):
    """Central soft-tissue column plus the heart, which bulges into the image-right (left) lung."""
    width = 0.1 + 0.06 * np.clip(v + 0.6, 0, 1)
    column = _soft(_pw(u / width, 3) + _pw((v + 0.25) / 0.75, 6), 0.1)
    # Aortic knob: a small bulge to the image right above the heart.
    knob = _soft(((u - 0.12) / 0.09) ** 2 + ((v + 0.3) / 0.1) ** 2, 0.25)
    hu, hv = rng.uniform(0.08, 0.13), rng.uniform(0.28, 0.36)
    hw, hh = rng.uniform(0.28, 0.34), rng.uniform(0.26, 0.31)
    heart = _soft(((u - hu) / hw) ** 2 + ((v - hv) / hh) ** 2, 0.07)
    return np.maximum(np.maximum(column, knob), heart)


def _trachea(u, v):
    """The air column of the trachea: a dark stripe down the neck to the carina."""
    return _soft(_pw(u / 0.035, 4) + _pw((v + 0.75) / 0.5, 4), 0.3)


def _spine(u, v):
    """Vertebral column with faint per-vertebra banding, seen through the mediastinum."""
    column = _soft(_pw(u / 0.065, 4), 0.15) * _soft(_pw((v + 0.1) / 1.1, 4), 0.1)
    return column * (0.8 + 0.2 * np.cos(2 * np.pi * v / 0.11))


def _ribs(rng, u, v):
    """Posterior ribs (arcs leaving the spine, curving down laterally) and fainter anterior ribs
    (sloping down towards the midline), so they cross as on a real film.

    One periodic band in the arc-following coordinate draws all ribs of a side at once."""
    au = np.abs(u)
    first, spacing = rng.uniform(-0.82, -0.76), rng.uniform(0.12, 0.135)
    post = _rib_bands(v - (-0.15 * au + 0.95 * au**2), first, spacing, 0.2, count=10)
    post = post * _soft(_pw((au - 0.5) / 0.42, 4), 0.15)
    ant = _rib_bands(v + 0.5 * au, first - 0.05 + 0.45, spacing * 1.5, 0.15, count=6)
    ant = ant * _soft(_pw((au - 0.62) / 0.3, 4), 0.2)
    return post + 0.45 * ant


def _rib_bands(arc, first, spacing, half, *, count):
    """``count`` bright bands along ``arc`` = const, as tubes with brighter cortical edges."""
    phase = (arc - first) / spacing
    frac = phase - np.round(phase)
    band = np.exp(-_pw(frac / half, 4))
    edge = np.exp(-(((np.abs(frac) - half) / (0.25 * half)) ** 2))
    keep = _soft(_pw((phase - (count - 1) / 2) / ((count + 0.6) / 2), 8), 0.1)
    return (0.7 * band + 0.3 * edge) * keep


def _clavicles(rng, u, v):
    """Two bright bands across the apices, rising laterally."""
    au = np.abs(u)
    v0 = rng.uniform(-0.76, -0.68)
    centre = v0 - 0.3 * (au - 0.08) + 0.25 * (au - 0.08) ** 2
    along = _soft(_pw((au - 0.36) / 0.3, 4), 0.15)
    return np.exp(-(((v - centre) / 0.028) ** 2)) * along


def _hila(rng, u, v):
    """Brighter vessels fanning out from each hilum: lungs are brighter medially and low."""
    out = np.zeros_like(u)
    for side in (-1.0, 1.0):
        du, dv = u - side * 0.2, v - rng.uniform(-0.05, 0.05)
        out += 0.1 * np.exp(-(du**2 / 0.025 + dv**2 / 0.06))
    return out


def _opacity(rng, lung, *, lung_depth):
    """A soft, patchy bright region centred well inside a lung; returns (layer, truth dict).

    Always drawn (even for NORMAL) so that both classes use the random stream identically."""
    n = lung.shape[0]
    r = rng.uniform(*OPACITY_RADIUS)
    amp = rng.uniform(*OPACITY_CONTRAST) * lung_depth
    # Either lung with equal odds (the larger right lung would otherwise win ~60%), then a centre
    # on a coarse grid inside it, at least 0.6 r from its edge: most of the lesion lies over lung
    # and the recorded centre is always in a lung field.
    step = max(1, n // 64)
    inside = lung[::step, ::step] > 0.5
    depth = ndimage.distance_transform_edt(inside) * step / n
    parts, count = ndimage.label(inside)
    if count >= 2:  # keep the largest two components, left and right lung
        sizes = ndimage.sum_labels(inside, parts, index=np.arange(1, count + 1))
        two = np.argsort(sizes)[-2:] + 1
        xs = [np.argwhere(parts == k)[:, 1].mean() for k in two]
        depth = np.where(parts == two[np.argsort(xs)][int(rng.random() < 0.5)], depth, 0.0)
    else:
        rng.random()  # keep the random stream the same length whatever the anatomy
    ok = np.argwhere(depth >= 0.6 * r)
    if len(ok) == 0:  # a tiny lung: take its deepest point
        ok = np.argwhere(depth == depth.max())
    iy, ix = ok[rng.integers(len(ok))]
    cy, cx = (np.array([iy, ix]) * step + 0.5 + rng.uniform(-0.5, 0.5, 2) * step) / n
    yy, xx = np.ogrid[:n, :n]
    d2 = ((xx + 0.5) / n - cx) ** 2 + ((yy + 0.5) / n - cy) ** 2
    # Flat-topped super-gaussian: half maximum at r, nearly gone at 1.5 r.
    profile = np.exp(-0.693 * (d2 / (r * r)) ** 2)
    # Patchy texture: coarse smoothed noise times a finer one, mean ~1.1, never below 0.3.
    texture = 1.1 + 0.3 * _smooth_noise(rng, n, coarse=int(4 / r), sigma=1.0)
    texture *= 1.0 + 0.2 * _smooth_noise(rng, n, coarse=int(10 / r), sigma=1.0)
    layer = amp * profile * np.clip(texture, 0.3, None) * np.clip(lung * 1.3, 0, 1)
    return layer.astype(np.float32), {"x": float(cx), "y": float(cy), "r": float(r)}


def _exposure(rng, img):
    """Random brightness, contrast and gamma: film and detector settings differ per image."""
    contrast, bright, gamma = rng.uniform(0.85, 1.15), rng.uniform(-0.05, 0.05), rng.uniform(0.85, 1.15)
    img = (img - 0.4) * contrast + 0.4 + bright
    return np.clip(img, 0, 1) ** gamma


def _smooth_noise(rng, n, *, coarse, sigma):
    """Unit-variance smooth noise at side n, drawn on a coarse x coarse grid and upsampled
    (much cheaper than blurring full-size white noise with a wide kernel)."""
    coarse = int(np.clip(coarse, 4, n))
    g = ndimage.gaussian_filter(rng.standard_normal((coarse, coarse)), sigma, mode="wrap")
    g = (g - g.mean()) / (g.std() + 1e-8)
    return _resize(g.astype(np.float32), n)


def _resize(a: np.ndarray, n: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a.astype(np.float32)).resize((n, n), Image.BICUBIC))
