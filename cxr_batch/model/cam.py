"""Class Activation Maps (Zhou et al., CVPR 2016) and their overlay PNGs. Pure numpy.

CAM_k(i, j) = sum_c W[k, c] * F[c, i, j]: the fc weights of class k applied to the last conv
feature maps F. With two classes the map that explains P(PNEUMONIA) is the difference of the two
classes' maps plus the difference of their biases (``log_odds_map``): its mean over the cells is
exactly the image's logit, log P / (1 - P), and each cell is the logit the image would get if it
all looked like that cell. That unit is what the absolute scale shows.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image


def class_activation_maps(features, fc_weight, cls: int):
    """features (B, C, h, w), fc_weight (K, C) -> (B, h, w) maps of class ``cls``.

    Written with operators numpy arrays and torch tensors share, so the scoring actor runs it on
    the device where the features already are, and tests run it on small numpy arrays.
    """
    if features.ndim != 4 or fc_weight.ndim != 2 or features.shape[1] != fc_weight.shape[1]:
        raise ValueError(f"features {tuple(features.shape)} and fc weight {tuple(fc_weight.shape)} do not match")
    return (features * fc_weight[cls].reshape(1, -1, 1, 1)).sum(1)


def log_odds_map(features, fc_weight, fc_bias, positive: int):
    """features (B, C, h, w), fc (2, C) and (2,) -> (B, h, w) maps in logit units of class
    ``positive``; the mean of each map is that image's logit. numpy or torch alike."""
    if fc_weight.shape[0] != 2:
        raise ValueError(f"a log-odds map needs a 2-class head, got {fc_weight.shape[0]} classes")
    other = 1 - positive
    diff = fc_weight[positive:positive + 1] - fc_weight[other:other + 1]
    return class_activation_maps(features, diff, 0) + (fc_bias[positive] - fc_bias[other])


@dataclass(frozen=True)
class CamGrid:
    """Where a map's cells sit in the model's input (a square of ``input_size`` pixels).

    Cell j (on either axis) is centred on input pixel ``offset + stride * j``, in pixel indices:
    the centre of its receptive field, which ``receptive.cam_grid`` walks out of the network's
    own layers. For torchvision's ResNets that is pixel ``stride * j`` (offset 0), not the middle
    of the j-th stride-wide tile, ``stride * (j + 0.5)``: every stride-2 layer samples at its
    window's centre, and a 3x3 window with padding 1 is centred on its even input pixel. Taking
    the tile middle puts every peak half a cell too far right and down (8 px of 224 at stride 16).
    """

    stride: int
    offset: float
    input_size: int

    def to_fraction(self, index):
        """Cell index (fractional allowed) -> position as a fraction of the image side."""
        return (self.offset + self.stride * np.asarray(index, np.float64) + 0.5) / self.input_size

    def centres(self, n: int) -> np.ndarray:
        return self.to_fraction(np.arange(n))


def peak(cam: np.ndarray, grid: CamGrid) -> tuple[float, float]:
    """Where the map is largest, as fractions (x of width, y of height) of the image.

    The argmax cell is refined to sub-cell precision by a parabola through it and its two
    neighbours on each axis (one cell is 7% of the image at 14x14: too coarse to say which rib a
    lesion is under), then placed where ``grid`` says that (fractional) cell is centred.
    """
    h, w = cam.shape
    i, j = np.unravel_index(int(np.argmax(cam)), cam.shape)
    dy = _parabola_offset(cam[i - 1, j] if i > 0 else None, cam[i, j], cam[i + 1, j] if i + 1 < h else None)
    dx = _parabola_offset(cam[i, j - 1] if j > 0 else None, cam[i, j], cam[i, j + 1] if j + 1 < w else None)
    return float(grid.to_fraction(j + dx)), float(grid.to_fraction(i + dy))


HOT_SPOT_LEVEL = 0.5  # a cell is in the hot spot at or above this share of the map's maximum


