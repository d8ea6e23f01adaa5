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
from functools import partial

import numpy as np

from .. import CLASSES, POSITIVE
from ..archive import storage
from ..archive.discover import label_from_path, opened_outside, outside_archive
from ..archive.results import ERROR, OUT_OF_SCOPE, RETRY, SCORED, SKIPPED, TEXT_COLUMNS, cam_uri
from ..errors import DecodeError, Skipped, TransientError, one_line
from ..pixels.decode import DEFAULT_MAX_PIXELS, decode_image
from ..pixels.device_decode import decode_on_device, device_jpeg_header
from ..pixels.gate import PREFIX as GATE_PREFIX
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

NOT_DICOM = "skipped: no file extension and not DICOM (no DICM marker at byte 128), so not read as an image"
OUTSIDE = "symlink to outside the archive: not read (pass --follow-symlinks to read it)"


def decode_batch(batch: dict, *, archive: str, image_size: int, max_pixels: int, follow_symlinks: bool = False,
                 max_bytes: int | None = None, device_decode: bool = False, gate: dict | None = None) -> dict:
    """Read and decode a batch of archive paths. ``batch["sniff"]`` (optional) marks files with no
    extension: they are scored only if their first bytes say DICOM (the listing never opens a file).
    ``device_decode``: JPEGs the model's device can decode (pixels/device_decode.py) are only read,
    hashed and checked here, and travel as bytes in a ``jpeg`` column for the Scorer to decode.
    ``gate``: the DICOM header gate's rules (pixels/gate.py); a DICOM it rules out is never decoded."""
    n = len(batch["path"])
    sniff = batch.get("sniff", np.zeros(n, bool))
    out = {k: [None] * n for k in TEXT_COLUMNS}  # every text column of the schema travels from here on
    out.update(path=list(batch["path"]), bytes=np.full(n, -1, np.int64),
               width=np.zeros(n, np.int32), height=np.zeros(n, np.int32),
               pixels=np.zeros((n, image_size, image_size), np.uint8))
    if device_decode:  # b"" (not None) where the CPU decoded: a block's column is binary even when no row has a file
        out["jpeg"] = [b""] * n
    for i, rel in enumerate(out["path"]):
        out["label"][i] = label_from_path(rel)
        try:
            data = _read(archive, rel, sniff=bool(sniff[i]), follow_symlinks=follow_symlinks, max_bytes=max_bytes)
            out["bytes"][i] = len(data)
            out["sha256"][i] = hashlib.sha256(data).hexdigest()
            size = device_jpeg_header(data, max_pixels) if device_decode else None
            if size:
                out["jpeg"][i] = data
                (out["width"][i], out["height"][i]), out["format"][i] = size, "JPEG"
            else:
                decode_row(out, i, data, image_size=image_size, max_pixels=max_pixels, gate=gate)
        except Exception as e:  # never let one file take down a batch of good ones
            record_failure(out, i, e)
    return {k: np.asarray(v, dtype=object) if isinstance(v, list) else v for k, v in out.items()}


def decode_row(out: dict, i: int, data: bytes, *, image_size: int, max_pixels: int, gate: dict | None = None) -> None:
    """Decode one file on the CPU into row ``i`` of ``out`` (pixels, size, format, DICOM attributes)."""
    d = decode_image(data, max_pixels=max_pixels, draft=image_size, gate=gate)
    out["pixels"][i] = to_model_pixels(d.gray, image_size)
    out["width"][i], out["height"][i], out["format"][i] = d.width, d.height, d.format
    for k in d.meta.keys() & set(TEXT_COLUMNS):  # the DICOM attributes the schema has
        out[k][i] = d.meta[k]


def record_failure(out: dict, i: int, e: Exception) -> None:
    """Row ``i``'s error and status for a file that could not be read or decoded."""
    if isinstance(e, DecodeError):
        out["error"][i], out["status"][i] = str(e), failure_status(e)
        if isinstance(e, Skipped):  # what the header says the file is stays on its row
            out["format"][i] = "DICOM"
            for k in e.meta.keys() & set(TEXT_COLUMNS):
                out[k][i] = e.meta[k]
    elif isinstance(e, MemoryError):  # this worker's memory, not the file: other batches share it
        out["error"][i], out["status"][i] = "out of memory while decoding", RETRY
    else:
        out["error"][i], out["status"][i] = f"unexpected {type(e).__name__}: {one_line(e)}", ERROR


