import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cxr_batch.model.cam import (ABSOLUTE_RANGE, CamGrid, _blend, class_activation_maps, encode_png, hot_spot,
                                 log_odds_map, overlay, peak, upsample)
from cxr_batch.model.network import build_model
from cxr_batch.model.receptive import cam_grid
from trunks import bright_pixel_map, point_spread_trunk


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


def test_log_odds_map_averages_to_the_image_logit():
    """Each cell is in logit units: the map's mean is exactly log P / (1 - P) of the image."""
    model = build_model("resnet18", "none", seed=2).eval()
    nn.init.normal_(model.fc.weight, std=0.1)
    nn.init.normal_(model.fc.bias, std=1.0)
    x = torch.randn(2, 3, 96, 96, dtype=torch.float64)
    with torch.no_grad():
        logits, feats = model.double()(x)
        maps = log_odds_map(feats, model.fc.weight, model.fc.bias, 1)
    p = torch.softmax(logits, 1)[:, 1]
    assert torch.allclose(maps.mean(dim=(1, 2)), torch.log(p / (1 - p)), atol=1e-6)
    assert maps.std() > 0.1  # a map, not a constant


def test_peak_is_the_hottest_cell_centre_with_subcell_refinement():
    grid = CamGrid(stride=32, offset=0.0, input_size=224)
    cam = np.zeros((7, 7), np.float32)
    cam[2, 5] = 1.0
    assert np.allclose(peak(cam, grid), ((5 * 32 + 0.5) / 224, (2 * 32 + 0.5) / 224))
    cam[2, 6] = 0.5  # a warm neighbour on the right pulls the peak right, less than half a cell
    x, y = peak(cam, grid)
    assert (5 * 32 + 0.5) / 224 < x < (5.5 * 32 + 0.5) / 224 and np.isclose(y, (2 * 32 + 0.5) / 224)


def test_hot_spot_is_the_centre_of_the_blob_around_the_maximum():
    """The table's point: the centre of the connected cells at or above half the maximum, not the
    maximum on the blob's edge; another warm region elsewhere does not pull it; a map with nothing
    above 0 gives its maximum."""
    grid = CamGrid(stride=16, offset=0.0, input_size=224)
    cam = np.full((14, 14), -1.0, np.float32)
    cam[3:8, 4:9] = 2.0  # a 5 x 5 blob centred on cell (row 5, col 6)
    cam[3, 4] = 2.2  # its hottest cell on a corner
    cam[11:13, 11:13] = 2.1  # a separate spot, hot but not connected
    x, y = hot_spot(cam, grid)
    assert abs(x - grid.to_fraction(6)) < 0.1 / 14 and abs(y - grid.to_fraction(5)) < 0.1 / 14, (x, y)
    px, py = peak(cam, grid)  # the maximum itself (refined by a parabola toward the blob: within half a cell)
    assert abs(px - grid.to_fraction(4)) <= 0.5 / 14 and abs(py - grid.to_fraction(3)) <= 0.5 / 14
    cold = cam - 5.0
    assert hot_spot(cold, grid) == peak(cold, grid)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet101"])
