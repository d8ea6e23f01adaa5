"""The CAM's point traced back to the input: where the pixels are that make the hot spot hot.

A cell of the map is centred where ``receptive`` says, but it votes with everything in its
receptive field (most of a lung for the deeper maps), and a network
learns to vote from the context it sees around a lesion: the cells over the lung next to a lesion
on the diaphragm or under the clavicle vote for it more than the cells centred on it, whose field
reaches over the bright abdomen or the shoulder. So the map's hot spot sits a little towards the
middle of the lung (upper lesions found low, lower ones high), whatever the augmentation or loss:
the pull is in what the cells see, not in how they were trained.

The gradient of the hot spot's summed evidence with respect to the input pixels says which pixels
make those cells hot. That is the lesion, wherever the cells voting for it are centred: the
centroid of the gradient's magnitude (smoothed at half a cell, so single-pixel noise does not
move it), over the connected region around its maximum that reaches ``EVIDENCE_LEVEL`` of it, is
``cam_peak_x/y`` with ``--cam-point evidence``. It reads past most of the map's pull. It costs one
backward pass through the trunk per batch (several times the forward on a CPU), so it is
``evaluate``'s default and an option of ``score``.
"""

from __future__ import annotations

import numpy as np

from .. import POSITIVE
from .cam import CamGrid, hot_spot_weights, log_odds_map, weighted_centre

CAM_POINTS = ("map", "evidence")
EVIDENCE_LEVEL = 0.5  # a pixel is in the evidence spot at or above this share of its maximum


def evidence_forward(model, x, fc_weight, fc_bias, grid: CamGrid, *, autocast_device: str | None = None):
    """One forward pass with gradients and one backward from the hot spots. ``model`` returns
    (logits, features) for the normalised batch ``x`` (B, 3, S, S); ``fc_weight``/``fc_bias`` its head.
    -> (logits, features, points): the first two detached, as an inference pass gives them;
    points (B, 2) as fractions (x, y) of the image, NaN for a map with no hot spot (no cell > 0).
    ``autocast_device``: run under bf16 autocast on that device type (the scoring actor's setting)."""
    import torch

    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad(), torch.autocast(autocast_device or "cpu", dtype=torch.bfloat16,
                                             enabled=autocast_device is not None):
        logits, features = model(x)
        maps = log_odds_map(features.float(), fc_weight, fc_bias, POSITIVE)
        weights = [hot_spot_weights(m) for m in maps.detach().cpu().numpy()]
        points = np.full((len(weights), 2), np.nan, np.float32)
        rows = [k for k, w in enumerate(weights) if w is not None]
        if rows:
            mask = np.zeros(maps.shape, np.float32)
            for k in rows:
                mask[k] = weights[k]
            # Images are independent in an eval-mode network, so one backward serves the batch.
            (maps * torch.from_numpy(mask).to(maps.device)).sum().backward()
    if rows:
        # The three input channels are one grey image repeated: their gradients add.
        grad = x.grad.float().sum(1).abs().cpu().numpy()
        for k in rows:
            points[k] = evidence_point(grad[k], sigma=grid.stride / 2)
    return logits.detach(), features.detach(), points


def evidence_point(attribution: np.ndarray, *, sigma: float) -> tuple[float, float]:
    """(S, S) non-negative attribution -> (x, y) fractions of the image: smoothed by a Gaussian of
    ``sigma`` px, the weighted centroid of the connected region around its maximum that reaches
    ``EVIDENCE_LEVEL`` of it (each pixel weighted by how far above that level it is), pixel centres
    at (i + 0.5) / S as everywhere else in the CAM geometry. NaN, NaN where the attribution is zero
    everywhere (the scores table then takes the map's hot spot)."""
    from scipy import ndimage

    a = np.asarray(attribution, np.float64)
    weight = hot_spot_weights(ndimage.gaussian_filter(a, sigma) if sigma > 0 else a, EVIDENCE_LEVEL)
    if weight is None:  # no gradient at all (a dead network): no point; the table falls back to the map's
        return float("nan"), float("nan")
    x, y = weighted_centre(weight)
    return (x + 0.5) / a.shape[1], (y + 0.5) / a.shape[0]
