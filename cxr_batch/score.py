"""The scoring job: archive -> Ray Data stream -> Parquet rows + CAM overlay PNGs.

Stages (one Ray Data operator each, none relying on row order; every row carries ``path``):
  1. decode   CPU tasks: read bytes, hash, decode, resize to the model's input  (decode.py)
  2. model    an actor pool: forward pass -> P(PNEUMONIA) and the CAM          (Scorer)
  3. finish   CPU tasks: CAM peak, overlay PNG written off the model's path    (finish_batch)
  4. the driver publishes Parquet parts as rows stream in                      (output.py)
Pure work lives in decode/transforms/cam; this module is the Ray edge.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from . import CLASSES, POSITIVE, storage
from .decode import DEFAULT_MAX_PIXELS, decode_image
from .discover import discover, label_from_path, local_path
from .errors import DecodeError, InputError
from .output import PartWriter, cam_uri, done_paths
from .transforms import to_model_pixels, to_u8

PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "gpu")


@dataclass(frozen=True, kw_only=True)
class ScoreSettings:
    archive: str
    out: str  # a folder of Parquet part files (pandas, pyarrow, duckdb read it as one table)
    model: str | None = None  # checkpoint path/URI or ARCH:WEIGHTS; None = the registered default
    cam_dir: str | None = None  # None: "<out>-cams" beside the output
    cams: bool = True
    cam_size: int | None = None  # overlay side in px; None = the model's input size (fast); 0 = original size
    batch_size: int = 16  # images per forward pass
    actors: int | None = None  # model replicas; None = one per GPU, or as many CPU actors as fit
    cpus_per_actor: float | None = None  # None: sized from the cluster (see plan_resources)
    device: str = "auto"
    precision: str = "auto"  # auto = bf16 autocast on GPU, fp32 on CPU
    compile: bool = False  # torch.compile the model in each actor (slow start, faster steady state)
    channels_last: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    overwrite: bool = False
    rows_per_part: int = 2000
    limit: int | None = None  # score only the first N files (sorted by path): smoke tests
    stall_timeout_s: float = 900  # Ray Data raises instead of hanging this long without progress

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise InputError(f"Invalid precision {self.precision!r}. Only {', '.join(PRECISIONS)} are supported.")
        if self.device not in DEVICES:
            raise InputError(f"Invalid device {self.device!r}. Only {', '.join(DEVICES)} are supported.")
        if self.batch_size < 1 or (self.actors is not None and self.actors < 1):
            raise InputError("--batch-size and --actors must be at least 1.")

    def resolved_cam_dir(self) -> str:
        if self.cam_dir:
            return self.cam_dir
        base = self.out.rstrip("/")
        stem = base[: -len(".parquet")] if base.endswith(".parquet") else base
        return stem + "-cams"


@dataclass(frozen=True)
class ResourcePlan:
    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    torch_threads: int
    task_cpus: float  # per decode / finish task


def plan_resources(cluster_cpus: float, cluster_gpus: float, s: ScoreSettings) -> ResourcePlan:
    """Size the pool so it always fits: Ray Data waits forever (no error) for resources that never come.

    GPUs: one actor per GPU, a fixed pool (an autoscaling GPU pool can stay at one replica).
    CPU only: leave one CPU to decode/finish tasks and give the rest to actors of up to 4 CPUs each;
    torch in an actor uses as many threads as the CPUs it holds.
    """
    use_gpu = cluster_gpus >= 1 and s.device != "cpu"
    if s.device == "gpu" and cluster_gpus < 1:
        raise InputError("--device gpu, but the Ray cluster has no GPU; use --device cpu or auto.")
    task_cpus = 0.5 if cluster_cpus < 4 else 1.0
    if use_gpu:
        actors = s.actors or int(cluster_gpus)
        if actors > cluster_gpus:
            raise InputError(f"--actors {actors} exceeds the cluster's {int(cluster_gpus)} GPUs.")
        cpus = s.cpus_per_actor if s.cpus_per_actor is not None else 1.0
        return ResourcePlan(actors, cpus, 1.0, max(1, int(cpus)), task_cpus)
    free = cluster_cpus - 2 * task_cpus  # one decode and one finish task can always run
    if free < 0.5:
        raise InputError(f"The Ray cluster has {cluster_cpus:g} CPUs; scoring needs at least 1.5.")
    cpus = s.cpus_per_actor if s.cpus_per_actor is not None else max(0.5, min(4.0, free))
    actors = s.actors or max(1, int(free // cpus))
    if actors * cpus > free + 1e-9:
        raise InputError(
            f"{actors} actors x {cpus:g} CPUs do not fit beside the decode tasks on {cluster_cpus:g} CPUs;"
            " lower --actors or --cpus-per-actor.")
    threads = max(1, math.ceil(cpus))
    if cluster_cpus < 4 and s.cpus_per_actor is None and s.actors is None:
        # One actor on a small node. The decode and finish tasks hold half a CPU each but use about
        # 5% of one per image that ResNet-101 takes (draft JPEG decode, 224 px PNGs): idling that CPU
        # halves throughput, so torch gets every CPU and the tasks interleave (docs/benchmark.md).
        threads = int(cluster_cpus)
    return ResourcePlan(actors, cpus, 0.0, threads, task_cpus)


# ---------------------------------------------------------------- stage 1: decode (CPU tasks)

def decode_batch(batch: dict, *, archive: str, image_size: int, max_pixels: int) -> dict:
    n = len(batch["path"])
    out = {k: [None] * n for k in ("label", "error", "sha256", "format", "modality", "view_position",
                                   "sop_instance_uid")}
    out.update(path=list(batch["path"]), bytes=np.full(n, -1, np.int64),
               width=np.zeros(n, np.int32), height=np.zeros(n, np.int32),
               pixels=np.zeros((n, image_size, image_size), np.uint8))
    for i, rel in enumerate(out["path"]):
        out["label"][i] = label_from_path(rel)
        try:
            data = _read(archive, rel)
            out["bytes"][i] = len(data)
            out["sha256"][i] = hashlib.sha256(data).hexdigest()
            d = decode_image(data, max_pixels=max_pixels, draft=image_size)
            out["pixels"][i] = to_model_pixels(d.gray, image_size)
            out["width"][i], out["height"][i], out["format"][i] = d.width, d.height, d.format
            for k in ("modality", "view_position", "sop_instance_uid"):
                out[k][i] = d.meta.get(k)
        except DecodeError as e:
            out["error"][i] = str(e)
        except Exception as e:  # never let one file take down a batch of good ones
            out["error"][i] = f"unexpected {type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return {k: np.asarray(v, dtype=object) if isinstance(v, list) else v for k, v in out.items()}


def _strings(column) -> list:
    """An object column as str/None. Ray Data hands a column that is None in every row of a block
    to the next stage as float NaN: without this, a block of all-good images reads as all errors."""
    return [None if v is None or (isinstance(v, (float, np.floating)) and np.isnan(v)) else v for v in column]


def _read(archive: str, rel: str) -> bytes:
    fs, root = storage.resolve(archive)
    path = f"{root}/{rel}"
    try:
        if isinstance(fs, pafs.LocalFileSystem):  # Python's open takes the non-UTF-8 names that pyarrow refuses
            with open(local_path(root, rel), "rb") as f:
                return f.read()
        with fs.open_input_stream(path) as f:
            return f.read()
    except PermissionError:
        raise DecodeError("unreadable file: permission denied") from None
    except FileNotFoundError:
        raise DecodeError("file vanished after it was listed") from None
    except OSError as e:
        raise DecodeError(f"unreadable file: {' '.join(str(e).split())[:160]}") from None


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


class Scorer:
    """Loads the model once per actor; ``__call__`` adds ``prob_pneumonia`` and ``cam`` to a batch."""

    def __init__(self, info: dict, *, threads: int, precision: str, compile: bool, channels_last: bool):
        import torch

        from .registry import ModelInfo, fc_weight, load

        torch.set_num_threads(threads)
        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.autocast = precision == "bf16"
        self.channels_last = channels_last
        model = load(ModelInfo(**info)).to(self.device)
        self.temperature = float(info.get("temperature", 1.0))
        self.weight = fc_weight(model).float()
        self.model = prepare_model(model, self.device, channels_last=channels_last, compile=compile)
        self.pad_to = 0 if compile else None  # compiled: pad smaller batches to the largest seen so far

    def __call__(self, batch: dict) -> dict:
        from .cam import class_activation_maps
        from .transforms import normalize

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
        for k in ("path", "label", "error", "sha256", "format", "modality", "view_position", "sop_instance_uid"):
            batch[k] = np.asarray(_strings(batch[k]), dtype=object)
        return batch


# ---------------------------------------------------------------- stage 3: finish (CPU tasks)

def finish_batch(batch: dict, *, info: dict, cam_dir: str | None, cam_size: int | None, archive: str,
                 max_pixels: int) -> dict:
    from .cam import encode_png, overlay, peak

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
            error[i] = f"CAM PNG not written: {type(e).__name__}: {' '.join(str(e).split())[:160]}"
    out = {k: batch[k] for k in ("width", "height", "bytes")}
    out.update({k: np.asarray(_strings(batch[k]), dtype=object)
                for k in ("path", "label", "format", "sha256", "modality", "view_position", "sop_instance_uid")})
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
    d = decode_image(_read(archive, batch["path"][i]), max_pixels=max_pixels, draft=cam_size or None)
    return to_u8(d.gray) if cam_size == 0 else to_model_pixels(d.gray, cam_size)


# ---------------------------------------------------------------- the job

@dataclass
class ScoreSummary:
    seen: int = 0
    already_done: int = 0
    scored: int = 0
    errors: int = 0
    seconds: float = 0.0
    out: str = ""
    cam_dir: str | None = None
    model: dict = field(default_factory=dict)
    plan: dict = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return (self.scored + self.errors) / self.seconds if self.seconds > 0 else 0.0


def run_score(s: ScoreSettings, *, progress=None) -> ScoreSummary:
    """Score ``s.archive`` into ``s.out``. Ray must be initialised (see ``raycluster.ensure_ray``)."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from .registry import describe  # imports torch: kept out of the decode and finish workers

    t0 = time.perf_counter()
    info = describe(s.model)
    s = replace(s, model=info.spec, archive=storage.absolute(s.archive), out=storage.absolute(s.out),
                cam_dir=storage.absolute(s.cam_dir) if s.cam_dir else None)
    cam_dir = s.resolved_cam_dir() if s.cams else None
    if s.overwrite:
        storage.delete_dir(s.out)
        if cam_dir:
            storage.delete_dir(cam_dir)
    files = discover(s.archive)
    if s.limit is not None:
        files = files[: s.limit]
    done = done_paths(s.out, info.model_id)
    todo = [f for f in files if f.path not in done]
    res = ray.cluster_resources()
    plan = plan_resources(res.get("CPU", 0), res.get("GPU", 0), s)
    summary = ScoreSummary(seen=len(files), already_done=len(files) - len(todo), out=s.out, cam_dir=cam_dir,
                           model=info.to_dict(), plan=asdict(plan))
    metadata = {"settings": asdict(s), "model_id": info.model_id, "model": info.to_dict(),
                "classes": list(CLASSES), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    writer = PartWriter(s.out, metadata, s.rows_per_part)
    if todo:
        ctx = DataContext.get_current()
        ctx.execution_no_progress_timeout_s = s.stall_timeout_s
        ctx.enable_progress_bars = False  # our own one-line progress below reads better in logs
        ctx.print_on_execution_start = False
        info_d = info.to_dict()
        # A map task batches only the rows of the blocks it is given: blocks of 33 rows reached the
        # model as 16 + 16 + 1 (a third of all forward passes held 1-2 images, and each new size
        # recompiles under torch.compile). So blocks and decode batches are multiples of the batch.
        decode_rows = s.batch_size * max(1, 32 // s.batch_size)
        block_rows = decode_rows * max(1, math.ceil(len(todo) / 4096 / decode_rows))  # <= ~4096 blocks
        paths = [f.path for f in todo]
        ds = ray.data.from_arrow([pa.table({"path": paths[i: i + block_rows]})
                                  for i in range(0, len(paths), block_rows)])
        ds = ds.map_batches(decode_batch, batch_size=decode_rows, num_cpus=plan.task_cpus, batch_format="numpy",
                            fn_kwargs=dict(archive=s.archive, image_size=info.image_size, max_pixels=s.max_pixels))
        ds = ds.map_batches(
            Scorer, batch_size=s.batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=plan.actors),
            num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor,
            fn_constructor_kwargs=dict(info=info_d, threads=plan.torch_threads, precision=s.precision,
                                       compile=s.compile, channels_last=s.channels_last))
        ds = ds.map_batches(finish_batch, batch_size=decode_rows, num_cpus=plan.task_cpus, batch_format="numpy",
                            fn_kwargs=dict(info=info_d, cam_dir=cam_dir, cam_size=s.cam_size, archive=s.archive,
                                           max_pixels=s.max_pixels))
        last = 0.0
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            writer.add(table)
            ok = table.column("error").null_count  # error is null exactly for scored rows
            summary.scored += ok
            summary.errors += table.num_rows - ok
            summary.seconds = time.perf_counter() - t0
            if progress and time.perf_counter() - last > 2:
                last = time.perf_counter()
                progress(summary, len(todo))
    writer.flush()
    summary.seconds = time.perf_counter() - t0
    if progress:
        progress(summary, len(todo))
    return summary
