"""--cam-point evidence (model/evidence.py): the CAM's hot spot traced back to the input pixels that make it hot."""

import numpy as np
import pytest
import torch
from torch import nn

from cxr_batch.model.cam import CamGrid, hot_spot
from cxr_batch.model.evidence import evidence_forward, evidence_point

SIZE, STRIDE = 96, 8


class LooksBelow(nn.Module):
    """A network whose cells vote for a blob ``look`` px BELOW their own centre, through a ReLU, as the
    trained networks' cells above a lower lesion vote for it from the context they see (cam-findings rounds
    8, 13): its map's hot spot sits ``look`` px above the blob. Stride-8 cells; (logits, features) like CamResNet."""

    def __init__(self, look: int):
        super().__init__()
        self.look = look
        t = torch.exp(-0.5 * (torch.arange(-6, 7) / 2.5) ** 2)
        self.register_buffer("blur", (t[:, None] * t[None, :] / (t.sum() ** 2)).view(1, 1, 13, 13))
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[0.0], [1.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        g = nn.functional.conv2d(x.mean(1, keepdim=True), self.blur, padding=6)
        g = torch.cat([g[..., self.look:, :], torch.zeros_like(g[..., :self.look, :])], dim=-2)  # row r sees row r + look
        f = nn.functional.avg_pool2d(torch.relu(g - 0.05), STRIDE)
        return self.fc(f.mean((2, 3))), f


def _spot(y, x, value=3.0):
    img = torch.zeros(1, 3, SIZE, SIZE)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    img[:, :] = value * torch.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 3.0 ** 2))
    return img


@pytest.mark.parametrize("spot", [(60, 40), (30, 70), (48, 48)])
def test_evidence_point_lands_on_the_pixels_the_cells_voted_for_not_on_the_cells(spot):
    """The map's hot spot of LooksBelow is ``look`` px above the spot (this is the pull the option removes);
    the evidence point is within a third of a cell (2.5 px) of it: the gradient follows which cells are hot,
    so their spacing still shows a little. Taking the cells' centres, or not back-propagating, fails."""
    look = 16
    net = LooksBelow(look).eval()
    grid = CamGrid(stride=STRIDE, offset=(STRIDE - 1) / 2, input_size=SIZE)
    y, x = spot
    logits, features, points = evidence_forward(net, _spot(y, x), net.fc.weight, net.fc.bias, grid)
    cam = (features[0, 0] * 1.0).numpy()
    mx, my = hot_spot(cam, grid)
    # (cells are 8 px apart: the map's answer is within half a cell of ``look`` px above the spot)
    assert abs(my * SIZE - 0.5 - (y - look)) <= STRIDE / 2 and abs(mx * SIZE - 0.5 - x) <= STRIDE / 2, (mx * SIZE, my * SIZE)
    ex, ey = points[0]
    assert abs(ey * SIZE - 0.5 - y) <= 2.5 and abs(ex * SIZE - 0.5 - x) <= 2.5, (ex * SIZE, ey * SIZE)
    assert torch.allclose(logits, net(_spot(y, x))[0])  # the pass with gradients gives what inference gives


def test_a_map_with_no_cell_voting_pneumonia_has_no_evidence_point_and_the_batch_is_independent():
    net = LooksBelow(8).eval()
    grid = CamGrid(stride=STRIDE, offset=(STRIDE - 1) / 2, input_size=SIZE)
    batch = torch.cat([_spot(40, 30), torch.zeros(1, 3, SIZE, SIZE), _spot(70, 64)])
    _, _, points = evidence_forward(net, batch, net.fc.weight, net.fc.bias, grid)
    assert np.isnan(points[1]).all() and np.isfinite(points[[0, 2]]).all()
    _, _, alone = evidence_forward(net, batch[2:], net.fc.weight, net.fc.bias, grid)
    assert np.allclose(alone[0], points[2], atol=1e-6)  # one image's point does not depend on its batch-mates


def test_evidence_point_is_the_centre_of_the_attribution_blob_around_its_maximum():
    a = np.zeros((64, 64))
    yy, xx = np.indices(a.shape)
    a += np.exp(-((yy - 20.0) ** 2 + (xx - 41.0) ** 2) / (2 * 2.0 ** 2))
    a += 0.6 * np.exp(-((yy - 50.0) ** 2 + (xx - 10.0) ** 2) / (2 * 2.0 ** 2))  # weaker, separate: no pull
    x, y = evidence_point(a, sigma=2)
    assert abs(x * 64 - 0.5 - 41) < 0.05 and abs(y * 64 - 0.5 - 20) < 0.05
    assert np.isnan(evidence_point(np.zeros((8, 8)), sigma=1)).all()  # no evidence: no point, not the centre


def test_the_scorer_gives_evidence_points_and_the_same_predictions_as_without(tmp_path):
    """--cam-point evidence through the scoring actor: the same probabilities and maps as the frozen
    inference model, a point for every row whose map has a hot spot, and finish_batch writes that point."""
    from images import encode
    from PIL import Image

    from cxr_batch.jobs.score_stages import Scorer, decode_batch, finish_batch
    from cxr_batch.model.registry import describe

    rng = np.random.default_rng(0)
    (tmp_path / "a").mkdir()
    for i in range(5):
        (tmp_path / "a" / f"{i}.png").write_bytes(encode(Image.fromarray(rng.integers(0, 255, (80, 80), dtype=np.uint8)), "PNG"))
    info = describe("resnet18:none").to_dict()
    info["image_size"] = 64
    batch = decode_batch({"path": np.array([f"{i}.png" for i in range(5)] + ["missing.png"], dtype=object)},
                         archive=str(tmp_path / "a"), image_size=64, max_pixels=10**7)
    plain = Scorer(info, threads=1, precision="fp32", compile=False, channels_last=True)(dict(batch))
    ev = Scorer(info, threads=1, precision="fp32", compile=False, channels_last=True, cam_point="evidence")(dict(batch))
    assert "cam_point" not in plain
    assert np.allclose(ev["prob_pneumonia"][:5], plain["prob_pneumonia"][:5], atol=1e-4)
    assert np.allclose(ev["cam"], plain["cam"], atol=1e-3)
    hot = ev["cam"][:5].reshape(5, -1).max(1) > 0
    assert hot.any()
    assert np.isfinite(ev["cam_point"][:5][hot]).all() and np.isnan(ev["cam_point"][:5][~hot]).all()
    assert np.isnan(ev["cam_point"][5]).all()  # the missing file: no prediction, no point
    out = finish_batch(ev, info=info, cam_dir=None, cam_size=None, archive=str(tmp_path / "a"), max_pixels=10**7,
                       cam_scale="absolute")
    k = int(np.flatnonzero(hot)[0])
    assert (out["cam_peak_x"][k], out["cam_peak_y"][k]) == tuple(ev["cam_point"][k])


def test_score_settings_refuse_an_unknown_cam_point_and_compile_with_evidence():
    from cxr_batch.errors import InputError
    from cxr_batch.jobs.score import ScoreSettings

    with pytest.raises(InputError, match="--cam-point"):
        ScoreSettings(archive="a", out="o", cam_point="peak")
    with pytest.raises(InputError, match="drop --compile"):
        ScoreSettings(archive="a", out="o", cam_point="evidence", compile=True)
