"""The network: a torchvision ResNet with a 2-class head that also returns its last conv features,
so the Class Activation Map (Zhou et al. 2016) comes from the same forward pass as the prediction."""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models

from .. import CLASSES
from ..errors import InputError
from .weights import imagenet_state, load_weights_file

ARCHS = ("resnet18", "resnet50", "resnet101")
WEIGHTS = ("imagenet", "none")  # or a path to a local file

_TORCHVISION = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V2),
    "resnet101": (models.resnet101, models.ResNet101_Weights.IMAGENET1K_V2),
}


class CamResNet(nn.Module):
    """ResNet trunk + global average pool + linear head; ``forward`` -> (logits, layer4 features).

    Because the head is linear on the average-pooled features, the CAM of class k,
    ``sum_c fc.weight[k, c] * features[c]``, averages exactly to that class's logit minus its bias.
    """

    def __init__(self, trunk: nn.Module, n_features: int, n_classes: int = len(CLASSES)):
        super().__init__()
        self.trunk = trunk
        self.fc = nn.Linear(n_features, n_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(x)
        logits = self.fc(features.mean(dim=(2, 3)))
        return logits, features


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise InputError(f"Invalid arch {arch!r}. Only {', '.join(ARCHS)} are supported.")
    return arch


CAM_STRIDES = (32, 16)


def build_model(arch: str = "resnet101", weights: str = "none", *, seed: int = 0, cam_stride: int = 32) -> CamResNet:
    """A fresh model. ``weights``: "imagenet" (torchvision's file, downloaded or from the torch hub
    cache, sha256-checked, loaded without unpickling: see weights.py), "none" (random, seeded so the
    same spec gives the same model), or a path to a file holding an ImageNet ResNet state dict (a
    torchvision ``.pth``; checked against the sha256 prefix its name carries, if any).

    ``cam_stride`` 16 removes the last stride-2 of the network (in layer4), as Zhou et al. removed
    VGG's last pooling layers: the CAM becomes 14x14 instead of 7x7 at 224 px, so its peak can say
    which part of a lung is involved. Bottleneck nets (50/101) dilate layer4 instead, which keeps
    the receptive fields pretrained weights expect. The weights are the same either way.
    """
    _, tv_weights = _TORCHVISION[check_arch(arch)]
    torch.manual_seed(seed)
    net = torchvision_resnet(arch, cam_stride)
    if weights == "imagenet":
        net.load_state_dict(imagenet_state(tv_weights.url))
    elif weights != "none":
        state = load_weights_file(weights)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the 1000-class head is replaced
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("fc.")]:
            raise InputError(
                f"{weights} does not hold {arch} weights ({len(missing)} missing, {len(unexpected)} unexpected keys);"
                f" pass a torchvision {arch} state dict, --weights imagenet or --weights none."
            )
    n_features = net.fc.in_features
    trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
    model = CamResNet(trunk, n_features)
    torch.manual_seed(seed + 1)
    nn.init.normal_(model.fc.weight, std=0.01)
    nn.init.zeros_(model.fc.bias)
    return model


def torchvision_resnet(arch: str, cam_stride: int = 32) -> nn.Module:
    """torchvision's ResNet (random weights, 1000-class fc) with layer4 as ``cam_stride`` asks."""
    ctor, _ = _TORCHVISION[check_arch(arch)]
    if cam_stride not in CAM_STRIDES:
        raise InputError(f"Invalid cam stride {cam_stride}. Only {', '.join(map(str, CAM_STRIDES))} are supported.")
    dilate = cam_stride == 16 and arch != "resnet18"
    net = ctor(weights=None, replace_stride_with_dilation=[False, False, dilate])
    if cam_stride == 16 and arch == "resnet18":  # BasicBlock has no dilation: drop the stride alone
        net.layer4[0].conv1.stride = (1, 1)
        net.layer4[0].downsample[0].stride = (1, 1)
    return net
