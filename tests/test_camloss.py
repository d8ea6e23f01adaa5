"""Flip consistency: mirrored about the CAM grid's own axis, a mirror-symmetric network's maps mirror
exactly; the plain pixel mirror would demand a shift of the map instead."""

import numpy as np
import torch
from torch import nn

from cxr_batch.model.camloss import grid_flip, paired_loss
from cxr_batch.model.network import build_model
from cxr_batch.model.receptive import cam_grid
from trunks import point_spread_trunk


def test_grid_flip_takes_cell_centres_onto_cell_centres():
    grid = cam_grid(build_model("resnet18", "none", cam_stride=16).trunk, 224)
    img = torch.zeros(1, 224, 224)
    img[0, 16 * 3, 16 * 11] = 1.0
    across = grid_flip(img, -1, grid, 14)
    updown = grid_flip(img, -2, grid, 14)
    assert across[0, 16 * 3, 16 * 2] == 1 and across.sum() == 1  # column 11 -> 14 - 1 - 11
    assert updown[0, 16 * 10, 16 * 11] == 1 and updown.sum() == 1  # row 3 -> 10


def _maps(trunk, x):
    with torch.no_grad():
        return trunk(x).sum(1)


def test_a_mirror_symmetric_network_is_flip_consistent_only_about_the_grid_axis():
    trunk = point_spread_trunk("resnet18", 16)
    grid = cam_grid(trunk, 224)
    x = torch.zeros(1, 3, 224, 224)
    x[:, :, 60:90, 120:170] = torch.rand(30, 50, generator=torch.Generator().manual_seed(0))
    base = _maps(trunk, x)
    about_grid = _maps(trunk, grid_flip(x, -1, grid, 14)).flip(-1)
    about_pixels = _maps(trunk, x.flip(-1)).flip(-1)
    assert torch.allclose(about_grid, base, rtol=1e-4, atol=1e-6 * float(base.max()))
    assert (about_pixels - base).abs().max() > 0.05 * base.max()  # 15 px off: another map


def test_paired_loss_trains_on_both_twins_and_returns_the_originals_logits():
    model = build_model("resnet18", "none", seed=1, cam_stride=16).eval()  # batch norm: same statistics both ways
    grid = cam_grid(model.trunk, 64)
    x, y = torch.randn(3, 3, 64, 64), torch.tensor([0, 1, 1])
    loss_fn = nn.CrossEntropyLoss()
    total, cls, logits = paired_loss(model, model.fc, x, y, loss_fn, weight=0.5, grid=grid, step=1)
    assert logits.shape == (3, 2)
    with torch.no_grad():
        twin_logits, _ = model(grid_flip(x, -2, grid, 4))
    expect = loss_fn(torch.cat([model(x)[0], twin_logits]), torch.cat([y, y]))
    assert torch.isclose(cls, expect, atol=1e-5) and total > cls
    total.backward()
    assert model.trunk[0].weight.grad is not None and np.isfinite(float(total))