@pytest.mark.parametrize("network", [(32, 4), (16, 4), (16, 3), (8, 2)])
def test_peak_lands_on_a_bright_pixel_through_the_real_trunk(arch, network):
    """Receptive-field geometry, end to end: a bright pixel placed on a cell's receptive-field centre
    comes back as the peak, and as the hot spot's centre, within one pixel; the tile-middle geometry
    misses by stride/2. Also for the network that ends at layer3 (every trained model's)."""
    size = 160
    trunk = point_spread_trunk(arch, *network)
    grid = cam_grid(trunk, size)
    assert grid.stride == network[0]
    n = size // grid.stride
    for row, col in ((2, n - 3), (n - 1, 0), (n // 2, n // 2)):
        py, px = round(grid.offset + grid.stride * row), round(grid.offset + grid.stride * col)
        cam = bright_pixel_map(trunk, size, py, px)
        assert cam.shape == (n, n) and np.unravel_index(np.argmax(cam), cam.shape) == (row, col)
        # A spot on the border is cut in half by the image's edge, so its centre lies inside: the
        # hot spot is checked on the inner cells only.
        inner = 0 < row < n - 1 and 0 < col < n - 1
        for x, y in (peak(cam, grid), hot_spot(cam, grid)) if inner else (peak(cam, grid),):
            assert abs(x * size - 0.5 - px) <= 1 and abs(y * size - 0.5 - py) <= 1, (arch, network, row, col)


def test_peak_between_cell_centres_stays_within_half_a_cell_and_on_the_right_side():
    size, trunk = 224, point_spread_trunk("resnet18", 16)
    grid = cam_grid(trunk, size)
    for shift in (-5, 4, 7):
        px = 16 * 6 + shift
        x, _ = peak(bright_pixel_map(trunk, size, 100, px), grid)
        found = x * size - 0.5
        assert abs(found - px) < 8 and np.sign(found - 16 * 6) == np.sign(shift), (shift, found)


def test_residual_branches_that_disagree_on_the_grid_are_refused():
    trunk = build_model("resnet18", "none").trunk
    trunk[5][0].downsample[0].padding = (1, 1)  # the 1x1 shortcut now samples a pixel off the main path
    with pytest.raises(ValueError, match="disagree"):
        cam_grid(trunk, 224)


def _heat_of(rgb: np.ndarray, gray: int, alpha: float = 0.45) -> np.ndarray:
    """Invert the overlay's blend on a flat grey image: the heat level of every pixel."""
    table = _blend("jet", alpha)[:, gray].astype(np.int32)  # (256 levels, 3)
    d = ((rgb.astype(np.int32)[:, :, None, :] - table[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


@pytest.mark.parametrize("cam_size", [224, 160])
def test_overlay_puts_its_heat_where_the_peak_says(cam_size):
    """The overlay PNG's hottest pixel is the peak the table reports, at the model's input size and
    at another overlay size, for a real trunk's answer to a bright pixel."""
    size, trunk = 224, point_spread_trunk("resnet18", 16)
    grid = cam_grid(trunk, size)
    cam = bright_pixel_map(trunk, size, 16 * 3, 16 * 10).astype(np.float32)
    px, py = peak(cam, grid)
    heat = _heat_of(overlay(np.full((cam_size, cam_size), 90, np.uint8), cam, grid), 90)
    ys, xs = np.nonzero(heat == heat.max())
    assert abs((xs.mean() + 0.5) / cam_size - px) * cam_size <= 1 and abs((ys.mean() + 0.5) / cam_size - py) * cam_size <= 1


def test_absolute_scale_leaves_a_normal_cold_and_shows_a_lesion():
    """Relative (min-max) scaling lights up every image; the absolute scale keeps a map of negative
    logits (a confident NORMAL) cold, and shows a strong cell at full heat."""
    grid, gray = CamGrid(32, 0.0, 224), np.full((224, 224), 90, np.uint8)
    rng = np.random.default_rng(0)
    normal = rng.uniform(-6.0, -1.0, (7, 7)).astype(np.float32)
    cold = _blend("jet", 0.45)[0, 90]
    assert (overlay(gray, normal, grid, scale="absolute") == cold).all()
    assert _heat_of(overlay(gray, normal, grid, scale="relative"), 90).max() == 255
    lesion = normal.copy()
    lesion[3, 4] = ABSOLUTE_RANGE[1] + 2.0
    heat = _heat_of(overlay(gray, lesion, grid, scale="absolute"), 90)
    assert heat[3 * 32, 4 * 32] == 255 and heat[200, 20] == 0
    with pytest.raises(ValueError, match="absolute, relative"):
        overlay(gray, normal, grid, scale="loud")


def test_overlay_png_is_a_colour_image_hot_where_the_cam_is():
    gray = np.full((64, 64), 100, np.uint8)
    grid = CamGrid(16, 0.0, 64)
    cam = np.zeros((4, 4), np.float32)
    cam[0, 3] = 1.0
    rgb = overlay(gray, cam, grid)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    hot, cold = rgb[:6, 44:].astype(int), rgb[48:, :16].astype(int)  # cell (0, 3) is centred on pixel (0, 48)
    assert hot[..., 0].mean() > cold[..., 0].mean() + 40  # jet: red where hot
    im = Image.open(__import__("io").BytesIO(encode_png(rgb)))
    assert im.size == (64, 64) and im.mode == "RGB"
    assert upsample(cam, (64, 32), grid).shape == (32, 64)

