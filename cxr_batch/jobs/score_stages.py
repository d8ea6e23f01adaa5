"""Worker code of the scoring job: what runs inside Ray Data's tasks and actors.

  decode_batch   CPU tasks: read bytes, hash, decode, resize to the model's input
  Scorer         the model actor pool: forward pass -> P(PNEUMONIA) and the CAM
  finish_batch   CPU tasks: CAM peak and overlay PNG, written off the model's path

Imports only downwards (pixels, archive, model), never the driver (score.py). The decode and
finish workers import no torch: Scorer and the CAM maths import it inside, where they run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .. import CLASSES, POSITIVE
from ..archive import storage
from ..archive.discover import label_from_path
from ..archive.results import TEXT_COLUMNS, cam_uri
from ..errors import DecodeError, one_line
from ..pixels.decode import decode_image
from ..pixels.gray import to_u8
from ..pixels.transforms import to_model_pixels


@dataclass(frozen=True)
class StageConfig:
    """What the stage callables are given, whichever engine schedules them (Ray Data or the local
    engine): keyword arguments for each, and the batch sizes. Built once by the driver."""

    decode: dict = field(default_factory=dict)  # decode_batch(batch, **decode)
    scorer: dict = field(default_factory=dict)  # Scorer(**scorer)
    finish: dict = field(default_factory=dict)  # finish_batch(batch, **finish)
    batch_size: int = 16  # images per forward pass
    # Rows per decode and finish call: a multiple of batch_size, so that no forward pass is cut short.
    decode_rows: int = 32


# ---------------------------------------------------------------- stage 1: decode (CPU tasks)

def decode_batch(batch: dict, *, archive: str, image_size: int, max_pixels: int) -> dict:
    n = len(batch["path"])
    out = {k: [None] * n for k in TEXT_COLUMNS}  # every text column of the schema travels from here on
    out.update(path=list(batch["path"]), bytes=np.full(n, -1, np.int64),
               width=np.zeros(n, np.int32), height=np.zeros(n, np.int32),
               pixels=np.zeros((n, image_size, image_size), np.uint8))
    for i, rel in enumerate(out["path"]):
        out["label"][i] = label_from_path(rel)
        try:
            data = storage.read_file(archive, rel)
            out["bytes"][i] = len(data)
            out["sha256"][i] = hashlib.sha256(data).hexdigest()
            d = decode_image(data, max_pixels=max_pixels, draft=image_size)
            out["pixels"][i] = to_model_pixels(d.gray, image_size)
            out["width"][i], out["height"][i], out["format"][i] = d.width, d.height, d.format
            for k in d.meta.keys() & set(TEXT_COLUMNS):  # the DICOM attributes the schema has
                out[k][i] = d.meta[k]
        except DecodeError as e:
            out["error"][i] = str(e)
        except Exception as e:  # never let one file take down a batch of good ones
            out["error"][i] = f"unexpected {type(e).__name__}: {one_line(e)}"
    return {k: np.asarray(v, dtype=object) if isinstance(v, list) else v for k, v in out.items()}


def _strings(column) -> list:
    """An object column as str/None. Ray Data hands a column that is None in every row of a block
    to the next stage as float NaN: without this, a block of all-good images reads as all errors."""
    return [None if v is None or (isinstance(v, (float, np.floating)) and np.isnan(v)) else v for v in column]


# ---------------------------------------------------------------- stage 2: model (actor pool)

def prepare_model(model, device, *, channels_last: bool, compile: bool):
    """Inference-only rewrites of an eval-mode CamResNet; same outputs, less work per image.

    Batch norm is folded into the preceding convolutions (5-7% less CPU time per image on
    ResNet-101, fp32 and bf16). channels_last is oneDNN's native layout. torch.compile with
    freezing takes ~1 min per actor on CPU and then saves another ~15%: worth it only for archives
    of many thousands of images per actor.
    """
    import torch
    from torch.fx.experimental.optimization import fuse

    model = fuse(model.eval().to(device), inplace=True)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        import torch._inductor.config

        torch._inductor.config.freezing = True  # constant-fold the weights: this process only infers
        model = torch.compile(model)
    return model


def auto_precision(device_type: str, native: bool) -> str:
    """``--precision auto``: bf16 autocast where the hardware computes bf16 natively, else fp32.

    Native bf16 (a CUDA GPU of compute capability 8+, a CPU with AVX512-BF16 or AMX) ran ResNet-101
    2.06x as fast as fp32 on 2 Zen 4 CPUs with the same labels (README, Throughput); emulated bf16
    (an AVX2-only CPU, a V100/T4) is slower than fp32 and only rounds."""
    return "bf16" if native and device_type in ("cpu", "cuda") else "fp32"


def native_bf16(device) -> bool:
    """Whether ``device`` computes bf16 in hardware (oneDNN's own test on a CPU, torch's on a GPU)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    try:  # private, but it is the check oneDNN itself uses to pick bf16 kernels
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class Scorer:
    """Loads the model once per actor; ``__call__`` adds ``prob_pneumonia`` (softmax(logits / T), T the
    model's temperature), ``logit_pneumonia`` (the raw margin) and ``cam`` to a batch."""

    def __init__(self, info: dict, *, threads: int, precision: str, compile: bool, channels_last: bool):
        import torch

        from ..model.registry import ModelInfo, fc_weight, load

        torch.set_num_threads(threads)
        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.precision = auto_precision(self.device.type, native_bf16(self.device)) if precision == "auto" else precision
        self.autocast = self.precision == "bf16"
        self.channels_last = channels_last
        model = load(ModelInfo(**info)).to(self.device)
        self.temperature = float(info.get("temperature", 1.0))
        self.weight = fc_weight(model).float()
        self.model = prepare_model(model, self.device, channels_last=channels_last, compile=compile)
        self.pad_to = 0 if compile else None  # compiled: pad smaller batches to the largest seen so far

    def __call__(self, batch: dict) -> dict:
        from ..model.cam import class_activation_maps
        from ..pixels.transforms import normalize

        torch = self.torch
        ok = np.array([e is None for e in _strings(batch["error"])], dtype=bool)
        n = len(ok)
        prob, margin = np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)
        cams = None
        if ok.any():
            pixels = np.ascontiguousarray(batch["pixels"][ok])
            m = len(pixels)
            if self.pad_to is not None:  # a new batch shape would recompile: about a minute on a CPU
                self.pad_to = max(self.pad_to, m)
                pixels = np.concatenate([pixels, np.zeros((self.pad_to - m,) + pixels.shape[1:], pixels.dtype)])
            x = normalize(torch.from_numpy(pixels).to(self.device, non_blocking=True), channels_last=self.channels_last)
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                logits, features = self.model(x)
            logits, features = logits[:m].float(), features[:m]
            prob[ok] = torch.softmax(logits / self.temperature, dim=1)[:, POSITIVE].cpu().numpy()
            margin[ok] = (logits[:, POSITIVE] - logits[:, 1 - POSITIVE]).cpu().numpy()
            good_cams = class_activation_maps(features.float(), self.weight, POSITIVE).cpu().numpy()
            cams = np.zeros((n,) + good_cams.shape[1:], np.float32)
            cams[ok] = good_cams
        batch["prob_pneumonia"], batch["logit_pneumonia"] = prob, margin
        batch["cam"] = cams if cams is not None else np.zeros((n, 1, 1), np.float32)
        # Text columns come in as float NaN where a whole block was None: hand them on as None, or the
        # next stage cannot concatenate this block with one holding strings ("string vs float").
        for k in TEXT_COLUMNS:
            if k in batch:
                batch[k] = np.asarray(_strings(batch[k]), dtype=object)
        return batch