def failure_status(e: DecodeError) -> str:
    """The status column of a row that failed with ``e``."""
    if isinstance(e, TransientError):
        return RETRY
    return SKIPPED if isinstance(e, Skipped) or str(e).startswith("skipped:") else ERROR


def skip_reason(error: str | None) -> str:
    """The short reason of a "skipped" row, as the summary counts them ("Modality CT")."""
    if error and error.startswith(GATE_PREFIX):
        return error[len(GATE_PREFIX):]
    return "not DICOM (no extension)" if error == NOT_DICOM else error or "(no reason)"


def _read(archive: str, rel: str, *, sniff: bool, follow_symlinks: bool, max_bytes: int | None = None) -> bytes:
    """A file's bytes. Outside links are refused here as well as in the listing: a manifest can
    name one, and a link can change after it was listed, or between this check of its path and the
    open (so the opened descriptor is checked too)."""
    confine = not follow_symlinks and not storage.is_uri(archive)
    if confine and outside_archive(archive, rel):
        raise DecodeError(OUTSIDE)
    return storage.read_file(archive, rel, check_head=_dicom_head if sniff else None, max_bytes=max_bytes,
                             check_opened=partial(_refuse_outside, archive) if confine else None)


def _refuse_outside(archive: str, f) -> None:
    if opened_outside(archive, f):
        raise DecodeError(OUTSIDE)


def _dicom_head(head: bytes) -> None:
    from ..pixels.dicom import is_dicom

    if not is_dicom(head):
        raise DecodeError(NOT_DICOM)


def _strings(column) -> list:
    """An object column as str/None. Ray Data hands a column that is None in every row of a block
    to the next stage as float NaN: without this, a block of all-good images reads as all errors."""
    return [None if v is None or (isinstance(v, (float, np.floating)) and np.isnan(v)) else v for v in column]


# ---------------------------------------------------------------- stage 2: model (actor pool)

