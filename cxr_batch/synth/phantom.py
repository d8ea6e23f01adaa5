"""The built-in example archive: procedural pediatric chest phantoms, some with a pneumonia.

``phantom(rng, size, opacity=...)`` draws one frontal chest radiograph (uint8, size x size) the
way the film is made: each structure adds X-ray attenuation along the beam (soft tissue, air in
the lungs, trachea and stomach, bone), and the film turns the summed attenuation into
brightness. What readers of real films see then follows without being painted in:
  - the lungs are darkest in the middle zones and brighter towards the apices (thin lung) and the
    bases, where the diaphragm domes curve up into the lung and shorten the air path;
  - the large pediatric heart is bright where it displaces lung, but lung behind it still shows
    through, and so does a consolidation there (dimmer); the same below the dome, where the
    posterior recesses of the lung project over the liver and stomach;
  - bones (clavicles, ribs, spine, scapulae, humeri) add on top with little contrast in children;
  - a lesion replaces air in the lung with fluid, so it shows only where lung is, with contrast
    that grows with its depth: a small nodule is faint, a lobar consolidation is white.
Then the detector: exposure-dependent noise, edge enhancement (unsharp masking, as CR systems
apply), uneven exposure, film grain, and random brightness, contrast and gamma.

A lesion is a soft, mottled region of any size from a small patch to a lobar consolidation with
a straight fissure edge, centred anywhere the lung projects, over the heart and the diaphragm
too. Its truth (``{"x", "y", "r"}``, fractions of the image side) is the centroid of the
density it adds and the radius of a disc of the same area (above half its maximum), so a lesion
cut by the heart or the dome is measured as it is, not as it was drawn.

``synth/archive.py`` writes archives of them.

Geometry is drawn in canonical coordinates (u, v) in [-1, 1], u to the image right (the
patient's left), v downwards, then mapped through a per-image pose.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from ..errors import InputError

# Anatomy is drawn at most at this side and upsampled: it is smooth, so nothing is lost, and
# a 2000 px phantom then costs ~0.2 s instead of ~3 s. Only the noise is full resolution.
WORK_SIDE = 512
MIN_SIDE = 32
# Lesion size: the radius of a disc of the same area, as a fraction of the image side. Log-uniform,
# so small patches (about 1 cm on a child's 25 cm film), segmental and lobar consolidations come
# about equally often.
LESION_RADIUS = (0.06, 0.26)
LOBAR_FROM = 0.1  # lesions at least this large are lobar: one edge cut straight by a fissure
JPEG_QUALITY = 90  # what the archives written from these phantoms use
# Attenuation is in units of "one chest depth of soft tissue" (about 13 cm in a 4-year-old); the
# film maps attenuation D to brightness 1 - exp(-FILM_K * D).
FILM_K = 1.7


@dataclass
class Chest:
    """One drawn chest at work resolution, before the film. Tests use the masks."""

    density: np.ndarray  # summed attenuation without lesion
    lung: np.ndarray  # lung air depth along the beam (0 = no lung), in chest depths
    heart: np.ndarray  # heart's share of the chest depth (0..1)
    below_dome: np.ndarray  # 1 under the diaphragm domes (abdomen), 0 above
    lesion: np.ndarray  # the density a lesion adds (drawn for both classes, added for PNEUMONIA)
    truth: dict  # {"x", "y", "r"} of the lesion, fractions of the side


def phantom(rng: np.random.Generator, size: int = 256, *, opacity: bool) -> tuple[np.ndarray, dict | None]:
    """One chest phantom: uint8 (size, size), and the lesion's {"x", "y", "r"} or None.

    Both classes consume ``rng`` identically (the lesion is always drawn, and only added when
    asked), so with the same generator state the two images differ only where the lesion is:
    no other statistic can tell the classes apart.
    """
    check_size(size)
    chest = draw_chest(rng, min(size, WORK_SIDE))
    density = chest.density + (chest.lesion if opacity else 0.0)
    return film(rng, density, size), (chest.truth if opacity else None)


def check_size(size: int) -> None:
    if not MIN_SIDE <= size:
        raise InputError(f"Invalid size {size}: a phantom needs at least {MIN_SIDE} px to hold its anatomy.")


def draw_chest(rng: np.random.Generator, n: int) -> Chest:
    u, v = _canonical_grid(rng, n)
    body = _body(rng, u, v)
    heart, medi = _heart(rng, u, v), _mediastinum(rng, u, v)
    lung_field, below = _lungs(rng, u, v)
    # Heart and mediastinum take the room lung would have: behind the heart a quarter is left.
    lung = lung_field * (1.0 - 0.75 * heart) * (1.0 - medi) * np.clip(body * 1.2, 0, 1)
    density = body - lung - 0.35 * _trachea(u, v) * body - _bowel_gas(rng, u, v, below) * body
    density = density + lung * (_hila(rng, u, v) + 0.08 * _vessels(rng, u, v))
    density = density + _bones(rng, u, v) * np.clip(body * 2, 0, 1) + _marker(rng, u, v)
    lesion, truth = _lesion(rng, u, v, lung, n)
    return Chest(density.astype(np.float32), lung, heart, below, lesion, truth)


def _canonical_grid(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image pose: each pixel's canonical (u, v) after a random shift, scale and rotation,
    so anatomy (and hence the lesion) is never at a fixed pixel position."""
    shift = rng.uniform(-0.07, 0.07, size=2)
    scale = rng.uniform(0.88, 1.08)
    angle = np.deg2rad(rng.uniform(-5.0, 5.0))
    c = (np.arange(n, dtype=np.float32) + 0.5) / n * 2.0 - 1.0
    x, y = c[None, :] - shift[0], c[:, None] - shift[1]
    cos, sin = np.cos(angle), np.sin(angle)
    u = (cos * x + sin * y) / scale
    v = (-sin * x + cos * y) / scale
    return u.astype(np.float32), v.astype(np.float32)


