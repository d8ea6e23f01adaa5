"""Does the CAM show what the model uses? Deletion curves (Petsiuk et al., RISE, BMVC 2018).

Grey out an image's regions step by step, in the order the CAM ranks them (most PNEUMONIA-like
first), and follow P(PNEUMONIA) after each step; do the same in a random order. A CAM that points
at the evidence the model uses makes its curve fall sooner: a smaller area under it than under
the random curve. The gap (random minus CAM) is the number to watch; near 0 means the map is no
better than chance at saying what matters.

- Regions: the model input cut into the CAM's own grid (h x w blocks: 14 x 14 at 224 px with
  stride 16), each ranked by the mean of the CAM upsampled as the overlay shows it (cam.upsample).
- Fill: each image's own mean grey level, so that deleting leaves the overall brightness alone (a
  black or white patch would be a new, strong feature of its own: white reads as opacity).
- Steps: 0, 1/K, ..., K/K of the blocks; the area is the trapezoid over the deleted share [0, 1].
  Both curves end at the same all-grey image.
- P(PNEUMONIA): whatever ``score`` the caller passes; evaluate passes the scoring job's own
  ``Scorer`` (jobs/deletion.py: the same precision and temperature), so step 0 is the table's value.
- Which images: a seeded sample of at most N labelled PNEUMONIA images that were scored; one
  random order per image. Cost: (2K + 1) forward passes per image.

Pure numpy/scipy: the model comes in as a function; the Ray task that runs it is jobs/deletion.py.
"""

from __future__ import annotations

import numpy as np
from scipy.integrate import trapezoid

from .. import CLASSES, POSITIVE
from ..model.cam import CamGrid, upsample
from .metrics import resamples


def block_edges(size: int, n: int) -> np.ndarray:
    return np.round(np.linspace(0, size, n + 1)).astype(int)


def block_scores(cam: np.ndarray, size: int, cells: CamGrid) -> np.ndarray:
    """(h, w) CAM -> (h, w) mean of its map, upsampled as the overlay shows it (cells placed by
    ``cells``), over each block of a size x size image."""
    h, w = cam.shape
    up = upsample(cam, (size, size), cells)
    ey, ex = block_edges(size, h), block_edges(size, w)
    return np.array([[up[ey[i]:ey[i + 1], ex[j]:ex[j + 1]].mean() for j in range(w)] for i in range(h)])


def deletion_stack(pixels: np.ndarray, order: np.ndarray, grid: tuple[int, int], steps: int) -> np.ndarray:
    """uint8 (S, S) -> (steps, S, S): after step k (1..steps) the first round(k/steps) of ``order``
    (flat block indices) are filled with the image's mean grey level."""
    size = pixels.shape[0]
    ey, ex = block_edges(size, grid[0]), block_edges(size, grid[1])
    fill = np.uint8(round(float(pixels.mean())))
    out = np.repeat(pixels[None], steps, axis=0)
    counts = np.round(np.arange(1, steps + 1) / steps * len(order)).astype(int)
    for k, upto in enumerate(counts):
        for b in order[:upto]:
            i, j = divmod(int(b), grid[1])
            out[k, ey[i]:ey[i + 1], ex[j]:ex[j + 1]] = fill
    return out


def deletion_curves(score, pixels: np.ndarray, *, cells: CamGrid, steps: int, seed: int = 0, batch_size: int = 16) -> dict:
    """``score(uint8 (m, S, S)) -> (P(PNEUMONIA) (m,), CAMs (m, h, w))`` the model, its CAM cells placed
    by ``cells``; ``pixels`` (n, S, S).
    -> per-image curves (n, steps + 1) for the CAM order and a random order, and their areas."""
    p0, cams = _in_batches(score, pixels, batch_size)
    grid = cams.shape[1:]
    rng = np.random.default_rng(seed)
    stacks = []
    for img, cam in zip(pixels, cams):
        by_cam = np.argsort(-block_scores(cam, img.shape[0], cells).ravel(), kind="stable")
        stacks += [deletion_stack(img, by_cam, grid, steps), deletion_stack(img, rng.permutation(by_cam.size), grid, steps)]
    probs, _ = _in_batches(score, np.concatenate(stacks), batch_size)
    probs = probs.reshape(len(pixels), 2, steps)
    cam_curve = np.column_stack([p0, probs[:, 0]])
    random_curve = np.column_stack([p0, probs[:, 1]])
    x = np.linspace(0, 1, steps + 1)
    return {"fraction": x, "cam": cam_curve, "random": random_curve, "grid": grid,
            "auc_cam": trapezoid(cam_curve, x, axis=1), "auc_random": trapezoid(random_curve, x, axis=1)}


def _in_batches(score, pixels, batch_size):
    probs, cams = [], []
    for i in range(0, len(pixels), batch_size):
        p, c = score(pixels[i:i + batch_size])
        probs.append(np.asarray(p, np.float64))
        cams.append(np.asarray(c, np.float32))
    return np.concatenate(probs), np.concatenate(cams)


def summarize(curves: dict, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean curves, both areas, and the gap (random - CAM) with a bootstrap 95% CI over images."""
    gap = curves["auc_random"] - curves["auc_cam"]
    boots = np.concatenate([gap[idx].mean(1) for idx in resamples(gap.size, n_boot, seed)])
    return {"n_images": int(gap.size), "steps": len(curves["fraction"]) - 1, "grid": list(curves["grid"]),
            "fraction_deleted": curves["fraction"].tolist(),
            "cam_curve": curves["cam"].mean(0).tolist(), "random_curve": curves["random"].mean(0).tolist(),
            "auc_cam": float(curves["auc_cam"].mean()), "auc_random": float(curves["auc_random"].mean()),
            "auc_difference": float(gap.mean()), "auc_difference_ci95": [float(v) for v in np.percentile(boots, [2.5, 97.5])],
            "share_of_images_cam_faster": float((gap > 0).mean()),
            "regions": "the CAM grid's blocks, ranked by the mean upsampled CAM", "fill": "each image's mean grey level",
            "order_random": "one seeded random block order per image"}


def sample_positives(rows: list, n: int, seed: int) -> list:
    """Paths of at most ``n`` scored PNEUMONIA images, a seeded sample (sorted, for a stable record)."""
    paths = sorted(r["path"] for r in rows if r["label"] == CLASSES[POSITIVE] and r["error"] is None)
    if len(paths) <= n:
        return paths
    return sorted(np.random.default_rng(seed).choice(paths, size=n, replace=False).tolist())