# ---------------------------------------------------------------- stage 3: finish (CPU tasks)

def finish_batch(batch: dict, *, info: dict, cam_dir: str | None, cam_size: int | None, archive: str,
                 max_pixels: int) -> dict:
    from ..model.cam import encode_png, overlay, peak

    n = len(batch["path"])
    prob = batch["prob_pneumonia"]
    error = _strings(batch["error"])
    pred, cam_path = [None] * n, [None] * n
    peak_x, peak_y = np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)
    for i in range(n):
        if error[i] is not None:
            continue
        pred[i] = CLASSES[POSITIVE] if prob[i] >= info["threshold"] else CLASSES[1 - POSITIVE]
        peak_x[i], peak_y[i] = peak(batch["cam"][i])
        if cam_dir is None:
            continue
        try:
            base = _cam_base(batch, i, cam_size, archive, max_pixels)
            uri = cam_uri(cam_dir, batch["path"][i])
            storage.write_bytes_atomic(uri, encode_png(overlay(base, batch["cam"][i])))
            cam_path[i] = uri
        except Exception as e:  # a failed PNG must not lose the row's prediction
            error[i] = f"CAM PNG not written: {type(e).__name__}: {one_line(e, 160)}"
    out = {k: batch[k] for k in ("width", "height", "bytes")}
    out.update({k: np.asarray(_strings(batch[k]), dtype=object) for k in TEXT_COLUMNS if k in batch})
    out.update(error=np.asarray(error, dtype=object), pred=np.asarray(pred, dtype=object), prob_pneumonia=prob,
               logit_pneumonia=batch.get("logit_pneumonia", np.full(n, np.nan, np.float32)),
               temperature=np.full(n, info.get("temperature", 1.0), np.float32),
               cam_path=np.asarray(cam_path, dtype=object), cam_peak_x=peak_x, cam_peak_y=peak_y,
               threshold=np.full(n, info["threshold"], np.float32),
               model=np.asarray([info["model_id"]] * n, dtype=object))
    return out


def _cam_base(batch: dict, i: int, cam_size: int | None, archive: str, max_pixels: int) -> np.ndarray:
    """The X-ray under the overlay: the model's input when sizes match (no second decode)."""
    pixels = batch["pixels"][i]
    if cam_size is None or cam_size == pixels.shape[0]:
        return pixels
    d = decode_image(storage.read_file(archive, batch["path"][i]), max_pixels=max_pixels, draft=cam_size or None)
    return to_u8(d.gray) if cam_size == 0 else to_model_pixels(d.gray, cam_size)