def _soft(f: np.ndarray, edge: float) -> np.ndarray:
    """Soft inside-mask of the implicit shape f < 1, with a blurred edge of width ~edge."""
    return 1.0 / (1.0 + np.exp(np.clip((f - 1.0) / edge, -30, 30)))


def _step(x: np.ndarray, edge: float) -> np.ndarray:
    """Smooth 0 -> 1 as x goes from negative to positive."""
    return 1.0 / (1.0 + np.exp(np.clip(-x / edge, -30, 30)))


def _pw(x, k):
    """|x| ** k: numpy's float32 pow is ~50x slower on negative bases, so take abs first."""
    return np.abs(x) ** k


def _depth(f: np.ndarray) -> np.ndarray:
    """Beam path through an ellipsoid whose outline is f = 1, relative to its centre: sqrt(1 - f)."""
    return np.sqrt(np.clip(1.0 - f, 0.0, 1.0))


# ---------------------------------------------------------------- soft tissue and air

def _body(rng, u, v):
    """Trunk depth along the beam: neck, sloping shoulders, chest, upper abdomen, plus the arms
    (down beside the chest, or raised as toddlers are often held), and a subcutaneous fat rim."""
    w = rng.uniform(0.84, 0.92)
    shoulder = rng.uniform(-0.95, -0.86)
    width = 0.2 + (w - 0.2) * _step(v - shoulder + 0.25 * _pw(u, 2), 0.05)
    trunk = _depth(_pw(u / width, 2))
    fat = 1.0 - 0.12 * np.exp(-np.clip(width - np.abs(u), 0, None) / 0.05)
    arms_up = rng.random() < 0.5
    au = np.abs(u)
    if arms_up:  # upper arms rise from the shoulders towards the top corners
        arm = _depth(_pw((au - w + 0.02 + 0.35 * (v - shoulder)) / 0.1, 2)) * _step(shoulder + 0.1 - v, 0.05)
    else:  # arms down, a little apart from the chest wall
        arm = _depth(_pw((au - w - 0.12) / 0.09, 2)) * _step(0.4 - v, 0.1)
    return (0.95 * trunk * fat + 0.55 * arm).astype(np.float32)


