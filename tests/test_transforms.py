"""Pixels -> model input: the square uint8 resize and the normalisation both jobs share."""

import numpy as np

from cxr_batch.pixels.transforms import normalize, to_model_pixels


def test_model_pixels_and_normalize():
    gray = np.linspace(0, 1, 300 * 200, dtype=np.float32).reshape(300, 200)
    px = to_model_pixels(gray, 64)
    assert px.shape == (64, 64) and px.dtype == np.uint8 and px[0, 0] < 5 and px[-1, -1] > 250
    import torch

    x = normalize(torch.from_numpy(np.stack([px, px])), channels_last=True)
    assert x.shape == (2, 3, 64, 64) and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x[:, 0], x[:, 2])
