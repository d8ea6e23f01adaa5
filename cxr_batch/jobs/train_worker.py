"""What each Ray Train worker runs. Rank 0 alone writes; every rank calls ``ray.train.report``.

Imports only downwards (train_config, trainset, model, pixels, reports), never its driver
(train.py). What a user must see from a worker (unreadable images, a resume) travels in the
reported metrics as ``notes``, and the driver prints it: workers' own output stays in Ray's logs.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..archive import storage
from ..errors import InputError
from ..model.calibration import calibrated, fit_temperature, margins as logit_margins
from ..model.camloss import paired_loss, plain_loss
from ..model.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from ..model.network import build_model
from ..model.receptive import cam_grid
from ..pixels.transforms import normalize
from ..reports.metrics import ece, roc_auc
from .train_config import TrainSettings, best_epoch, calibrated_threshold, lr_at
from .trainset import augment, load_pixels, shard


def train_loop(config: dict) -> None:
    import ray.train
    from ray.train.torch import get_device

    s = TrainSettings(**config["settings"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device()
    torch.set_num_threads(max(1, int(s.cpus_per_worker)))
    torch.manual_seed(s.seed + rank)
    (train_x, train_y), (val_x, val_y), notes = _load_shards(config, s, rank, world)
    model = build_model(s.arch, s.weights, seed=s.seed, cam_stride=s.cam_stride, cam_layer=s.cam_layer).to(device)
    # channels_last on every device: oneDNN's native layout on a CPU as cuDNN's on a GPU; a training step
    # measured faster in it on CPUs too (docs/performance.md).
    model = model.to(memory_format=torch.channels_last)
    counts = np.asarray(config["class_counts"], np.float64)
    class_weight = torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32, device=device)
    loss_fn = nn.CrossEntropyLoss(weight=class_weight)
    ckpt_uri = storage.join(s.out, "last.ckpt")
    start, history, opt_state = _resume(model, ckpt_uri, s, rank, notes)
    # The CAM grid of the flip-consistency loss (model/camloss.py): the network's, so computed once.
    grid = cam_grid(model.trunk, s.image_size) if s.cam_consistency > 0 else None
    current = None
    for epoch in range(start, s.epochs + 1):
        phase, lr = lr_at(s, epoch)
        if phase != current:  # a new phase: new trainable set, so a new optimizer and DDP wrapper
            ddp, opt = _phase_model(model, phase, lr, s, device, world)
            if opt_state is not None and opt_state.get("phase") == phase:
                opt.load_state_dict(opt_state["state"])
            opt_state, current = None, phase
        for g in opt.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        tr = _train_epoch(ddp, model, opt, loss_fn, train_x, train_y, s, epoch, rank, device, phase, grid)
        train_seconds = time.perf_counter() - t0
        va = _evaluate(model, val_x, val_y, s, device, loss_fn)
        row = _epoch_row(epoch, phase, lr, tr, va, train_seconds, len(train_y))
        history = history + [row]
        if rank == 0:
            _save(model, opt, s, row, history, phase, config.get("validation"))
        _report(row, notes, rank)
        notes = []  # said once per start of the worker group
        if s.stop_after_epoch is not None and epoch >= s.stop_after_epoch:
            break


def _load_shards(config: dict, s: TrainSettings, rank: int, world: int):
    """This rank's train and val shards, decoded; notes for the user about unreadable images."""
    train_x, train_y, skipped = load_pixels(s.data, shard(config["train"], rank, world, s.seed), s.image_size,
                                            s.max_pixels)
    val_x, val_y, vskipped = load_pixels(s.data, shard(config["val"], rank, world, s.seed), s.image_size,
                                         s.max_pixels)
    notes = []
    if skipped or vskipped:
        path, reason = (skipped + vskipped)[0]
        notes.append(f"rank {rank}: skipped {len(skipped) + len(vskipped)} unreadable images, e.g. {path}: {reason}")
    if skipped and not len(train_y):  # training on nothing would "finish" with empty metrics
        raise InputError(f"None of rank {rank}'s {len(skipped)} training images could be read, e.g."
                         f" {skipped[0][0]}: {skipped[0][1]}")
    return (train_x, train_y), (val_x, val_y), notes


