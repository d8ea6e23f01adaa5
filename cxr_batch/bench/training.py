"""(e) Training throughput: one Ray Train worker of `cxr-batch train` beside a plain PyTorch loop, in one run.

Both train the same model (built the same way, from scratch), at the same precision (what the worker
uses on this device: fp32 on a CPU, bf16 autocast on a GPU), batch size and augmentation, on the same
decoded images, with as many torch threads as the worker gets. What differs is only the machinery
around the step: Ray Train's worker process, its thread setting, the per-epoch all-reduces and the
checkpoint writes. Both rates count images the way the worker's history does (training images /
seconds of the epoch's training steps, validation left out), and the worker's rate is its last
epoch's, after the first one paid for the allocator and the one-time set-up, as the plain loop's
warm-up step does.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path


def train_check(s, work: Path, device: str, *, log=print) -> dict:
    """Run the plain loop, then `run_train` with one worker; needs a running Ray (the benchmark's)."""
    from ..jobs.ray_env import node_cpus
    from ..jobs.train import run_train
    from ..jobs.train_config import TrainSettings, fit_worker_cpus
    from ..jobs.trainset import load_pixels, make_split
    from ..pixels.decode import DEFAULT_MAX_PIXELS

    archive = _archive(work, s)
    split = make_split(str(archive), val_fraction=0.1, seed=s.seed)
    x, y, _ = load_pixels(str(archive), split.train, s.train_image_size, DEFAULT_MAX_PIXELS)
    use_gpu = device == "cuda"
    threads = int(fit_worker_cpus(1, node_cpus(), use_gpu))  # what the worker will get
    ts = TrainSettings(data=str(archive), out=str(work / "train-run"), arch=s.train_model, weights="none",
                       epochs=s.train_epochs, batch_size=s.batch_size, image_size=s.train_image_size, workers=1,
                       gpu=use_gpu, seed=s.seed)
    plain = plain_train_rate(x, y, s.train_model, batch_size=s.batch_size, threads=threads, device=device,
                             seed=s.seed, cam_stride=ts.cam_stride, cam_layer=ts.cam_layer,
                             translate=ts.translate)
    log(f"(e) plain PyTorch training loop, {threads} threads: {plain:.2f} images/s")
    out = Path(ts.out)
    shutil.rmtree(out, ignore_errors=True)  # a re-run of an --out resumes it: start afresh
    t0 = time.perf_counter()
    summary = run_train(ts, register=False, echo=lambda *a: None)

    history = json.loads((out / "history.json").read_text())
    settings = json.loads((out / "settings.json").read_text())
    ray_rate = history[-1]["images_per_s_per_worker"]
    log(f"(e) cxr-batch train, 1 worker x {settings['cpus_per_worker']:g} CPUs: {ray_rate:.2f} images/s")
    return {"model": s.train_model, "image_size": s.train_image_size, "images": int(len(y)),
            "batch_size": s.batch_size, "epochs": s.train_epochs, "threads": threads,
            "worker_cpus": settings["cpus_per_worker"], "plain_images_per_s": round(plain, 2),
            "worker_images_per_s": round(ray_rate, 2), "worker_over_plain": round(ray_rate / plain, 2),
            "run_seconds": round(time.perf_counter() - t0, 1), "val_auc": summary["val_auc"]}


def plain_train_rate(x, y, arch: str, *, batch_size: int, threads: int, device: str, seed: int,
                     cam_stride: int, cam_layer: int, translate: float = 0.0) -> float:
    """Images/s of a plain training loop over uint8 (N, S, S) images ``x`` with labels ``y``: one
    warm-up step, then one epoch's steps (ceil(N / batch), the last batch wrapped around as the
    worker pads it), timed; N / seconds, as the worker counts."""
    import numpy as np
    import torch
    from torch import nn

    from ..jobs.trainset import augment
    from ..model.network import build_model
    from ..pixels.transforms import normalize

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dev = torch.device(device)
        model = build_model(arch, "none", seed=seed, cam_stride=cam_stride, cam_layer=cam_layer).to(dev)
        # the worker's layout (channels_last on every device), so that worker/plain measures what Ray Train
        # costs, not the layout's gain
        model = model.to(memory_format=torch.channels_last).train()
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
        loss_fn = nn.CrossEntropyLoss()
        gen = torch.Generator().manual_seed(seed)
        n = len(y)
        order = torch.randperm(n, generator=gen)
        steps = math.ceil(n / batch_size)

        def step(k: int):
            idx = order[(torch.arange(batch_size) + k * batch_size) % n].numpy()
            xb = normalize(augment(torch.from_numpy(x[idx]).to(dev), gen, translate=translate), channels_last=True)
            yb = torch.from_numpy(np.asarray(y)[idx]).to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                logits, _ = model(xb)
                loss = loss_fn(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach()

        step(0)  # warm-up: allocator, kernels
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for k in range(steps):
            loss = step(k)
        float(loss)  # waits for the device
        return n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)


def _archive(work: Path, s) -> Path:
    """A labelled phantom archive for training (kept for the next run with the same settings)."""
    from ..synth.archive import make_archive

    root = work / f"train-archive-{s.train_images}-{s.train_side}-seed{s.seed}"
    if not (root / "truth.csv").exists():
        shutil.rmtree(root, ignore_errors=True)
        # val/ with 60 images: the training job validates on it instead of splitting train/.
        make_archive(root, n_train=s.train_images, n_val=60, n_test=0, size=s.train_side, seed=s.seed)
    return root
