"""Pixels -> model input, shared by training and scoring so both see exactly the same thing.

Two steps with a uint8 hand-off between them, because uint8 is what travels between Ray stages
(4x smaller than float32) and what a JPEG held anyway:
  ``to_model_pixels(gray, size)``: float [0, 1] (H, W) -> uint8 (size, size), the whole image
      resized to a square. No crop and no letterbox: a CAM peak at fraction (x, y) of the
      square is then at the same fraction of the original image, whatever its aspect.
  ``normalize(batch)``: uint8 (B, S, S) tensor -> float (B, 3, S, S) with ImageNet's statistics,
      gray copied to 3 channels so ImageNet-pretrained first layers apply unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .gray import to_u8

if TYPE_CHECKING:
    import torch

# torch is imported inside normalize(): the decode and finish stages of scoring use only the
# numpy half of this module, and a Ray worker that never imports torch starts sooner and holds
# hundreds of MB less (one such worker per CPU).

# ImageNet's per-channel mean/std, averaged: the image is gray, so one value serves all three.
GRAY_MEAN = 0.449
GRAY_STD = 0.226


def to_model_pixels(gray: np.ndarray, size: int) -> np.ndarray:
    u8 = to_u8(gray)
    if u8.shape == (size, size):
        return u8
    im = Image.fromarray(u8)
    # PIL's BILINEAR resize widens its kernel when shrinking, so this is antialiased.
    return np.asarray(im.resize((size, size), Image.BILINEAR))


def normalize(pixels: torch.Tensor, *, channels_last: bool = False) -> torch.Tensor:
    """uint8 or [0, 1] float (B, S, S) -> normalized float32 (B, 3, S, S)."""
    import torch

    x = pixels.float()
    if pixels.dtype == torch.uint8:
        x = x * (1.0 / 255.0)
    x = ((x - GRAY_MEAN) / GRAY_STD).unsqueeze(1).expand(-1, 3, -1, -1)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=memory_format)
