"""Checkpoints: the round trip, and files that must be refused in one line without running anything."""

import os

import pytest
import torch
from click.testing import CliRunner

from cxr_batch.cli import main
from cxr_batch.model.network import build_model


def test_checkpoint_round_trip_keeps_predictions(tmp_path):
    from cxr_batch.model.checkpoint import load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint

    model = build_model("resnet18", "none", seed=3, cam_stride=16).eval()
    ck = make_checkpoint(model, arch="resnet18", image_size=96, threshold=0.3, settings={"a": 1}, cam_stride=16)
    save_checkpoint(ck, str(tmp_path / "m.ckpt"))
    loaded = load_checkpoint(str(tmp_path / "m.ckpt"))
    again = model_from_checkpoint(loaded.ckpt).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(model(x)[0], again(x)[0]) and again(x)[1].shape[-1] == 6
    assert loaded.ckpt["threshold"] == 0.3 and len(loaded.model_id) == 16


def test_a_checkpoint_model_is_whole_and_gives_the_saved_outputs(tmp_path):
    """Built on the meta device, then the weights assigned: nothing may be left on meta."""
    import torch

    from cxr_batch.model.checkpoint import load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint
    from cxr_batch.model.network import build_model

    net = build_model("resnet18", "none", seed=5, cam_stride=16).eval()
    save_checkpoint(make_checkpoint(net, arch="resnet18", image_size=64, threshold=0.5, settings={}, cam_stride=16),
                    str(tmp_path / "m.ckpt"))
    loaded = model_from_checkpoint(load_checkpoint(str(tmp_path / "m.ckpt")).ckpt).eval()
    assert all(t.device.type == "cpu" for t in [*loaded.parameters(), *loaded.buffers()])
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net(x)[0], loaded(x)[0]) and torch.equal(net(x)[1], loaded(x)[1])


class RunsCode:
    """Unpickling this runs a shell command: what a hostile "checkpoint" can do to torch.load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("spec", ["{ckpt}", "resnet18:{ckpt}"], ids=["checkpoint", "backbone-weights"])
def test_checkpoint_that_runs_code_is_refused_without_running_it(tmp_path, spec):
    import torch

    marker, ckpt = tmp_path / "pwned", tmp_path / "evil.ckpt"
    torch.save({"format": "cxr-batch-checkpoint", "state_dict": RunsCode(marker)}, ckpt)  # torch's zip format
    (tmp_path / "archive").mkdir()
    r = CliRunner().invoke(main, ["score", str(tmp_path / "archive"), "--out", str(tmp_path / "o"),
                                  "--model", spec.format(ckpt=ckpt)])
    assert r.exit_code == 1, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "Refusing to load" in errors[0] and "could run code" in errors[0], r.output
    assert "Traceback" not in r.output
    assert not marker.exists()
    assert not (tmp_path / "o").exists()  # refused before any output was made


def test_checkpoint_whose_weights_do_not_fit_is_refused_in_one_line(tmp_path):
    from cxr_batch.model.checkpoint import make_checkpoint, save_checkpoint
    from cxr_batch.model.network import build_model

    ckpt = make_checkpoint(build_model("resnet18", "none"), arch="resnet18", image_size=64, threshold=0.5, settings={})
    ckpt["state_dict"].pop("trunk.0.weight")  # a truncated or hand-edited file
    save_checkpoint(ckpt, str(tmp_path / "bad.ckpt"))
    (tmp_path / "archive").mkdir()
    r = CliRunner().invoke(main, ["score", str(tmp_path / "archive"), "--out", str(tmp_path / "o"),
                                  "--model", str(tmp_path / "bad.ckpt")])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "do not fit a resnet18" in errors[0] and "trunk.0.weight" in errors[0], r.output
    assert not (tmp_path / "o").exists()
