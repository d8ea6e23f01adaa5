"""Flip consistency: mirrored about the CAM grid's own axis, a mirror-symmetric network's maps mirror
exactly; the plain pixel mirror would demand a shift of the map instead."""

import numpy as np
import torch
from torch import nn

from cxr_batch.model.cam import log_odds_map
from cxr_batch.model.camloss import grid_flip, paired_loss, quiet_normal
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
    with torch.no_grad():  # --cam-quiet with --cam-consistency: the NORMAL twins' maps are held quiet too
        maps = log_odds_map(model(torch.cat([x, grid_flip(x, -2, grid, 4)]))[1], model.fc.weight, model.fc.bias, 1)
        quiet = paired_loss(model, model.fc, x, y, loss_fn, weight=0.5, grid=grid, step=1, quiet=2.0)[0]
    assert torch.isclose(quiet, total + 2.0 * quiet_normal(maps, torch.cat([y, y])), atol=1e-5)
    assert quiet > total
    total.backward()
    assert model.trunk[0].weight.grad is not None and np.isfinite(float(total))


def test_quiet_normal_penalises_normal_cells_that_vote_pneumonia_and_leaves_pneumonia_maps_alone():
    # A pattern common to both classes (a hot top corner) on a NORMAL and a PNEUMONIA map.
    maps = torch.full((2, 6, 6), -4.0)
    maps[:, 0, 0] = 3.0
    maps.requires_grad_(True)
    labels = torch.tensor([0, 1])  # NORMAL, PNEUMONIA
    loss = quiet_normal(maps, labels)
    assert torch.isclose(loss, torch.tensor(3.0 / 72))  # the NORMAL corner's vote, averaged over the batch's cells
    loss.backward()
    g = maps.grad
    assert torch.all(g[1] == 0)  # where a PNEUMONIA image's lesion is is not known: its map is left alone
    assert g[0, 0, 0] > 0 and g[0].sum() == g[0, 0, 0]  # the corner alone is pushed down: cells voting NORMAL cost nothing
    # Gradient descent on the shared pattern ends with no NORMAL cell voting PNEUMONIA, and the cells that
    # voted NORMAL from the start stay where they were.
    shared = torch.full((6, 6), -1.0)
    shared[0, 0] = 3.0
    shared.requires_grad_(True)
    opt = torch.optim.SGD([shared], lr=50.0)
    for _ in range(100):
        opt.zero_grad()
        quiet_normal(shared.expand(2, 6, 6), labels).backward()
        opt.step()
    assert shared[0, 0] <= 0 and torch.all(shared.flatten()[1:] == -1)


def test_the_training_step_applies_the_quiet_normal_loss_to_normal_maps():
    """The worker's own epoch (jobs/train_worker._train_epoch, no Ray): from the same start and the same
    batches, --cam-quiet leaves the NORMAL training images' maps quieter than plain training does."""
    from cxr_batch import POSITIVE
    from cxr_batch.jobs.train_config import TrainSettings
    from cxr_batch.jobs.train_worker import _phase_model, _train_epoch
    from cxr_batch.pixels.transforms import normalize

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 64, 64), dtype=np.uint8)
    y = np.array([0, 1] * 8)
    quiet = {}
    for weight in (0.0, 2.0):
        s = TrainSettings(data="d", out="o", arch="resnet18", weights="none", image_size=64, batch_size=8,
                          cam_quiet=weight, translate=0.0)
        torch.manual_seed(0)
        model = build_model("resnet18", "none", seed=0, cam_stride=s.cam_stride, cam_layer=s.cam_layer)
        ddp, opt = _phase_model(model, "finetune", 1e-3, s, torch.device("cpu"), 1)
        for epoch in range(1, 4):
            _train_epoch(ddp, model, opt, torch.nn.CrossEntropyLoss(), x, y, s, epoch, 0, torch.device("cpu"),
                         "finetune", None)
        model.eval()
        with torch.no_grad():
            _, features = model(normalize(torch.from_numpy(x).float() / 255, channels_last=True))
            maps = log_odds_map(features, model.fc.weight, model.fc.bias, POSITIVE)
        quiet[weight] = float(quiet_normal(maps, torch.from_numpy(y)))
    assert quiet[2.0] < 0.8 * quiet[0.0], quiet
