import numpy as np
import torch
from PIL import Image

from cxr_batch.model.cam import class_activation_maps, encode_png, overlay, peak, upsample
from cxr_batch.model.network import build_model


def test_cam_matches_a_hand_computation():
    f = np.zeros((1, 2, 2, 2), np.float32)
    f[0, 0] = [[1, 0], [0, 2]]
    f[0, 1] = [[0, 3], [1, 0]]
    w = np.array([[9.0, 9.0], [2.0, -1.0]], np.float32)
    # class 1: 2*f0 - 1*f1
    assert np.allclose(class_activation_maps(f, w, 1)[0], [[2, -3], [-1, 4]])
    # the same function on torch tensors gives the same numbers (the scoring actor uses torch)
    assert np.allclose(class_activation_maps(torch.from_numpy(f), torch.from_numpy(w), 1).numpy()[0], [[2, -3], [-1, 4]])


def test_cam_averages_to_logit_minus_bias():
    model = build_model("resnet18", "none").eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        logits, feats = model(x)
        cams = class_activation_maps(feats, model.fc.weight, 1)
    assert torch.allclose(cams.mean(dim=(1, 2)), logits[:, 1] - model.fc.bias[1], atol=1e-4)


def test_peak_is_the_centre_of_the_hottest_cell_with_subcell_refinement():
    cam = np.zeros((7, 7), np.float32)
    cam[2, 5] = 1.0
    assert np.allclose(peak(cam), ((5 + 0.5) / 7, (2 + 0.5) / 7))
    cam[2, 6] = 0.5  # a warm neighbour on the right pulls the peak right, within the cell
    x, y = peak(cam)
    assert (5 + 0.5) / 7 < x < 6 / 7 and np.isclose(y, 2.5 / 7)


def test_overlay_png_is_a_colour_image_hot_where_the_cam_is():
    gray = np.full((64, 64), 100, np.uint8)
    cam = np.zeros((4, 4), np.float32)
    cam[0, 3] = 1.0
    rgb = overlay(gray, cam)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    hot, cold = rgb[:16, 48:].astype(int), rgb[48:, :16].astype(int)
    assert hot[..., 0].mean() > cold[..., 0].mean() + 40  # jet: red where hot
    im = Image.open(__import__("io").BytesIO(encode_png(rgb)))
    assert im.size == (64, 64) and im.mode == "RGB"
    assert upsample(cam, (64, 32)).shape == (32, 64)
