"""The networks this project builds, named and checked without importing torch (a command that
only needs to know which model it will use should not wait ~4 s for torch to load), and where
their CAM cells sit."""

from __future__ import annotations

from ..errors import InputError
from .cam import CamGrid

ARCHS = ("resnet18", "resnet50", "resnet101")
WEIGHTS = ("imagenet", "none")  # or a path to a local file
CAM_STRIDES = (32, 16, 8)
CAM_LAYERS = (4, 3, 2)
# The stride `cxr-batch train --cam-layer N` builds unless told: layer4 without its last stride (16; dilated in
# ResNet-50/101), which learned where the plain layer4 (32, `--cam-stride 32`) did not on small images
# (docs/decisions/001-full-network.md); a map from layer3 has stride 16 and one from layer2 stride 8.
TRAIN_STRIDE = {4: 16, 3: 16, 2: 8}


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise InputError(f"Invalid arch {arch!r}. Only {', '.join(ARCHS)} are supported.")
    return arch


def check_cam(cam_layer: int, cam_stride: int) -> None:
    """The CAM's layer and stride, refused in one line when they do not make a network."""
    if cam_layer not in CAM_LAYERS:
        raise InputError(f"Invalid cam layer {cam_layer}. Only {', '.join(map(str, CAM_LAYERS))} are supported.")
    if cam_stride not in CAM_STRIDES:
        raise InputError(f"Invalid cam stride {cam_stride}. Only {', '.join(map(str, CAM_STRIDES))} are supported.")
    if cam_layer < 4 and cam_stride != TRAIN_STRIDE[cam_layer]:
        raise InputError(f"A CAM from layer{cam_layer} has stride {TRAIN_STRIDE[cam_layer]} (layer4, which alone can"
                         f" drop its stride, is not built); pass cam stride {TRAIN_STRIDE[cam_layer]} with cam layer"
                         f" {cam_layer}.")
    if cam_layer == 4 and cam_stride == 8:
        raise InputError("A CAM from layer4 has stride 32, or 16 with layer4 dilated; stride 8 is layer2's.")


def resnet_grid(cam_stride: int, input_size: int) -> CamGrid:
    """Where the last map's cells of one of these networks sit, without building it.

    receptive.cam_grid walks a built network's layers; for these ResNets every spatial layer (the
    7 x 7 stem with padding 3, the 3 x 3 max-pool and convolutions with padding 1, the dilated 3 x 3
    with padding 2, the 1 x 1 shortcuts) is centred on its window's middle, so cell j of any of
    them sits on input pixel ``stride * j``: offset 0. Tests check the two agree for every arch,
    layer and stride, and every Scorer checks it again on the network it built.
    """
    return CamGrid(int(cam_stride), 0.0, int(input_size))