def _resume(model, ckpt_uri: str, s: TrainSettings, rank: int, notes: list) -> tuple[int, list, dict | None]:
    """(first epoch to run, history so far, optimizer state) from last.ckpt when there is one: a
    re-run, or Ray restarting the worker group after a worker died."""
    if not storage.exists(ckpt_uri):
        return 1, [], None
    ck = load_checkpoint(ckpt_uri).ckpt  # the driver checked it is ours and of these settings (train.check_resumable)
    model.load_state_dict(ck["state_dict"])
    if rank == 0:
        notes.append(f"resuming from {ckpt_uri}: epoch {ck['epoch']} of {s.epochs} done")
    return ck["epoch"] + 1, ck["history"], ck.get("optimizer")


def _report(row: dict, notes: list, rank: int) -> None:
    """Every rank reports (it is a barrier); rank 0 with a marker checkpoint, so that Ray Train keeps
    the metrics. ``notes`` are lines the driver prints for the user."""
    import ray.train

    report = {k: v for k, v in row.items() if isinstance(v, (int, float)) and v is not None}
    report["notes"] = notes
    if rank != 0:
        ray.train.report(report)
        return
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/epoch.json", "w") as f:
            json.dump(row, f)  # the weights live in last.ckpt; Ray tracks this marker
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))


def _phase_model(model, phase, lr, s, device, world):
    """Freeze the trunk in warm-up (its BatchNorm statistics too). DDP is rebuilt per phase because
    it records which parameters need gradients when it is constructed."""
    frozen = phase == "warmup"
    for p in model.trunk.parameters():
        p.requires_grad_(not frozen)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=s.weight_decay)
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        ddp = model
    return ddp, opt


