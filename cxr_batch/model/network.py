"""The network: a ResNet (torchvision's, built by model/resnet.py without importing torchvision) with a
2-class head that also returns its last conv features, so the Class Activation Map (Zhou et al. 2016)
comes from the same forward pass as the prediction."""

from __future__ import annotations

import torch
from torch import nn

from .. import CLASSES
from ..errors import InputError
from .archs import check_arch, check_cam
from .resnet import IMAGENET_URLS, ResNet
from .weights import imagenet_state, load_weights_file


class CamResNet(nn.Module):
    """ResNet trunk + global average pool + linear head; ``forward`` -> (logits, last features).

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


def build_model(arch: str = "resnet101", weights: str = "none", *, seed: int = 0, cam_stride: int = 32,
                cam_layer: int = 4, init: bool = True) -> CamResNet:
    """A fresh model. ``weights``: "imagenet" (torchvision's file, downloaded or from the torch hub
    cache, sha256-checked, loaded without unpickling: see weights.py), "none" (random, seeded so the
    same spec gives the same model), or a path to a file holding an ImageNet ResNet state dict (a
    torchvision ``.pth``; checked against the sha256 prefix its name carries, if any).

    ``cam_stride`` 16 removes the last stride-2 of the network (in layer4), as Zhou et al. removed
    VGG's last pooling layers: the CAM becomes 14x14 instead of 7x7 at 224 px, so its peak can say
    which part of a lung is involved. Bottleneck nets (50/101) dilate layer4 instead, which keeps
    the receptive fields pretrained weights expect. The weights are the same either way.

    ``cam_layer`` 3 (2) ends the network at layer3 (layer2) and puts the head on its channels: a map of stride
    16 (8) from a smaller receptive field. The default, 4, is the whole network, as transfer learning means
    it; the cut networks learned more slowly or not at all on textured tasks
    (docs/decisions/001-full-network.md). ImageNet weights load into the full network either way, and a
    cut network leaves the weights of the layers it drops unused.

    ``init`` False skips the random initialisation, for a caller that replaces every weight at once (a
    checkpoint's, model_from_checkpoint). It matters on the meta device: ``normal_`` there runs torch's
    Python reference implementation, whose first call imports ``torch._dynamo``, a large share of each
    scoring process's start-up.
    """
    check_arch(arch)
    check_cam(cam_layer, cam_stride)
    torch.manual_seed(seed)
    net = _full_resnet(arch, cam_stride, cam_layer, init=init)
    if weights == "imagenet":
        net.load_state_dict(imagenet_state(IMAGENET_URLS[arch]))
    elif weights != "none":
        state = load_weights_file(weights)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the 1000-class head is replaced
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("fc.")]:
            raise InputError(
                f"{weights} does not hold {arch} weights ({len(missing)} missing, {len(unexpected)} unexpected keys);"
                f" pass a torchvision {arch} state dict, --weights imagenet or --weights none."
            )
    layers = [net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4]
    trunk = nn.Sequential(*layers[: 4 + cam_layer])
    model = CamResNet(trunk, last_channels(net, cam_layer))
    if init:
        torch.manual_seed(seed + 1)
        nn.init.normal_(model.fc.weight, std=0.01)
        nn.init.zeros_(model.fc.bias)
    return model


def last_channels(net: nn.Module, cam_layer: int) -> int:
    """Channels out of ``net``'s layer ``cam_layer`` (its last block's last batch norm)."""
    block = getattr(net, f"layer{cam_layer}")[-1]
    return (getattr(block, "bn3", None) or block.bn2).num_features


def torchvision_resnet(arch: str, cam_stride: int = 32, cam_layer: int = 4) -> nn.Module:
    """torchvision's own ResNet (random weights, 1000-class fc; what a plain PyTorch user builds: the
    benchmark's baseline) as ``build_model`` shapes it: layer4 as ``cam_stride`` asks, or with
    ``cam_layer`` 3 (2) no layer4 (nor layer3): identities, and fc on the last kept layer's channels."""
    check_cam(cam_layer, cam_stride)
    net = _full_resnet(arch, cam_stride, cam_layer, torchvision=True)
    if cam_layer < 4:
        net.fc = nn.Linear(last_channels(net, cam_layer), net.fc.out_features)
        for k in range(cam_layer + 1, 5):
            setattr(net, f"layer{k}", nn.Identity())
    return net


def _full_resnet(arch: str, cam_stride: int, cam_layer: int, torchvision: bool = False, init: bool = True) -> nn.Module:
    """The whole ResNet (layer4 included, so ImageNet weights load into it), ours or torchvision's own;
    layer4 drops its stride only when the map is layer4's (a layer3 map never sees it)."""
    drop = cam_stride == 16 and cam_layer == 4
    dilate = drop and check_arch(arch) != "resnet18"
    if torchvision:
        from torchvision import models

        net = getattr(models, arch)(weights=None, replace_stride_with_dilation=[False, False, dilate])
    else:
        net = ResNet(arch, dilate_layer4=dilate, init=init)
    if drop and arch == "resnet18":  # BasicBlock has no dilation: drop the stride alone
        net.layer4[0].conv1.stride = (1, 1)
        net.layer4[0].downsample[0].stride = (1, 1)
    return net
