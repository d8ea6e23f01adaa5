"""Wrap a state dict saved by cam_train.py (a ResNet-18 ending at layer3) as a cxr-batch checkpoint, so that
cam_offset_why.py dump scores it through the shipped stages: python cam_ckpt.py /tmp/camexp/L3s2e24.pt OUT.ckpt"""
import sys

import torch

from cxr_batch.model.checkpoint import make_checkpoint, save_checkpoint
from cxr_batch.model.network import build_model

src, dst = sys.argv[1], sys.argv[2]
m = build_model("resnet18", "none", cam_stride=16, cam_layer=3)
m.load_state_dict(torch.load(src, weights_only=True))
save_checkpoint(make_checkpoint(m, arch="resnet18", image_size=224, threshold=0.5, settings={"from": src},
                                cam_stride=16, cam_layer=3), dst)
