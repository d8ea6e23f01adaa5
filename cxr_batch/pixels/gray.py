"""Gray-level helpers that the decoders and the model input share (numpy only).

The pixel contract of the decode boundary: float32 (H, W) in [0, 1], 0 = black as a radiologist
sees it. ``window_minmax`` maps data of unknown bit depth onto it; ``to_u8`` is the 8-bit form
that travels between Ray stages and under the CAM overlays.
"""

from __future__ import annotations

import numpy as np

from ..errors import DecodeError


def window_minmax(a: np.ndarray) -> np.ndarray:
    """Linear map of the data's own range onto [0, 1]: no clipping of 12/16-bit data."""
    a = a.astype(np.float32, copy=False)
    lo, hi = float(np.min(a)), float(np.max(a))
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise DecodeError("image holds NaN or infinite pixel values")
    if hi <= lo:
        return np.zeros_like(a)
    return (a - lo) * np.float32(1.0 / (hi - lo))


def to_u8(gray: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8, rounded."""
    return np.clip(gray * 255.0 + 0.5, 0, 255).astype(np.uint8)
