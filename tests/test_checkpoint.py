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


@pytest.mark.parametrize("written_before_cam_layer", [False, True])
def test_the_checkpoint_says_where_its_map_comes_from(tmp_path, written_before_cam_layer):
    """A layer3 model comes back as one; a checkpoint from before cam_layer existed is a layer4 model."""
    from cxr_batch.errors import CheckpointError
    from cxr_batch.model.checkpoint import load_checkpoint, make_checkpoint, model_from_checkpoint, save_checkpoint

    layer = 4 if written_before_cam_layer else 3
    model = build_model("resnet18", "none", seed=2, cam_stride=16, cam_layer=layer).eval()
    ck = make_checkpoint(model, arch="resnet18", image_size=64, threshold=0.5, settings={}, cam_stride=16, cam_layer=layer)
    if written_before_cam_layer:
        del ck["cam_layer"]
    save_checkpoint(ck, str(tmp_path / "m.ckpt"))
    again = model_from_checkpoint(load_checkpoint(str(tmp_path / "m.ckpt")).ckpt).eval()
    assert len(again.trunk) == 4 + layer
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x)[1], again(x)[1])
    with pytest.raises(CheckpointError, match="m.ckpt: .*cam stride 16 with cam layer 3"):
        model_from_checkpoint({**ck, "cam_layer": 3, "cam_stride": 32}, str(tmp_path / "m.ckpt"))


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


def test_weights_that_do_not_fit_are_refused_by_the_local_engine_before_any_row(tmp_path):
    """With files to score, the local engine checks the weights when it builds the model (its decode pool
    already running): still one line, no row, no output folder left behind."""
    from PIL import Image

    from cxr_batch.model.checkpoint import make_checkpoint, save_checkpoint
    from cxr_batch.model.network import build_model

    ckpt = make_checkpoint(build_model("resnet18", "none"), arch="resnet18", image_size=64, threshold=0.5, settings={})
    ckpt["state_dict"]["fc.weight"] = ckpt["state_dict"]["fc.weight"][:, :8]  # a hand-edited head
    save_checkpoint(ckpt, str(tmp_path / "bad.ckpt"))
    (tmp_path / "archive" / "NORMAL").mkdir(parents=True)
    for i in range(3):
        Image.new("L", (80, 80), 40 * i).save(tmp_path / "archive" / "NORMAL" / f"{i}.png")
    r = CliRunner().invoke(main, ["score", str(tmp_path / "archive"), "--out", str(tmp_path / "o"),
                                  "--model", str(tmp_path / "bad.ckpt"), "--engine", "local"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "do not fit a resnet18" in errors[0] and "fc.weight" in errors[0], r.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o-cams").exists()


def test_the_entries_reader_agrees_with_the_loader_without_reading_weights(tmp_path):
    from cxr_batch.model.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
    from cxr_batch.model.entries import checkpoint_entries

    net = build_model("resnet18", "none", seed=1, cam_stride=16, cam_layer=3)
    uri = str(tmp_path / "m.ckpt")
    save_checkpoint(make_checkpoint(net, arch="resnet18", image_size=64, threshold=0.4, settings={"seed": 1},
                                    cam_stride=16, cam_layer=3), uri)
    loaded = load_checkpoint(uri)
    entries, model_id = checkpoint_entries(uri)
    assert model_id == loaded.model_id
    small = ("state_dict", "optimizer")  # weights: placeholders in the entries
    assert {k: v for k, v in loaded.ckpt.items() if k not in small} == {k: v for k, v in entries.items() if k not in small}
    again, no_id = checkpoint_entries(uri, with_id=False)
    assert no_id is None and again["settings"] == {"seed": 1} and again["cam_layer"] == 3


def test_a_missing_or_folder_checkpoint_reads_the_same_with_or_without_torch(tmp_path):
    """`cxr-batch score` describes the model from its entries (no torch): a missing file or a folder must
    get the same one-line error as the full loader gives."""
    from cxr_batch.errors import CheckpointError
    from cxr_batch.model.registry import describe

    for spec in (str(tmp_path / "missing.ckpt"), str(tmp_path)):
        messages = []
        for check in (True, False):
            with pytest.raises(CheckpointError) as e:
                describe(spec, check=check)
            messages.append(str(e.value))
        assert messages[0] == messages[1] and spec in messages[0], messages


def test_a_checkpoint_of_an_unknown_network_is_refused_alike_with_or_without_torch(tmp_path):
    """An arch or class list this version does not build: the same one-line error from the entries alone."""
    from cxr_batch.errors import CheckpointError
    from cxr_batch.model.checkpoint import make_checkpoint, save_checkpoint
    from cxr_batch.model.network import build_model
    from cxr_batch.model.registry import describe

    for entry, value in (("arch", "vgg16"), ("classes", ["A", "B"])):
        ckpt = make_checkpoint(build_model("resnet18", "none"), arch="resnet18", image_size=64, threshold=0.5, settings={})
        ckpt[entry] = value
        path = str(tmp_path / f"{entry}.ckpt")
        save_checkpoint(ckpt, path)
        messages = []
        for check in (True, False):
            with pytest.raises(CheckpointError, match="unsupported arch") as e:
                describe(path, check=check)
            messages.append(str(e.value))
        assert messages[0] == messages[1], messages
