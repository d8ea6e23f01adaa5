"""Real ResNet trunks with weights that make their geometry visible (shared by the CAM tests)."""

import torch
from torch import nn

from cxr_batch.model.network import build_model


def point_spread_trunk(arch, cam_stride, cam_layer=4):
    """The real trunk, with weights that make every layer a narrow symmetric blur (the same for every
    channel) and batch norm the identity: its features answer one bright pixel with a
    single peak at the cell whose receptive field is centred nearest that pixel."""
    trunk = build_model(arch, "none", cam_stride=cam_stride, cam_layer=cam_layer).trunk.eval()
    with torch.no_grad():
        for m in trunk.modules():
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0]
                # Narrow: a wide blur, 100 layers deep, reaches far past the image, and zero padding
                # then pulls the answer to a pixel near the border inwards.
                t = torch.exp(-(((torch.arange(k) - (k - 1) / 2) / 0.7) ** 2))
                kernel = t[:, None] * t[None, :]
                m.weight.copy_((kernel / kernel.sum() / m.in_channels).expand_as(m.weight))
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
                m.reset_running_stats()
    return trunk


def bright_pixel_map(trunk, size, py, px):
    x = torch.zeros(1, 3, size, size)
    x[0, :, py, px] = 1.0
    with torch.no_grad():
        return trunk(x)[0].sum(0).numpy()
