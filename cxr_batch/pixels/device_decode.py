"""JPEG decoding on the model's device: batched nvJPEG on a GPU (torchvision.io.decode_jpeg), and the
same call on a CPU (libjpeg-turbo), so that the tests run this code where there is no GPU.

Why: on a GPU node the CPUs, not the GPU, set the rate (docs/performance.md: the GPU waits for the
CPUs decoding JPEGs and encoding PNGs). With ``--decode-on device`` the decode stage only reads,
hashes and checks each JPEG's header (``device_jpeg_header``: a small share of a full decode's
cost) and the Scorer decodes the batch where the model runs (``decode_on_device``).

Only what the device decodes exactly as the CPU path would goes there: whole (ending in EOI), single-
frame, 8-bit grayscale or RGB JPEGs within --max-pixels. Everything else (PNG, DICOM, CMYK, truncated
or mislabelled files) is decoded on the CPU as before, so its errors stay those of pixels/decode.py;
a file the device fails on is decoded again on the CPU by the caller, whose error the row then gets.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image

JPEG_SOI, JPEG_EOI = b"\xff\xd8", b"\xff\xd9"


def device_jpeg_header(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    """(width, height) when ``data`` is a JPEG the device may decode; None: decode it on the CPU."""
    # A truncated stream decodes on some backends as a grey tail; the CPU path refuses it.
    if not data.startswith(JPEG_SOI) or not data.rstrip(b"\0").endswith(JPEG_EOI):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels is checked below
            im = Image.open(io.BytesIO(data))  # the header only: no pixels are decoded here
        if im.format != "JPEG" or im.mode not in ("L", "RGB") or getattr(im, "n_frames", 1) > 1:
            return None
        width, height = im.size
    except Exception:  # any header PIL cannot read: the CPU decoder says why, as a row's error
        return None
    return (width, height) if 0 < width * height <= max_pixels else None


def decode_on_device(blobs: list[bytes], size: int, device) -> list:
    """Decode ``blobs`` (JPEG files) on ``device`` in one batched call and resize each to uint8
    (size, size), antialiased bilinear as PIL's resize in to_model_pixels. One entry per blob: the
    (size, size) array, or the exception where the device could not decode that file."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    try:
        images = decode_jpeg(tensors, mode=ImageReadMode.GRAY, device=device)
    except Exception:  # one bad stream fails the whole call: find it file by file
        images = [_decode_one(t, device) for t in tensors]
    good = [i for i, im in enumerate(images) if not isinstance(im, Exception)]
    out = list(images)
    if good:  # one device-to-host copy for the batch, not one per image
        squares = torch.stack([_square(images[i], size) for i in good]).cpu().numpy()
        for k, i in enumerate(good):
            out[i] = squares[k]
    return out


def _decode_one(tensor, device):
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(tensor, mode=ImageReadMode.GRAY, device=device)
    except Exception as e:
        return e


def _square(image, size: int):
    """(1, H, W) uint8 -> (size, size) uint8, on the same device: the whole image squashed to a square
    (no crop, no letterbox), as pixels/transforms.to_model_pixels does."""
    import torch

    x = image[None].float()
    if x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)[0, 0]
