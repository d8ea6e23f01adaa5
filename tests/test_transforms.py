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


def test_an_overlay_keeps_the_image_s_aspect_ratio_with_its_long_side_as_asked():
    from cxr_batch.pixels.transforms import aspect_size, to_aspect

    assert aspect_size(3000, 300, 224) == (224, 22)  # a wide strip is not squashed into a square
    assert aspect_size(300, 3000, 224) == (22, 224)
    square = np.zeros((224, 224, 3), np.uint8)  # an overlay drawn on the model's square input
    assert to_aspect(square, 3000, 300).shape == (22, 224, 3)
    assert to_aspect(square[..., 0], 1000, 2000, 500).shape == (500, 250)