def prepare_model(model, device, *, channels_last: bool, compile: bool, precision: str = "fp32",
                  image_size: int | None = None):
    """Inference-only rewrites of an eval-mode CamResNet; same outputs, less work per image.

    Batch norm is folded into the preceding convolutions (5-7% less CPU time per image on
    ResNet-101, fp32 and bf16). channels_last is oneDNN's native layout. torch.compile with
    freezing takes ~1 min per actor on CPU and then saves another ~15%: worth it only for archives
    of many thousands of images per actor. Without it, an fp32 model on a CPU is frozen for
    inference (``frozen_for_cpu``) when ``image_size`` says what to trace it with.
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
    elif device.type == "cpu" and precision == "fp32" and image_size:
        model = frozen_for_cpu(model, image_size, channels_last=channels_last)
    return model


def frozen_for_cpu(model, image_size: int, *, channels_last: bool):
    """The model traced on one image and frozen by TorchScript for inference: convolutions fused
    with the ReLU and residual add after them, weights prepacked for oneDNN. ResNet-101 (layer3
    head), fp32, batch 16, 2 Zen 4 CPUs: 11.3-12.3 images/s against 10.5-10.7 eager, for ~0.7 s of
    preparation; outputs equal to ~1e-6 (relative), at any batch size. torch.jit is deprecated in
    favour of torch.compile (~1 min per process on a CPU), so where it fails or is gone the eager
    model, the same network, is returned. Not for bf16: a trace does not carry autocast."""
    import warnings

    import torch

    x = torch.zeros(1, 3, image_size, image_size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice, once per process
            traced = torch.jit.trace(model, x, check_trace=False)
            return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
    except (AttributeError, RuntimeError, TypeError):
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
    model's temperature), ``logit_pneumonia`` (the raw margin) and ``cam`` (the log-odds map,
    cam.log_odds_map: its mean is the raw margin) to a batch, and with ``cam_point`` "evidence" a
    ``cam_point`` column: (x, y) of the hot spot's evidence in the input (model/evidence.py), NaN where
    there is none."""

    def __init__(self, info: dict, *, threads: int, precision: str, compile: bool, channels_last: bool,
                 max_pixels: int = DEFAULT_MAX_PIXELS, overlay_scale: str | None = None, cam_point: str = "map",
                 ood: str = "skip"):
        import torch

        from ..model.registry import ModelInfo, fc_bias, fc_weight, load_with_ood

        torch.set_num_threads(threads)
        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.precision = auto_precision(self.device.type, native_bf16(self.device)) if precision == "auto" else precision
        self.autocast = self.precision == "bf16"
        self.channels_last = channels_last
        model, stats = load_with_ood(ModelInfo(**info))
        model = model.to(self.device)
        _check_grid(model, info)
        # The OOD statistics on the model's device: two small products per batch beside the forward pass.
        self.ood = None if ood == "off" or stats is None else (
            torch.from_numpy(stats.means).to(self.device), torch.from_numpy(stats.precision).to(self.device))
        self.temperature = float(info.get("temperature", 1.0))
        self.weight, self.bias = fc_weight(model).float(), fc_bias(model).float()
        # cam_point "evidence" back-propagates through the model (model/evidence.py): an eager network,
        # not one frozen by TorchScript for inference.
        self.cam_point = cam_point
        self.model = prepare_model(model, self.device, channels_last=channels_last, compile=compile,
                                   precision=self.precision,
                                   image_size=int(info["image_size"]) if cam_point == "map" else None)
        self.pad_to = 0 if compile else None  # compiled: pad smaller batches to the largest seen so far
        self.image_size, self.max_pixels = int(info["image_size"]), max_pixels
        # The overlays at the model's input size, composed on its device (set with --decode-on device).
        self.overlay_scale, self.grid = overlay_scale, cam_grid_of(info)

    def add_overlays(self, batch: dict, ok, gray, maps) -> None:
        """With ``overlay_scale``, the CAM overlays composed here on the model's device (model.cam.overlay_batch),
        in an ``overlay`` column (zeros for rows without a prediction) that the finish stage only encodes."""
        from ..model.cam import overlay_batch

        if not self.overlay_scale:
            return
        size = self.image_size
        out = np.zeros((len(ok), size, size, 3), np.uint8)  # in every batch: blocks must share their columns
        if gray is not None:
            out[ok] = overlay_batch(gray, maps, self.grid, scale=self.overlay_scale).cpu().numpy()
        batch["overlay"] = out

    def decode_jpegs(self, batch: dict) -> None:
        """Rows the decode stage left as JPEG bytes (``--decode-on device``), decoded here on the model's
        device in one call; a file the device fails on is decoded on the CPU, and a file that fails
        there too gets the CPU decoder's error, as it would have in the decode stage."""
        jpeg = batch.pop("jpeg")
        rows = [i for i, b in enumerate(jpeg) if isinstance(b, bytes) and b]  # b"" where the CPU decoded
        if not rows:
            return
        for k in ("error", "status", "format"):  # writable, and None where Ray Data made an all-None column NaN
            batch[k] = np.asarray(_strings(batch[k]), dtype=object)
        for k in ("pixels", "width", "height"):
            batch[k] = np.array(batch[k])  # Ray Data hands read-only views
        for i, image in zip(rows, decode_on_device([jpeg[i] for i in rows], self.image_size, self.device)):
            if not isinstance(image, Exception):
                batch["pixels"][i] = image
                continue
            try:
                decode_row(batch, i, jpeg[i], image_size=self.image_size, max_pixels=self.max_pixels)
            except Exception as e:  # the row the decode stage would have written: no size, no format
                batch["width"][i] = batch["height"][i] = 0
                batch["format"][i] = None
                record_failure(batch, i, e)

    def ood_scores(self, features):
        """The OOD score (model/ood.py) of each image's last features; NaN without the statistics or with --ood off."""
        from ..model.ood import mahalanobis, pooled

        if self.ood is None:
            return np.nan
        return mahalanobis(pooled(features), *self.ood).cpu().numpy()

    def __call__(self, batch: dict) -> dict:
        from ..model.calibration import margins
        from ..model.cam import log_odds_map
        from ..pixels.transforms import normalize

        torch = self.torch
        if "jpeg" in batch:
            self.decode_jpegs(batch)
        ok = np.array([e is None for e in _strings(batch["error"])], dtype=bool)
        n = len(ok)
        prob, margin, ood = (np.full(n, np.nan, np.float32) for _ in range(3))
        cams = None
        points = np.full((n, 2), np.nan, np.float32)
        if ok.any():
            pixels = np.ascontiguousarray(batch["pixels"][ok])
            m = len(pixels)
            if self.pad_to is not None:  # a new batch shape would recompile: about a minute on a CPU
                self.pad_to = max(self.pad_to, m)
                pixels = np.concatenate([pixels, np.zeros((self.pad_to - m,) + pixels.shape[1:], pixels.dtype)])
            gray = torch.from_numpy(pixels).to(self.device, non_blocking=True)
            x = normalize(gray, channels_last=self.channels_last)
            if self.cam_point == "evidence":
                from ..model.evidence import evidence_forward

                logits, features, found = evidence_forward(self.model, x, self.weight, self.bias, self.grid,
                                                           autocast_device=self.device.type if self.autocast else None)
                points[ok] = found[:m]
            else:
                with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    logits, features = self.model(x)
            logits, features = logits[:m].float(), features[:m]
            prob[ok] = torch.softmax(logits / self.temperature, dim=1)[:, POSITIVE].cpu().numpy()
            margin[ok] = margins(logits).cpu().numpy()
            ood[ok] = self.ood_scores(features)
            maps = log_odds_map(features.float(), self.weight, self.bias, POSITIVE)
            cams = np.zeros((n,) + tuple(maps.shape[1:]), np.float32)
            cams[ok] = maps.cpu().numpy()
            self.add_overlays(batch, ok, gray[:m], maps)
        else:
            self.add_overlays(batch, ok, None, None)
        batch["prob_pneumonia"], batch["logit_pneumonia"], batch["ood_score"] = prob, margin, ood
        batch["cam"] = cams if cams is not None else np.zeros((n, 1, 1), np.float32)
        if self.cam_point == "evidence":  # in every batch or in none: blocks must share their columns
            batch["cam_point"] = points
        # Text columns come in as float NaN where a whole block was None: hand them on as None, or the
        # next stage cannot concatenate this block with one holding strings ("string vs float").
        for k in TEXT_COLUMNS:
            if k in batch:
                batch[k] = np.asarray(_strings(batch[k]), dtype=object)
        return batch


