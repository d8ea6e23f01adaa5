"""(a) The yardstick: plain PyTorch as a tutorial reader writes it (PIL Dataset, torchvision
transforms, DataLoader, fp32 loop, matplotlib CAM PNGs, pandas Parquet). It opens its files with
PIL directly, on purpose: it is the code a reader would write, not ours."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .. import CLASSES, POSITIVE

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class XrayFiles:
    """A map-style torch Dataset: one file -> (normalised RGB tensor, path)."""

    def __init__(self, root, paths, transform):
        self.root, self.paths, self.transform = root, paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        image = Image.open(os.path.join(self.root, self.paths[i])).convert("RGB")
        return self.transform(image), self.paths[i]


def baseline_pytorch(archive: str, paths: list[str], state_dict: dict, arch: str, out: Path, *,
                     batch_size: int, device: str = "cpu", cam_stride: int = 32, cam_layer: int = 4,
                     threshold: float = 0.5, temperature: float = 1.0, num_workers: int = 2) -> None:
    """The yardstick. Written plainly on purpose: no tuning a tutorial would not have."""
    import matplotlib
    import pandas as pd
    import torch
    from torch.utils.data import DataLoader
    from torchvision import transforms as T

    transform = T.Compose([T.Resize(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    # DataLoader forks its workers; after Ray has started threads in this process, forkserver is safer.
    ray = sys.modules.get("ray")  # not imported here: a machine without Ray runs the baseline too
    context = "forkserver" if ray is not None and ray.is_initialized() else None
    loader = DataLoader(XrayFiles(archive, paths, transform), batch_size=batch_size, num_workers=num_workers,
                        multiprocessing_context=context)
    from ..model.network import torchvision_resnet

    # torchvision's own ResNet, as a tutorial builds it, shaped as the checkpoint's network (trained
    # cxr-batch models end at layer3: cam_layer 3), or it would be another network.
    net = torchvision_resnet(arch, cam_stride, cam_layer)
    net.fc = torch.nn.Linear(net.fc.in_features, len(CLASSES))
    net.load_state_dict(_torchvision_names(state_dict))
    net.eval().to(device)
    features = {}
    last = getattr(net, f"layer{cam_layer}")  # the layers after it are identities (torchvision_resnet)
    last.register_forward_hook(lambda module, inputs, output: features.update(last=output))
    jet = matplotlib.colormaps["jet"]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    cam_dir = out.parent / (out.stem + "-cams")
    rows = []
    with torch.no_grad():
        for images, names in loader:
            probs = torch.softmax(net(images.to(device)) / temperature, dim=1)[:, POSITIVE].cpu()
            cams = torch.einsum("bchw,c->bhw", features["last"], net.fc.weight[POSITIVE])
            cams = torch.nn.functional.interpolate(cams[:, None], size=images.shape[-2:], mode="bilinear")[:, 0].cpu()
            for image, name, prob, cam in zip(images, names, probs, cams):
                cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-8)
                heat = jet(cam.numpy())[..., :3]
                base = (image * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
                png = cam_dir / (name + ".png")
                png.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray((255 * (0.55 * base + 0.45 * heat)).astype(np.uint8)).save(png)
                rows.append({"path": name, "prob_pneumonia": float(prob),
                             # the checkpoint's own decision threshold, so labels compare like with like
                             "pred": CLASSES[POSITIVE] if prob >= threshold else CLASSES[1 - POSITIVE],
                             "cam_path": str(png)})
    pd.DataFrame(rows).to_parquet(out)


def _torchvision_names(state: dict) -> dict:
    """CamResNet keys (trunk.0 ... trunk.7, fc) -> torchvision ResNet keys (conv1 ... layer4, fc)."""
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    out = {}
    for k, v in state.items():
        if k.startswith("trunk."):
            _, i, rest = k.split(".", 2)
            k = f"{names[int(i)]}.{rest}"
        out[k] = v
    return out