def _lungs(rng, u, v):
    """Lung air depth of both lungs (chest depths) and the mask under the domes.

    Each lung: a rounded apex, a lateral border along the ribs, a dome-shaped base with the right
    (image-left) dome higher, and a posterior recess that runs on below the dome, thinning out.
    The depth is largest in the middle zones: thin at the apex, at the lateral edge, and towards
    the dome, which is why lower zones are brighter on a real film."""
    total = np.zeros_like(u)
    below = np.zeros_like(u)
    right_dome = rng.uniform(0.28, 0.4)
    for side, dome_apex in ((-1.0, right_dome), (1.0, right_dome + rng.uniform(0.03, 0.09))):
        au = side * u
        apex = rng.uniform(-0.8, -0.7)
        reach = rng.uniform(0.68, 0.76)
        lateral = 0.16 + (reach - 0.16) * np.clip((v - apex) / (dome_apex - apex), 0, 1) ** 0.3
        dome = dome_apex + rng.uniform(1.2, 1.7) * (au - 0.36) ** 2
        inside = _step(lateral - au, 0.02) * _step(au - 0.07, 0.02) * _step(v - apex, 0.03)
        main = _step(dome - v, 0.012)
        recess = (1.0 - main) * np.exp(-np.clip(v - dome, 0, None) / 0.15) * 0.55 * _step(au - 0.2, 0.05)
        depth = (np.sqrt(np.clip((v - apex) / 0.3, 0, 1)) * np.sqrt(np.clip((lateral - au) / 0.15, 0, 1))
                 * (0.45 + 0.55 * np.sqrt(np.clip((dome - v) / 0.35, 0, 1))))
        total += inside * (main * depth + recess) * rng.uniform(0.72, 0.82)
        below = np.maximum(below, (1.0 - main) * _step(au - 0.02, 0.02) * _step(1.0 - au, 0.02))
    return np.clip(total, 0, 1).astype(np.float32), below.astype(np.float32)


def _heart(rng, u, v):
    """The heart's share of the chest depth: a large pediatric heart, two thirds to the image
    right (the patient's left), its base on the diaphragm."""
    hu, hv = rng.uniform(0.06, 0.12), rng.uniform(0.2, 0.28)
    left, right = rng.uniform(0.3, 0.36), rng.uniform(0.42, 0.5)  # half-widths to either side
    hh = rng.uniform(0.26, 0.32)
    tilt = np.deg2rad(rng.uniform(20, 35))  # long axis down towards the apex, at the image right
    x = np.cos(tilt) * (u - hu) + np.sin(tilt) * (v - hv)
    y = -np.sin(tilt) * (u - hu) + np.cos(tilt) * (v - hv)
    return _depth((x / np.where(x < 0, left, right)) ** 2 + (y / hh) ** 2).astype(np.float32)


def _mediastinum(rng, u, v):
    """Great vessels, and in infants the thymus, as a column above the heart that leaves no lung."""
    width = rng.uniform(0.13, 0.2) * (1.0 - 0.25 * _step(v + 0.4, 0.1))
    return (_soft(_pw((u - 0.02) / width, 4), 0.15) * _step(0.2 - v, 0.08)).astype(np.float32)


def _trachea(u, v):
    """Air column down the midline to the carina, then the two main bronchi."""
    column = _soft(_pw(u / 0.028, 4), 0.3) * _step(-0.3 - v, 0.03)
    bronchi = np.exp(-(((v + 0.3 - 0.6 * np.abs(u)) / 0.025) ** 2)) * _step(0.14 - np.abs(u), 0.02) * _step(v + 0.32, 0.02)
    return column + 0.6 * bronchi


def _bowel_gas(rng, u, v, below):
    """The stomach bubble under the left dome and a few loops of bowel gas: dark patches in the
    abdomen that children's films nearly always show."""
    gas = np.zeros_like(u)
    if rng.random() < 0.7:
        gas += 0.25 * _soft(((u - rng.uniform(0.3, 0.45)) / 0.13) ** 2 + ((v - rng.uniform(0.62, 0.72)) / 0.08) ** 2, 0.15)
    for _ in range(4):
        gu, gv = rng.uniform(-0.6, 0.6), rng.uniform(0.72, 1.0)
        gas += 0.15 * _soft(((u - gu) / 0.08) ** 2 + ((v - gv) / 0.06) ** 2, 0.2)
    return gas * below


def _hila(rng, u, v):
    """Pulmonary arteries at the hila: denser tissue medially, at mid height."""
    out = np.zeros_like(u)
    for side in (-1.0, 1.0):
        du, dv = u - side * rng.uniform(0.15, 0.2), v - rng.uniform(-0.08, 0.05)
        out += 0.22 * np.exp(-(du**2 / 0.006 + dv**2 / 0.02))
    return out