def _train_epoch(ddp, model, opt, loss_fn, x, y, s, epoch, rank, device, phase, grid):
    on_gpu = device.type == "cuda"
    model.train()
    if phase == "warmup":
        model.trunk.eval()
    gen = torch.Generator().manual_seed(s.seed * 1000 + epoch * 10 + rank)
    order = torch.randperm(len(y), generator=gen)
    pairs = s.cam_consistency > 0  # each image with its mirrored twin: half as many images per step
    per_step = max(1, s.batch_size // 2) if pairs else s.batch_size
    # Every rank must run the same number of steps (DDP all-reduces each one): pad short shards.
    steps = _global_max(math.ceil(len(y) / per_step) if len(y) else 0, device)
    # Sums stay on the device: a float() per step would wait for the GPU every step.
    total_loss, correct, n = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.int64), 0
    for step in range(steps):
        idx = order[(torch.arange(per_step) + step * per_step) % max(1, len(y))]
        xb = normalize(augment(torch.from_numpy(x[idx.numpy()]).to(device), gen, translate=s.translate), channels_last=True)
        yb = torch.from_numpy(y[idx.numpy()]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            if pairs:
                loss, cls_loss, logits = paired_loss(ddp, model.fc, xb, yb, loss_fn, weight=s.cam_consistency,
                                                     grid=grid, step=step, quiet=s.cam_quiet)
            else:
                loss, cls_loss, logits = plain_loss(ddp, model.fc, xb, yb, loss_fn, quiet=s.cam_quiet)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total_loss += cls_loss.detach() * len(yb)  # the classification loss alone: comparable across weights
        correct += (logits.argmax(1) == yb).sum()
        n += len(yb)
    t = _all_reduce([float(total_loss), int(correct), n], device)
    return {"loss": t[0] / max(1, t[2]), "acc": t[1] / max(1, t[2])}


@torch.no_grad()
def _evaluate(model, x, y, s, device, loss_fn):
    """Val metrics over ALL ranks' shards: gather every logit margin, then compute once.

    The temperature is fitted here, every epoch, on these gathered margins, and the threshold is
    that of the calibrated probabilities: best.ckpt then carries its own epoch's pair."""
    on_gpu = device.type == "cuda"
    model.eval()
    margins, losses = [], 0.0
    for i in range(0, len(y), s.batch_size):
        xb = normalize(torch.from_numpy(x[i:i + s.batch_size]).to(device), channels_last=True)
        yb = torch.from_numpy(y[i:i + s.batch_size]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            logits, _ = model(xb)
        losses += float(loss_fn(logits.float(), yb)) * len(yb)
        logits = logits.float()
        margins.append(logit_margins(logits).cpu().numpy())
    m = np.concatenate(margins) if margins else np.zeros(0, np.float32)
    gathered = _all_gather((m.tolist(), y.tolist(), losses))
    m_all = np.concatenate([np.asarray(g[0], np.float64) for g in gathered])
    y_all = np.concatenate([np.asarray(g[1], np.int64) for g in gathered])
    loss = sum(g[2] for g in gathered) / max(1, len(y_all))
    fit = fit_temperature(m_all, y_all)
    p_all = calibrated(m_all, fit["temperature"])
    threshold, rule = calibrated_threshold(y_all, m_all, fit["temperature"], s.target_sensitivity)
    auc = roc_auc(y_all, p_all) if len(set(y_all.tolist())) == 2 else float("nan")
    eces = [ece(y_all, p) if len(y_all) else None for p in (calibrated(m_all, 1.0), p_all)]
    return {"loss": loss, "acc": float(((p_all >= threshold) == y_all).mean()) if len(y_all) else float("nan"),
            "acc_at_0.5": float(((p_all >= 0.5) == y_all).mean()) if len(y_all) else float("nan"),
            "auc": None if np.isnan(auc) else float(auc), "threshold": threshold, "threshold_rule": rule,
            "n": int(len(y_all)), "temperature": fit["temperature"], "temperature_note": fit["note"],
            "ece_before": eces[0], "ece_after": eces[1]}


def _epoch_row(epoch, phase, lr, tr, va, seconds, n_local):
    return {"epoch": epoch, "phase": phase, "lr": lr, "train_loss": tr["loss"], "train_acc": tr["acc"],
            "val_loss": va["loss"], "val_acc": va["acc"], "val_acc_at_0.5": va["acc_at_0.5"], "val_auc": va["auc"],
            "threshold": va["threshold"], "threshold_rule": va["threshold_rule"], "val_n": va["n"],
            "temperature": va["temperature"], "temperature_note": va["temperature_note"],
            "val_ece_before": va["ece_before"], "val_ece_after": va["ece_after"],
            "epoch_seconds": seconds, "images_per_s_per_worker": n_local / seconds if seconds > 0 else 0.0}


def _save(model, opt, s, row, history, phase, validation):
    """last.ckpt every epoch, then best.ckpt when this epoch is the best so far (train_config.best_epoch).
    ``validation``: which files validated (and how they were grouped), kept in the checkpoint."""
    ck = make_checkpoint(model, arch=s.arch, image_size=s.image_size, threshold=row["threshold"], settings=asdict(s),
                         cam_stride=s.cam_stride, cam_layer=s.cam_layer, temperature=row["temperature"],
                         validation=validation,
                         epoch=row["epoch"], metrics=row, history=history,
                         optimizer={"phase": phase, "state": opt.state_dict()})
    # last.ckpt first: it is what a re-run resumes from, so a run stopped between the two writes never
    # has a best.ckpt of an epoch that its resume point (and history) does not know of.
    save_checkpoint(ck, storage.join(s.out, "last.ckpt"))
    if best_epoch(history)["epoch"] == row["epoch"]:
        save_checkpoint({**ck, "optimizer": None}, storage.join(s.out, "best.ckpt"))  # scoring needs no optimizer state
    storage.write_bytes_atomic(storage.join(s.out, "history.json"), json.dumps(history, indent=1).encode())


def _all_reduce(values, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _global_max(value: int, device) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _all_gather(obj):
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]
