"""The network: a torchvision ResNet whose layer4 can run without its last stride (CAM resolution)."""

import torch

from cxr_batch.model.network import build_model


def test_cam_stride_16_doubles_the_map_resolution_with_the_same_weights():
    x = torch.randn(1, 3, 128, 128)
    for arch in ("resnet18", "resnet50"):
        coarse, fine = build_model(arch, "none"), build_model(arch, "none", cam_stride=16)
        assert coarse.state_dict().keys() == fine.state_dict().keys()
        with torch.no_grad():
            assert coarse.eval()(x)[1].shape[-2:] == (4, 4)
            assert fine.eval()(x)[1].shape[-2:] == (8, 8)
