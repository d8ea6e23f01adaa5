"""Train a small model in this process with the training workers' own steps (jobs/train_worker.py),
without Ray Train: for tests that need a trained checkpoint but not the distributed job, which
`test_train.py` covers. Writes what `cxr-batch train` writes: last.ckpt, best.ckpt, history.json."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cxr_batch.jobs import train_worker as w
from cxr_batch.jobs.train_config import TrainSettings, lr_at
from cxr_batch.jobs.trainset import load_pixels, make_split
from cxr_batch.model.network import build_model


def train_here(data, out, **settings) -> tuple[TrainSettings, object]:
    """-> (the settings, the Split) of a finished run in ``out``."""
    s = TrainSettings(data=str(data), out=str(out), arch="resnet18", weights="none", workers=1, cpus_per_worker=1,
                      **settings)
    split = make_split(s.data, val_fraction=s.val_fraction, seed=s.seed)
    x, y, _ = load_pixels(s.data, split.train, s.image_size, s.max_pixels)
    vx, vy, _ = load_pixels(s.data, split.val, s.image_size, s.max_pixels)
    torch.manual_seed(s.seed)
    model = build_model(s.arch, s.weights, seed=s.seed, cam_stride=s.cam_stride, cam_layer=s.cam_layer)
    model = model.to(memory_format=torch.channels_last)
    counts = np.bincount(y, minlength=2).astype(np.float64)
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(counts.sum() / (2 * counts), dtype=torch.float32))
    device, history, current = torch.device("cpu"), [], None
    for epoch in range(1, s.epochs + 1):
        phase, lr = lr_at(s, epoch)
        if phase != current:
            ddp, opt = w._phase_model(model, phase, lr, s, device, 1)
            current = phase
        for g in opt.param_groups:
            g["lr"] = lr
        tr = w._train_epoch(ddp, model, opt, loss_fn, x, y, s, epoch, 0, device, phase, None)
        va = w._evaluate(model, vx, vy, s, device, loss_fn)
        history.append(w._epoch_row(epoch, phase, lr, tr, va, 1.0, len(y)))
        w._save(model, opt, s, history[-1], history, phase, split.record())
    return s, split