def hot_spot(cam: np.ndarray, grid: CamGrid) -> tuple[float, float]:
    """The centre of the map's hot spot, as fractions (x, y) of the image: the centroid of the
    connected cells around the maximum that reach ``HOT_SPOT_LEVEL`` of it, each weighted by how
    far above that level it is. This is ``cam_peak_x/y`` in the scores table (``--cam-point map``).

    Why not the maximum alone (``peak``): a 224 px map is a blob a few cells wide over the lesion,
    and its single hottest cell sits on whichever edge the network found most telling, not on
    the middle; the blob's centre lands on the lesion more often than its maximum does. A map
    whose maximum is not above 0 (no cell votes
    PNEUMONIA) has no hot spot: its maximum is given, as ``peak`` places it.
    """
    weight = hot_spot_weights(cam)
    if weight is None:
        return peak(cam, grid)
    x, y = weighted_centre(weight)
    return float(grid.to_fraction(x)), float(grid.to_fraction(y))


def hot_spot_weights(cam: np.ndarray, share: float = HOT_SPOT_LEVEL) -> np.ndarray | None:
    """(h, w) float64: each cell's weight in the hot spot (how far above ``share`` of the maximum it
    is; 0 outside the connected spot around the maximum), or None when no cell is above 0. Also the
    evidence point's spot in the input (model/evidence.py), pixels for cells."""
    from scipy import ndimage

    cam = np.asarray(cam, np.float64)
    i, j = np.unravel_index(int(np.argmax(cam)), cam.shape)
    top = float(cam[i, j])
    if not top > 0:
        return None
    level = share * top
    regions, _ = ndimage.label(cam >= level)  # 4-connected: a diagonal touch does not join two spots
    return np.where(regions == regions[i, j], cam - level, 0.0)


def weighted_centre(weight: np.ndarray) -> tuple[float, float]:
    """(column, row) of the weighted centroid of a non-negative (h, w) array, in index units."""
    rows, cols = np.indices(weight.shape)
    total = weight.sum()
    return float((weight * cols).sum() / total), float((weight * rows).sum() / total)


def _parabola_offset(left, centre, right) -> float:
    if left is None or right is None:
        return 0.0
    denom = left - 2 * centre + right
    if denom >= 0:  # flat or not a maximum: no refinement
        return 0.0
    return float(np.clip(0.5 * (left - right) / denom, -0.5, 0.5))


@lru_cache(maxsize=64)
def _interp_matrix(n_cells: int, n_pixels: int, grid: CamGrid) -> np.ndarray:
    """(n_pixels, n_cells) linear interpolation from cell centres to pixel centres; beyond the
    first and last centre the edge cell's value holds (no extrapolated heat at the borders)."""
    pixels = (np.arange(n_pixels) + 0.5) / n_pixels
    eye = np.eye(n_cells)
    return np.stack([np.interp(pixels, grid.centres(n_cells), eye[k]) for k in range(n_cells)], 1).astype(np.float32)


def upsample(cam: np.ndarray, size: tuple[int, int], grid: CamGrid) -> np.ndarray:
    """(h, w) -> (H, W) bilinear between the cells' receptive-field centres. size is (W, H) like PIL.
    Same geometry as ``peak`` and ``hot_spot``, so the overlay's hottest pixel is where ``peak``
    says and its hot spot is centred where ``hot_spot`` says."""
    h, w = cam.shape
    width, height = size
    return _interp_matrix(h, height, grid) @ cam.astype(np.float32) @ _interp_matrix(w, width, grid).T


SCALES = ("absolute", "relative")
# The absolute scale, in the log-odds map's units (logits): cold at and below 0, a cell that alone
# would make the image a coin toss; full heat at ABSOLUTE_RANGE[1]. The same for every image and
# every model, so a confident NORMAL (every cell well below 0) stays cold.
ABSOLUTE_RANGE = (0.0, 8.0)