def _check_grid(model, info: dict) -> None:
    """The driver placed the CAM's cells without building the network (model/archs.resnet_grid);
    the network built here, walked layer by layer, must put them in the same place."""
    from ..model.receptive import cam_grid

    built = cam_grid(model.trunk, int(info["image_size"]))
    told = cam_grid_of(info)
    if (built.stride, built.offset) != (told.stride, told.offset):
        raise RuntimeError(f"the model's CAM cells sit at stride {built.stride}, offset {built.offset}; the job was"
                           f" told stride {told.stride}, offset {told.offset} (model/archs.resnet_grid is out of date)")


# ---------------------------------------------------------------- stage 3: finish (CPU tasks)

NON_FINITE = ("model output is not finite (NaN or infinity): no prediction made; the model's weights or this"
              " image's pixels are broken")


OUT_OF_SCOPE_REASON = ("out of scope: the image does not look like the frontal chest radiographs the model was trained"
                       " on (ood_score above the model's OOD threshold), so it was not given a prediction")


def finish_batch(batch: dict, *, info: dict, cam_dir: str | None, cam_size: int | None, archive: str,
                 max_pixels: int, cam_scale: str, ood: str = "skip", follow_symlinks: bool = False,
                 max_bytes: int | None = None) -> dict:
    """``ood``: skip (a row over the OOD threshold gets status out_of_scope, no prediction and no CAM),
    flag (it keeps its prediction, marked by the out_of_scope column) or off."""
    from ..model.cam import hot_spot

    n = len(batch["path"])
    prob = np.array(batch["prob_pneumonia"], np.float32)
    logit = np.array(batch.get("logit_pneumonia", np.full(n, np.nan, np.float32)), np.float32)
    over = out_of_scope(batch, info, ood)
    error, status = _strings(batch["error"]), _strings(batch.get("status", [None] * n))
    pred, cam_path = [None] * n, [None] * n
    peak_x, peak_y = np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)
    cam_max = np.full(n, np.nan, np.float32)
    grid = cam_grid_of(info)
    for i in range(n):
        if error[i] is None and not (np.isfinite(prob[i]) and np.isfinite(batch["cam"][i]).all()):
            # Fail closed: NaN >= threshold is False, which would read as a confident NORMAL.
            error[i], prob[i], status[i] = NON_FINITE, np.nan, ERROR
        if error[i] is not None:
            status[i] = status[i] or ERROR
            continue
        if over[i] and ood == "skip":  # a probability for it would be a wrong answer, and a silent one
            error[i], status[i], prob[i], logit[i] = OUT_OF_SCOPE_REASON, OUT_OF_SCOPE, np.nan, np.nan
            continue
        status[i] = SCORED
        pred[i] = CLASSES[POSITIVE] if prob[i] >= info["threshold"] else CLASSES[1 - POSITIVE]
        if "cam_point" in batch and np.isfinite(batch["cam_point"][i]).all():  # --cam-point evidence
            peak_x[i], peak_y[i] = batch["cam_point"][i]
        else:
            peak_x[i], peak_y[i] = hot_spot(batch["cam"][i], grid)
        cam_max[i] = batch["cam"][i].max()
        if cam_dir is not None:
            cam_path[i], failed = _write_cam(batch, i, cam_dir, cam_size, archive, max_pixels, cam_scale, grid,
                                             follow_symlinks, max_bytes)
            if failed:
                error[i], status[i] = failed
    out = {k: batch[k] for k in ("width", "height", "bytes")}
    out.update({k: np.asarray(_strings(batch[k]), dtype=object) for k in TEXT_COLUMNS if k in batch})
    out.update(error=np.asarray(error, dtype=object), status=np.asarray(status, dtype=object), pred=np.asarray(pred, dtype=object), prob_pneumonia=prob,
               logit_pneumonia=logit, ood_score=np.asarray(batch.get("ood_score", np.full(n, np.nan)), np.float32),
               out_of_scope=over,
               temperature=np.full(n, info.get("temperature", 1.0), np.float32),
               cam_path=np.asarray(cam_path, dtype=object), cam_peak_x=peak_x, cam_peak_y=peak_y,
               cam_max=cam_max,
               threshold=np.full(n, info["threshold"], np.float32),
               model=np.asarray([info["model_id"]] * n, dtype=object))
    return out


