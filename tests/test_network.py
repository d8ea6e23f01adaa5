"""The network: torchvision's ResNet (built without importing torchvision) whose layer4 can run without
its last stride, or which ends at layer3 (CAM resolution and placement)."""

import pytest
import torch

from cxr_batch.errors import InputError
from cxr_batch.model.network import _full_resnet, build_model, torchvision_resnet
from cxr_batch.model.receptive import cam_grid


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet101"])
@pytest.mark.parametrize("layer,stride", [(4, 32), (4, 16), (3, 16)])
def test_our_resnet_is_torchvision_s_weight_for_weight_and_output_for_output(arch, layer, stride):
    """model/resnet.py rebuilds torchvision's ResNet so that scoring never imports torchvision (1.7 s of
    torch._dynamo per process): the same keys, the same seeded weights, the same outputs."""
    torch.manual_seed(5)
    ours = _full_resnet(arch, stride, layer)
    after_ours = torch.rand(3)
    torch.manual_seed(5)
    theirs = _full_resnet(arch, stride, layer, torchvision=True)
    assert torch.equal(after_ours, torch.rand(3))  # the same draws, in the same order
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), theirs.eval()(x), atol=1e-5)


def test_the_imagenet_files_are_torchvision_s_and_building_a_model_does_not_import_torchvision(tmp_path):
    """Neither a spec's random network nor a checkpoint's (built on the meta device, whose normal_ would
    import torch._dynamo) pulls in torchvision or torch._dynamo: 1.6-1.8 s of every scoring process."""
    import subprocess
    import sys

    from torchvision import models

    from cxr_batch.model.checkpoint import make_checkpoint, save_checkpoint
    from cxr_batch.model.resnet import IMAGENET_URLS

    assert IMAGENET_URLS == {"resnet18": models.ResNet18_Weights.IMAGENET1K_V1.url,
                             "resnet50": models.ResNet50_Weights.IMAGENET1K_V2.url,
                             "resnet101": models.ResNet101_Weights.IMAGENET1K_V2.url}
    net = build_model("resnet18", "none", cam_stride=16, cam_layer=3)
    path = str(tmp_path / "m.ckpt")
    save_checkpoint(make_checkpoint(net, arch="resnet18", image_size=64, threshold=0.5, settings={}, cam_stride=16,
                                    cam_layer=3), path)
    code = ("import sys, torch; from cxr_batch.jobs.score_stages import Scorer; from cxr_batch.model.network import build_model;"
            " from cxr_batch.model.checkpoint import load_checkpoint, model_from_checkpoint;"
            f" m = model_from_checkpoint(load_checkpoint({path!r}).ckpt);"
            " build_model('resnet50', 'none', cam_stride=16, cam_layer=3);"
            " print(sorted(m for m in ('torchvision', 'torch._dynamo') if m in sys.modules), m.trunk[0].weight.device)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[] cpu", out


def test_cam_stride_16_doubles_the_map_resolution_with_the_same_weights():
    x = torch.randn(1, 3, 128, 128)
    for arch in ("resnet18", "resnet50"):
        coarse, fine = build_model(arch, "none"), build_model(arch, "none", cam_stride=16)
        assert coarse.state_dict().keys() == fine.state_dict().keys()
        with torch.no_grad():
            assert coarse.eval()(x)[1].shape[-2:] == (4, 4)
            assert fine.eval()(x)[1].shape[-2:] == (8, 8)


@pytest.mark.parametrize("layer,stride,channels", [(3, 16, {"resnet18": 256, "resnet50": 1024}),
                                                   (2, 8, {"resnet18": 128, "resnet50": 512})])
def test_cam_layer_3_or_2_ends_the_network_there_with_the_same_weights_up_to_it(layer, stride, channels):
    """The map of every trained model (layer3's cells, stride 16, undilated) or of `--cam-layer 2` (stride 8):
    the head on that layer's channels, the layers up to it exactly those of the full network built from the
    same seed (ImageNet's, when loaded); the benchmark's torchvision network drops the layers after it."""
    x = torch.randn(2, 3, 128, 128)
    for arch, c in channels.items():
        full, cut = build_model(arch, "none", seed=4), build_model(arch, "none", seed=4, cam_stride=stride, cam_layer=layer)
        assert len(cut.trunk) == 4 + layer and cut.fc.in_features == c
        a, b = full.state_dict(), cut.state_dict()
        assert all(torch.equal(a[k], v) for k, v in b.items() if k.startswith("trunk."))
        assert not [k for k in b if k.startswith(f"trunk.{4 + layer}.")]
        with torch.no_grad():
            logits, features = cut.eval()(x)
        assert features.shape[1:] == (c, 128 // stride, 128 // stride) and cam_grid(cut.trunk, 128).stride == stride
        # the head is linear on the pooled features: the class map averages to the logit minus its bias
        cam = torch.einsum("bchw,c->bhw", features, cut.fc.weight[1].detach())
        assert torch.allclose(cam.mean(dim=(1, 2)) + cut.fc.bias[1].detach(), logits[:, 1], atol=1e-4)
        tv = torchvision_resnet(arch, stride, layer)
        assert isinstance(tv.layer4, torch.nn.Identity) and tv.fc.in_features == c
        assert isinstance(tv.layer3, torch.nn.Identity) == (layer == 2)


def test_a_torchvision_weights_file_loads_into_the_layer3_network(tmp_path):
    """A local ImageNet state dict (torchvision's layout, 1000-class fc) fits the layer3 network:
    its layers 1-3 are the file's, layer4's weights go unused."""
    tv = torchvision_resnet("resnet18")
    torch.nn.init.normal_(tv.layer3[1].conv2.weight)
    path = tmp_path / "my_resnet18.pth"  # no hash in the name: none to check
    torch.save(tv.state_dict(), path)
    cut = build_model("resnet18", str(path), cam_stride=16, cam_layer=3)
    assert torch.equal(cut.trunk[6][1].conv2.weight, tv.layer3[1].conv2.weight)


def test_a_layer3_network_has_stride_16_and_bad_choices_are_refused():
    with pytest.raises(InputError, match="cam stride 16 with cam layer 3"):
        build_model("resnet18", "none", cam_layer=3)  # stride 32 would need layer4
    with pytest.raises(InputError, match="cam stride 8 with cam layer 2"):
        build_model("resnet18", "none", cam_layer=2, cam_stride=16)
    with pytest.raises(InputError, match="stride 8 is layer2's"):
        build_model("resnet18", "none", cam_stride=8)
    with pytest.raises(InputError, match="Invalid cam layer 5"):
        build_model("resnet18", "none", cam_layer=5)
    with pytest.raises(InputError, match="Invalid cam stride 4"):
        torchvision_resnet("resnet18", 4)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet101"])
@pytest.mark.parametrize("layer,stride", [(4, 32), (4, 16), (3, 16), (2, 8)])
def test_the_torch_free_cam_grid_is_the_one_walked_out_of_the_built_network(arch, layer, stride):
    """`cxr-batch score` places the CAM cells from a checkpoint's entries without building the network
    (model/archs.resnet_grid); it must be where the network's own layers put them."""
    from cxr_batch.model.archs import resnet_grid

    with torch.device("meta"):
        trunk = build_model(arch, "none", cam_stride=stride, cam_layer=layer).trunk
    for size in (224, 320):
        assert resnet_grid(stride, size) == cam_grid(trunk, size)


def test_a_model_described_from_its_entries_alone_is_the_one_described_by_building_it(tmp_path):
    """describe(check=False) reads no weights and imports no torch; it must say what the full describe says."""
    import subprocess
    import sys

    from cxr_batch.model.checkpoint import make_checkpoint, save_checkpoint
    from cxr_batch.model.registry import describe

    net = build_model("resnet18", "none", cam_stride=16, cam_layer=3)
    save_checkpoint(make_checkpoint(net, arch="resnet18", image_size=96, threshold=0.4, settings={}, cam_stride=16,
                                    cam_layer=3, temperature=1.7), str(tmp_path / "m.ckpt"))
    for spec in (str(tmp_path / "m.ckpt"), "resnet18:none", "resnet50:none"):
        assert describe(spec, check=False) == describe(spec)
    code = (f"import sys, cxr_batch.jobs.score, cxr_batch.cli; from cxr_batch.model.registry import describe;"
            f" describe({str(tmp_path / 'm.ckpt')!r}, check=False); print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