def to_heat(cam: np.ndarray, scale: str) -> np.ndarray:
    """A map -> heat in [0, 1]. relative: min-max per image, shows where the model looked however
    weakly; absolute: through ``ABSOLUTE_RANGE``, shows how strongly as well as where."""
    if scale == "relative":
        return normalize(cam)
    if scale == "absolute":
        lo, hi = ABSOLUTE_RANGE
        return np.clip((cam - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    raise ValueError(f"Invalid CAM scale {scale!r}. Only {', '.join(SCALES)} are supported.")


def normalize(cam: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] per image."""
    lo, hi = float(cam.min()), float(cam.max())
    if hi - lo < 1e-12:
        return np.zeros_like(cam, dtype=np.float32)
    return ((cam - lo) / (hi - lo)).astype(np.float32)


@lru_cache(maxsize=4)
def _lut(cmap: str) -> np.ndarray:
    import matplotlib

    return (matplotlib.colormaps[cmap](np.linspace(0, 1, 256))[:, :3] * 255 + 0.5).astype(np.uint8)


@lru_cache(maxsize=4)
def _blend(cmap: str, alpha: float) -> np.ndarray:
    """(256 heat levels, 256 grey levels, 3) uint8: every blend ``overlay`` can produce, made once.
    One table lookup per pixel instead of a dozen float passes over the image."""
    heat = np.arange(256, dtype=np.float32)[:, None, None] / 255
    colour = _lut(cmap).astype(np.float32)[:, None, :]
    base = np.arange(256, dtype=np.float32)[None, :, None]
    # Weight the colour by the heat too, so cold regions show the X-ray nearly untouched.
    a = alpha * (0.35 + 0.65 * heat)
    return (base * (1 - a) + colour * a + 0.5).astype(np.uint8)


def overlay(gray_u8: np.ndarray, cam: np.ndarray, grid: CamGrid, *, scale: str = "relative",
            alpha: float = 0.45, cmap: str = "jet") -> np.ndarray:
    """Blend the colour-mapped CAM (upsampled to the image) over the X-ray -> uint8 (H, W, 3).
    ``scale``: "relative" (per-image min-max) or "absolute" (``ABSOLUTE_RANGE``, see ``to_heat``)."""
    h, w = gray_u8.shape
    heat = to_heat(upsample(cam, (w, h), grid), scale)
    return _blend(cmap, float(alpha))[(heat * 255 + 0.5).astype(np.uint8), gray_u8]


def overlay_batch(gray_u8, cams, grid: CamGrid, *, scale: str = "relative", alpha: float = 0.45, cmap: str = "jet"):
    """``overlay`` for a batch of torch tensors on the model's device (a GPU: the CPUs then only encode
    the PNGs): gray (B, H, W) uint8, cams (B, h, w) -> (B, H, W, 3) uint8. The same interpolation
    matrices and blend table as ``overlay``, so the pictures agree to a level or so of float rounding."""
    import torch

    device = gray_u8.device
    (_, height, width), (_, h, w) = gray_u8.shape, cams.shape
    rows = torch.from_numpy(_interp_matrix(h, height, grid)).to(device)
    cols = torch.from_numpy(_interp_matrix(w, width, grid)).to(device)
    up = rows @ cams.float() @ cols.T  # (B, H, W)
    if scale == "relative":
        lo, hi = up.amin(dim=(1, 2), keepdim=True), up.amax(dim=(1, 2), keepdim=True)
        heat = torch.where(hi - lo < 1e-12, torch.zeros_like(up), (up - lo) / (hi - lo).clamp_min(1e-12))
    elif scale == "absolute":
        lo, hi = ABSOLUTE_RANGE
        heat = ((up - lo) / (hi - lo)).clamp(0.0, 1.0)
    else:
        raise ValueError(f"Invalid CAM scale {scale!r}. Only {', '.join(SCALES)} are supported.")
    table = torch.from_numpy(_blend(cmap, float(alpha))).to(device)  # (256 heat, 256 grey, 3)
    return table[(heat * 255 + 0.5).long(), gray_u8.long()]


def encode_png(rgb: np.ndarray, *, compress_level: int = 1) -> bytes:
    """Level 1: ~3x faster than Pillow's default 6 for ~10% more bytes on these images."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()