def _vessels(rng, u, v):
    """Lung markings: branching vessels fan out from the hila and fade towards the periphery;
    drawn as noise stretched along the rays from each hilum (fine across, coarse along)."""
    out = np.zeros_like(u)
    for side in (-1.0, 1.0):
        du, dv = u - side * 0.16, v + 0.02
        radius = np.sqrt(du**2 + dv**2)
        angle = np.arctan2(dv, side * du)  # mirrored, so both fans look alike
        table = ndimage.gaussian_filter(rng.standard_normal((96, 12)), (0.8, 1.0), mode="wrap")
        ia = (angle + np.pi) / (2 * np.pi) * 96
        ir = np.clip(radius / 0.9, 0, 1) * 11
        streaks = ndimage.map_coordinates(table, [ia.ravel(), ir.ravel()], order=1, mode="wrap").reshape(u.shape)
        out += np.clip(streaks, 0, None) * np.exp(-radius / 0.35)
    return out


# ---------------------------------------------------------------- bone

def _bones(rng, u, v):
    """Clavicles, posterior and anterior ribs, spine, scapulae, humeral heads; a child's bones are
    thin and less mineralised, so they add little density."""
    au = np.abs(u)
    k = rng.uniform(0.06, 0.1)
    clav_v = rng.uniform(-0.78, -0.68)
    clavicle = np.exp(-_pw((v - clav_v + 0.12 * (au - 0.1) - 0.12 * (au - 0.3) ** 2) / 0.035, 4))
    clavicle *= _step(au - 0.05, 0.02) * _step(0.55 - au, 0.03)
    first, spacing = rng.uniform(-0.86, -0.8), rng.uniform(0.115, 0.135)
    post = _rib_bands(v - (-0.1 * au + 0.6 * au**2), first, spacing, 0.16, count=10)
    post = post * _step(au - 0.06, 0.02) * _step(0.86 - au, 0.03)
    ant = _rib_bands(v + 0.45 * au, first + 0.3, spacing * 1.6, 0.18, count=6) * _step(au - 0.3, 0.05) * _step(0.84 - au, 0.03)
    spine = _soft(_pw(u / 0.06, 4), 0.15) * (0.75 + 0.25 * np.cos(2 * np.pi * v / 0.09))
    scapula = _soft(((au - 0.74) / 0.12) ** 2 + ((v + 0.45) / 0.3) ** 2, 0.1)
    humerus = _soft(((au - 0.92) / 0.1) ** 2 + ((v + 0.83) / 0.1) ** 2, 0.1)
    return k * (2.5 * clavicle + post + 0.4 * ant + 0.6 * spine + 0.3 * scapula + 2.0 * humerus)


def _rib_bands(arc, first, spacing, half, *, count):
    """``count`` bright bands along ``arc`` = const, as tubes with brighter cortical edges."""
    phase = (arc - first) / spacing
    frac = phase - np.round(phase)
    band = np.exp(-_pw(frac / half, 4))
    edge = np.exp(-(((np.abs(frac) - half) / (0.25 * half)) ** 2))
    keep = _soft(_pw((phase - (count - 1) / 2) / ((count + 0.6) / 2), 8), 0.1)
    return (0.7 * band + 0.3 * edge) * keep


def _marker(rng, u, v):
    """The lead side marker in an upper corner (bright, sharp-edged), on most films."""
    if rng.random() < 0.3:
        return np.zeros_like(u)
    mu, mv = rng.choice([-1.0, 1.0]) * rng.uniform(0.7, 0.88), rng.uniform(-0.92, -0.8)
    box = _soft(_pw((u - mu) / 0.05, 8) + _pw((v - mv) / 0.06, 8), 0.05)
    hole = _soft(_pw((u - mu - 0.015) / 0.03, 8) + _pw((v - mv + 0.015) / 0.045, 8), 0.05)
    return 1.5 * box * (1.0 - hole)


# ---------------------------------------------------------------- the lesion