def _write_cam(batch, i, cam_dir, cam_size, archive, max_pixels, cam_scale, grid, follow_symlinks, max_bytes):
    """Row ``i``'s overlay PNG -> (its URI or None, None or (error, status) when it could not be written)."""
    from ..model.cam import encode_png, overlay

    try:
        if "overlay" in batch:  # composed beside the model (Scorer.add_overlays)
            rgb = batch["overlay"][i]
        else:
            base = _cam_base(batch, i, cam_size, archive, max_pixels, follow_symlinks=follow_symlinks,
                             max_bytes=max_bytes)
            rgb = overlay(base, batch["cam"][i], grid, scale=cam_scale)
        uri = cam_uri(cam_dir, batch["path"][i])
        storage.write_bytes_atomic(uri, encode_png(rgb))
        return uri, None
    except Exception as e:  # a failed PNG must not lose the row's prediction
        # No space, a read-only remount, an unreadable file for a full-size overlay: the environment's, so
        # the row is redone; anything else is this image's own problem.
        status = RETRY if isinstance(e, (OSError, MemoryError, TransientError)) else ERROR
        return None, (f"CAM PNG not written: {type(e).__name__}: {one_line(e, 160)}", status)


def out_of_scope(batch: dict, info: dict, ood: str) -> np.ndarray:
    """Which rows' OOD score is above the model's threshold (none with --ood off or without a threshold)."""
    n = len(batch["path"])
    threshold = info.get("ood_threshold")
    if ood == "off" or threshold is None or "ood_score" not in batch:
        return np.zeros(n, bool)
    with np.errstate(invalid="ignore"):
        return np.asarray(batch["ood_score"], np.float32) > np.float32(threshold)


def cam_grid_of(info: dict):
    """Where the model's CAM cells sit in its input, from a ModelInfo dict (model.registry)."""
    from ..model.cam import CamGrid

    return CamGrid(int(info["cam_stride"]), float(info.get("cam_offset", 0.0)), int(info["image_size"]))


CHANGED = "file changed between its two reads (scored, then read again for --cam-size): run again to score it"


def _cam_base(batch: dict, i: int, cam_size: int | None, archive: str, max_pixels: int, *, follow_symlinks: bool,
              max_bytes: int | None) -> np.ndarray:
    """The X-ray under the overlay: the model's input when sizes match (no second decode). Else the file
    is read again by the decode stage's reader, with its checks, and must be the bytes that were scored."""
    pixels = batch["pixels"][i]
    if cam_size is None or cam_size == pixels.shape[0]:
        return pixels
    data = _read(archive, batch["path"][i], sniff=False, follow_symlinks=follow_symlinks, max_bytes=max_bytes)
    if hashlib.sha256(data).hexdigest() != batch["sha256"][i]:
        raise TransientError(CHANGED)
    d = decode_image(data, max_pixels=max_pixels, draft=cam_size or None)
    return to_u8(d.gray) if cam_size == 0 else to_model_pixels(d.gray, cam_size)
