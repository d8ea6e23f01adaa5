"""(c) The model alone on in-memory tensors, and the JPEG decode check (PIL on one core against
nvJPEG on a GPU)."""

from __future__ import annotations

import time

from ..archive import storage
from ..errors import one_line


def bare_forward(spec: str, *, precision: str, compile: bool, batch_size: int, batches: int,
                 device: str = "cpu") -> float:
    """Images/s of the Scorer's own model preparation and forward on in-memory tensors (warm)."""
    import torch

    from ..model.registry import describe, load
    from ..jobs.score_stages import prepare_model
    from ..pixels.transforms import normalize

    info = describe(spec)
    dev = torch.device(device)
    model = prepare_model(load(info), dev, channels_last=True, compile=compile, precision=precision,
                          image_size=info.image_size)
    g = torch.Generator().manual_seed(0)
    x = normalize(torch.randint(0, 256, (batch_size, info.image_size, info.image_size), dtype=torch.uint8,
                                generator=g).to(dev), channels_last=True)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        model(x)  # warm-up: oneDNN/cuDNN pick their kernels (and torch.compile compiles) on the first call
        model(x)
        sync()
        t0, done = time.perf_counter(), 0
        # At least ``batches`` batches and 2 s: a GPU runs 6 batches in well under a second.
        while done < batches or time.perf_counter() - t0 < 2.0:
            model(x)
            done += 1
            if done % batches == 0:
                sync()
        sync()
        return done * batch_size / (time.perf_counter() - t0)


def decode_check(archive: str, paths: list[str], *, image_size: int, device: str, limit: int = 256) -> dict:
    """Images/s of the decode stage's own work (PIL reduced-scale decode + resize, one core) and, on a
    GPU, of torchvision's nvJPEG decode + antialiased resize on the GPU, on the same files in memory."""
    from ..pixels.decode import decode_image
    from ..pixels.transforms import to_model_pixels

    blobs = [storage.read_file(archive, p) for p in paths[:limit]]
    t0 = time.perf_counter()
    for data in blobs:
        to_model_pixels(decode_image(data, draft=image_size).gray, image_size)
    out = {"images": len(blobs), "pil_draft_per_core_images_per_s": round(len(blobs) / (time.perf_counter() - t0), 1)}
    if device == "cuda":
        try:
            out["gpu_nvjpeg_images_per_s"] = _gpu_decode_rate(blobs, image_size)
        except Exception as e:  # report, don't lose the rest of the benchmark
            out["gpu_error"] = f"{type(e).__name__}: {one_line(e, 300)}"
    return out


def _gpu_decode_rate(blobs: list[bytes], image_size: int) -> float:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]

    def gpu_decode(chunk):
        imgs = decode_jpeg(chunk, mode=ImageReadMode.GRAY, device="cuda")
        return torch.cat([torch.nn.functional.interpolate(im[None].float(), size=(image_size, image_size),
                                                          mode="bilinear", antialias=True) for im in imgs])

    gpu_decode(tensors[:8])  # warm-up: nvJPEG handles
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, len(tensors), 64):
        gpu_decode(tensors[i: i + 64])
    torch.cuda.synchronize()
    return round(len(blobs) / (time.perf_counter() - t0), 1)