def _lesion(rng, u, v, lung, n):
    """The density a consolidation adds, and its truth. Drawn for both classes (same stream).

    Centre: either lung with equal odds, then anywhere its air projects, retrocardiac and
    subdiaphragmatic parts included. Shape: an irregular ellipse, lobar ones cut by a fissure.
    Contrast: fluid replaces air over the lesion's own depth, never more than the lung holds."""
    r = float(np.exp(rng.uniform(*np.log(LESION_RADIUS))))
    where = lung[::4, ::4] > 0.12  # not the thin rim: a lesion there would be mostly cut away
    side = u[::4, ::4] > 0 if rng.random() < 0.5 else u[::4, ::4] <= 0
    cand = np.argwhere(where & side)
    if len(cand) == 0:
        cand = np.argwhere(lung[::4, ::4] == lung[::4, ::4].max())
    iy, ix = cand[rng.integers(len(cand))] * 4
    cu, cv = float(u[iy, ix]), float(v[iy, ix])
    angle, aspect = rng.uniform(0, np.pi), rng.uniform(0.6, 1.0)
    # r is a fraction of the side: twice that in canonical units (the side spans 2), before pose scale
    a = 2 * r / np.sqrt(aspect)
    du, dv = u - cu, v - cv
    x = (np.cos(angle) * du + np.sin(angle) * dv) / a
    y = (-np.sin(angle) * du + np.cos(angle) * dv) / (a * aspect)
    wobble = 1.0 + 0.25 * _smooth_noise(rng, n, coarse=max(4, int(3 / r)), sigma=1.0)
    f = (x**2 + y**2) / np.clip(wobble, 0.5, None) ** 2
    shape = _soft(f, 0.12)
    fissure = rng.uniform(0, 2 * np.pi)
    cut = rng.uniform(0.1, 0.5)
    if r >= LOBAR_FROM:  # a fissure: a straight, sharp edge across one side of the lobe
        shape = shape * _step(cut - (np.cos(fissure) * x + np.sin(fissure) * y), 0.015)
    depth = 2 * a * aspect * _depth(np.clip(f, 0, 1))  # path through the lesion, canonical units
    mottle = 0.75 + 0.35 * _smooth_noise(rng, n, coarse=max(6, int(5 / r)), sigma=1.0)
    mottle *= 1.0 + 0.25 * _smooth_noise(rng, n, coarse=max(8, int(14 / r)), sigma=1.0)
    fill = rng.uniform(0.75, 1.0)
    envelope = shape * np.minimum(lung, 1.5 * depth + 0.1)
    layer = fill * envelope * np.clip(mottle, 0.25, None)
    return layer.astype(np.float32), _truth(envelope, n)


def _truth(envelope, n):
    """Centroid of the added density above half its maximum, and the radius of a disc of that area."""
    m = envelope >= 0.5 * float(envelope.max())
    w = envelope * m
    ys, xs = np.indices(envelope.shape)
    total = float(w.sum())
    cx = float((w * (xs + 0.5)).sum() / total) / n
    cy = float((w * (ys + 0.5)).sum() / total) / n
    r = float(np.sqrt(m.sum() / np.pi)) / n
    return {"x": cx, "y": cy, "r": r}


# ---------------------------------------------------------------- the film

def film(rng, density, size):
    """Attenuation -> uint8 film: detector noise (more where fewer photons got through), unsharp
    masking, uneven exposure, exposure settings, resize to ``size``, then per-pixel grain."""
    n = density.shape[0]
    noise = rng.uniform(0.004, 0.012) * np.exp(0.5 * FILM_K * density)
    density = density + noise * ndimage.gaussian_filter(rng.standard_normal((n, n)).astype(np.float32), 0.7)
    img = 1.0 - np.exp(-FILM_K * np.clip(density, 0, None))
    blur = ndimage.gaussian_filter(img, n / 48)
    img = img + rng.uniform(0.0, 0.6) * (img - blur)
    img = img * (1.0 + 0.06 * _smooth_noise(rng, n, coarse=6, sigma=1.0) + rng.uniform(-0.06, 0.06) * np.linspace(-1, 1, n)[:, None])
    contrast, bright, gamma = rng.uniform(0.85, 1.15), rng.uniform(-0.05, 0.05), rng.uniform(0.8, 1.25)
    img = np.clip((img - 0.5) * contrast + 0.5 + bright, 0, 1) ** gamma
    if n != size:
        img = _resize(img, size)
    # Grain is drawn after the resize so its texture is per pixel at every size.
    img = img + rng.uniform(0.01, 0.025) * rng.standard_normal((size, size), dtype=np.float32)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _smooth_noise(rng, n, *, coarse, sigma):
    """Unit-variance smooth noise at side n, drawn on a coarse x coarse grid and upsampled
    (much cheaper than blurring full-size white noise with a wide kernel)."""
    coarse = int(np.clip(coarse, 4, n))
    g = ndimage.gaussian_filter(rng.standard_normal((coarse, coarse)), sigma, mode="wrap")
    g = (g - g.mean()) / (g.std() + 1e-8)
    return _resize(g.astype(np.float32), n)


def _resize(a: np.ndarray, n: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a.astype(np.float32)).resize((n, n), Image.BICUBIC))


# ---------------------------------------------------------------- the archive
