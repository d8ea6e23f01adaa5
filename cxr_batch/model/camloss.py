"""Flip consistency of the CAM while training: the map of a mirrored image must be the mirrored map.

Global average pooling makes the classification loss blind to WHERE in the map the evidence sits,
so a network is free to learn its evidence a cell or so off the lesion, in its own frame: every
peak then lands the same distance below the lesion, whatever the image. Mirroring the image
reverses such a shift while a map that sits on the lesion mirrors with it, so requiring
CAM(flip x) = flip CAM(x) forbids the shift and nothing else.

The mirror is taken about the CAM grid's own axis of symmetry (``receptive``): an exact pixel
mirror of a 224 px image would move a stride-16 grid's cell centres 16 j to 223 - 16 j, between
cells, and the loss would then pull the map 7.5 px the wrong way.
"""

from __future__ import annotations

import torch

from .. import POSITIVE
from .cam import CamGrid, log_odds_map


def grid_flip(images: torch.Tensor, dim: int, grid: CamGrid, cells: int) -> torch.Tensor:
    """Mirror ``images`` (..., H, W) along ``dim`` (-1 across, -2 up-down) about the axis on which cell
    j and cell ``cells - 1 - j`` are mirror images; the few pixels mirrored from outside the image
    repeat its edge."""
    n = images.shape[dim]
    twice_axis = int(round(2 * grid.offset + grid.stride * (cells - 1)))
    index = torch.clamp(twice_axis - torch.arange(n, device=images.device), 0, n - 1)
    return images.index_select(dim, index)


def flip_consistency(maps: torch.Tensor, maps_of_flipped: torch.Tensor, dim: int) -> torch.Tensor:
    """Smooth-L1 distance (in the maps' logit units) between maps (B, h, w) and the flipped-back maps
    of the grid-flipped images. Both sides get gradients: neither is the reference."""
    return torch.nn.functional.smooth_l1_loss(maps, maps_of_flipped.flip(dim))


def quiet_normal(maps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """No cell of a NORMAL image's log-odds map (B, h, w) may vote PNEUMONIA: the mean over the
    batch's images and cells of max(cell, 0), counted for NORMAL images only (PNEUMONIA images count
    as zero, since where their lesion is is not known). A hinge, not a per-cell cross-entropy: a
    cell that already votes NORMAL costs nothing, so NORMAL logits are not pushed further down than
    the classification loss takes them (a softplus does that, and calibrates worse).

    Why: global average pooling lets a map carry any pattern that is the same for both classes,
    since the bias absorbs its mean. Networks trained from scratch can put such a pattern in the
    top corners, and on a PNEUMONIA image with a faint lesion the corner then outshines the
    lesion: the peak lands a whole image away. A NORMAL image has no pneumonia anywhere, so no
    cell of its map may vote for it, which forbids that pattern and leaves the lesions' evidence
    alone."""
    normal = (labels != POSITIVE).to(maps.dtype).view(-1, 1, 1)
    return (torch.relu(maps) * normal).mean()


def plain_loss(net, fc, images, labels, loss_fn, *, quiet: float = 0.0):
    """Classification loss on ``images``, plus ``quiet`` x ``quiet_normal`` of their log-odds maps (made only
    when ``quiet`` > 0). -> (total loss, classification loss, logits), as ``paired_loss``."""
    logits, features = net(images)
    cls = loss_fn(logits.float(), labels)
    if quiet <= 0:
        return cls, cls, logits
    return cls + quiet * quiet_normal(_log_odds(features, fc), labels), cls, logits


def paired_loss(net, fc, images, labels, loss_fn, *, weight: float, grid: CamGrid, step: int, quiet: float = 0.0):
    """Classification loss on ``images`` and their grid-flipped twins (left-right on even steps,
    upside down on odd ones) plus ``weight`` x the flip consistency of their log-odds maps, plus ``quiet``
    x ``quiet_normal`` of both twins' maps.
    -> (total loss, classification loss, logits of ``images``). ``net`` returns (logits, features);
    ``fc`` is its linear head (read for the maps, as scoring does)."""
    dim = -1 if step % 2 == 0 else -2
    cells = _cells(images.shape[-1], grid)
    both = torch.cat([images, grid_flip(images, dim, grid, cells)])
    logits, features = net(both)
    cls = loss_fn(logits.float(), torch.cat([labels, labels]))
    maps = _log_odds(features, fc)
    if maps.shape[-1] != cells or maps.shape[-2] != cells:
        raise ValueError(f"the trunk gave a {tuple(maps.shape[-2:])} map, not {cells} x {cells}: grid {grid} is wrong")
    n = len(images)
    consistency = flip_consistency(maps[:n], maps[n:], dim)
    loss = cls + weight * consistency
    if quiet > 0:
        loss = loss + quiet * quiet_normal(maps, torch.cat([labels, labels]))
    return loss, cls, logits[:n]


def _log_odds(features: torch.Tensor, fc) -> torch.Tensor:
    """The PNEUMONIA log-odds maps of ``features`` under the linear head ``fc``, as scoring makes them."""
    return log_odds_map(features.float(), fc.weight, fc.bias, POSITIVE)


def _cells(size: int, grid: CamGrid) -> int:
    """How many cells a ResNet trunk gives along a side of ``size`` pixels: one per sampled centre."""
    return int((size - 1 - grid.offset) // grid.stride) + 1
