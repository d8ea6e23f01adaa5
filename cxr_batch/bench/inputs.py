"""What the benchmark measures on: a phantom archive (kept between runs) and, for an untrained
head, a calibrated checkpoint whose probabilities spread around 0.5 (see the package docstring)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .. import CLASSES, POSITIVE
from ..errors import InputError


def make_bench_archive(root, n: int, min_side: int, max_side: int, *, seed: int = 0) -> Path:
    """``n`` phantom JPEGs (quality 90) of random square sides under root/{NORMAL,PNEUMONIA}/.
    Kept between runs: a second call with the same arguments only checks the marker file."""
    root = Path(root)
    params = {"n": n, "min_side": min_side, "max_side": max_side, "seed": seed}
    marker = root / "benchmark-archive.json"
    if marker.exists() and json.loads(marker.read_text()) == params:
        return root
    if root.exists() and any(root.iterdir()):
        raise InputError(f"{root} holds something other than this benchmark's archive; pass an empty --workdir.")
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    # Image i depends only on (seed, i), so any number of processes write the same archive. A
    # large phantom is slow to draw, so on a many-CPU GPU host the pool turns minutes into seconds.
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    work = partial(_bench_image, root=str(root), min_side=min_side, max_side=max_side, seed=seed)
    procs = min(n, os.cpu_count() or 1)
    if procs > 1:
        import multiprocessing

        with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(work, range(n), chunksize=max(1, n // (4 * procs))))
    else:
        for i in range(n):
            work(i)
    marker.write_text(json.dumps(params) + "\n")
    return root


def _bench_image(i: int, *, root: str, min_side: int, max_side: int, seed: int) -> None:
    from ..synth.phantom import JPEG_QUALITY, phantom

    rng = np.random.default_rng([seed, i])
    side, positive = int(rng.integers(min_side, max_side + 1)), i % 2 == 1
    pixels, _ = phantom(rng, side, opacity=positive)
    Image.fromarray(pixels).save(os.path.join(root, CLASSES[int(positive)], f"bench-{i:05d}.jpeg"),
                                 quality=JPEG_QUALITY)


def calibrated_checkpoint(spec: str, archive: str, paths: list[str], dst: Path, *, seed: int = 0,
                          network: tuple[int, int] | None = None) -> str:
    """The model of ``spec`` with batch-norm statistics re-estimated on up to 32 of ``paths`` and a
    seeded random head standardised on them (see the module docstring); saved as a checkpoint.
    ``network``: (cam_stride, cam_layer) to rebuild an ARCH:WEIGHTS spec as, with the same weights:
    (16, 3) ends it at layer3, as `cxr-batch train` does from pretrained weights; (16, 4) dilates layer4
    (~27% more compute in ResNet-101); None keeps the spec's own network."""
    import torch

    from ..model.checkpoint import make_checkpoint, save_checkpoint
    from ..model.registry import describe, load
    from ..jobs.score_stages import decode_batch
    from ..pixels.transforms import normalize

    if dst.exists():
        return str(dst)
    info = describe(spec)
    if network is None or network == (info.cam_stride, info.cam_layer):
        model, network = load(info), (info.cam_stride, info.cam_layer)
    else:
        from ..model.network import build_model
        from ..model.registry import parse_arch_spec

        arch, weights = parse_arch_spec(info.spec)
        model = build_model(arch, weights, cam_stride=network[0], cam_layer=network[1]).eval()  # load()'s weights
    sample = paths[:: max(1, len(paths) // 32)][:32]
    batch = decode_batch({"path": sample}, archive=archive, image_size=info.image_size, max_pixels=10**9)
    x = normalize(torch.from_numpy(batch["pixels"]))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # a cumulative average over the calibration batches
        model.train()
        for chunk in x.split(16):
            model(chunk)
        model.eval()
        _, features = model(x)
        pooled = features.mean(dim=(2, 3))
        direction = torch.randn(pooled.shape[1], generator=torch.Generator().manual_seed(seed))
        proj = pooled @ (direction / direction.norm())
        centre, spread = proj.median(), proj.std().clamp_min(1e-6)
        w = direction / direction.norm() / spread
        # logit(PNEUMONIA) - logit(NORMAL) = 2 (proj - centre) / spread: about N(0, 2) over the archive
        model.fc.weight.copy_(torch.stack([-w, w]) if POSITIVE == 1 else torch.stack([w, -w]))
        model.fc.bias.copy_(torch.tensor([1.0, -1.0]) * centre / spread * (1 if POSITIVE == 1 else -1))
    ckpt = make_checkpoint(model, arch=info.arch, image_size=info.image_size, threshold=0.5,
                           cam_stride=network[0], cam_layer=network[1],
                           settings={"derived_from": spec, "by": "cxr_batch.bench.inputs.calibrated_checkpoint",
                                     "seed": seed, "calibration_images": len(sample)})
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(ckpt, str(dst))
    return str(dst)
