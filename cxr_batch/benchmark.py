"""How fast `cxr-batch score` is, measured against two yardsticks in the same run, on the same archive:

  (a) baseline  plain PyTorch as a tutorial reader writes it: a Dataset that opens each file with PIL,
                torchvision Resize/ToTensor/Normalize, DataLoader(num_workers=2), an fp32 loop, a CAM
                PNG per image coloured with matplotlib, pandas -> Parquet at the end;
  (b) score     ``run_score`` end to end on a local Ray, once per precision mode;
  (c) forward   the model alone on in-memory tensors, prepared exactly as the Scorer prepares it
                (same precision and batch size): the most any pipeline around it can reach.

Throughput is images per second of wall time, start-up included (model build, actor start), so a
pipeline must earn its start-up on the archive size measured; "steady" is the rate from the first
rows out to the last, which leaves the start-up out. Peak memory is the summed RSS of the
process and all its descendants (DataLoader workers, every Ray process), sampled from /proc.

Agreement: every mode is compared with fp32 on the same images (joined on ``path``). An untrained
ResNet head (``resnet101:none``) is useless for that: activations of a random trunk grow through the
residual blocks (logits ~4e4, every probability exactly 0 or 1), so agreement would be 100% for
any arithmetic. Unless told otherwise the benchmark therefore scores a derived checkpoint: the same
architecture and weights, with batch-norm statistics re-estimated on 32 archive images (what the
first training steps would do) and a head along a random direction drawn with a fixed seed, scaled
so that P(PNEUMONIA) spreads around 0.5. Compute per image is unchanged.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import CLASSES, POSITIVE

PRECISIONS = ("fp32", "bf16")
MODE_FLAGS = ("compile", "nocams")  # "bf16+compile", "fp32+nocams", "bf16+compile+nocams", ...
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True, kw_only=True)
class BenchSettings:
    workdir: str  # archive (unless given), outputs and the derived checkpoint go here
    archive: str | None = None  # None: generate phantoms into <workdir>/archive (kept for the next run)
    images: int = 600
    min_side: int = 1000  # generated phantoms are squares of a random side in [min_side, max_side]
    max_side: int = 2000
    model: str = "resnet101:none"
    calibrate: bool = True  # untrained head -> derived checkpoint with a spread of probabilities (see above)
    batch_size: int = 16
    modes: tuple[str, ...] = ("fp32", "bf16")
    device: str = "auto"  # auto: the GPU when torch sees one (then (a), (b) and (c) all use it), else the CPU
    baseline_images: int | None = None  # (a) on the first N images only (None: all): it is slow on big archives
    decode_check: bool = False  # also time JPEG decoding: PIL draft on one core vs torchvision on the GPU
    forward_batches: int = 6  # timed batches for (c), after one warm-up batch
    memory_check: bool = False
    memory_images: int = 100  # N: the check scores N, then 10N images
    memory_side: int = 128
    memory_model: str = "resnet18:none"
    num_cpus: int | None = None  # for a Ray the benchmark starts; None = all
    seed: int = 0

    def __post_init__(self):
        bad = [m for m in self.modes if parse_mode(m) is None]
        if bad or "fp32" not in self.modes:
            raise ValueError(f"Invalid modes {bad or list(self.modes)}. A mode is fp32 or bf16, optionally followed"
                             " by +compile and/or +nocams (no CAM PNGs), e.g. bf16+compile; fp32 is required"
                             " (every other mode is compared with it).")
        if self.device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"Invalid device {self.device!r}. Only auto, cpu and gpu are supported.")
        if self.images < 1 or self.batch_size < 1 or not 32 <= self.min_side <= self.max_side:
            raise ValueError("--images and --batch-size must be at least 1, and 32 <= --min-side <= --max-side.")


def parse_mode(mode: str) -> tuple[str, bool, bool] | None:
    """"bf16+compile" -> ("bf16", compile=True, cams=True); "fp32+nocams" -> ("fp32", False, False);
    None when ``mode`` is not of that form."""
    precision, *flags = mode.split("+")
    if precision not in PRECISIONS or len(set(flags)) != len(flags) or not set(flags) <= set(MODE_FLAGS):
        return None
    return precision, "compile" in flags, "nocams" not in flags


# ---------------------------------------------------------------- inputs: archive and model

def make_bench_archive(root, n: int, min_side: int, max_side: int, *, seed: int = 0) -> Path:
    """``n`` phantom JPEGs (quality 90) of random square sides under root/{NORMAL,PNEUMONIA}/.
    Kept between runs: a second call with the same arguments only checks the marker file."""
    root = Path(root)
    params = {"n": n, "min_side": min_side, "max_side": max_side, "seed": seed}
    marker = root / "benchmark-archive.json"
    if marker.exists() and json.loads(marker.read_text()) == params:
        return root
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"{root} holds something other than this benchmark's archive; pass an empty --workdir.")
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    # Image i depends only on (seed, i), so any number of processes write the same archive. A
    # 2000 px phantom takes ~1 s to draw: on a 16-CPU GPU host the pool turns minutes into seconds.
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
    from .synth import JPEG_QUALITY, phantom

    rng = np.random.default_rng([seed, i])
    side, positive = int(rng.integers(min_side, max_side + 1)), i % 2 == 1
    pixels, _ = phantom(rng, side, opacity=positive)
    Image.fromarray(pixels).save(os.path.join(root, CLASSES[int(positive)], f"bench-{i:05d}.jpeg"),
                                 quality=JPEG_QUALITY)


def calibrated_checkpoint(spec: str, archive: str, paths: list[str], dst: Path, *, seed: int = 0) -> str:
    """The model of ``spec`` with batch-norm statistics re-estimated on up to 32 of ``paths`` and a
    seeded random head standardised on them (see the module docstring); saved as a checkpoint."""
    import torch

    from .checkpoint import make_checkpoint, save_checkpoint
    from .registry import describe, load
    from .score import decode_batch
    from .transforms import normalize

    if dst.exists():
        return str(dst)
    info = describe(spec)
    model = load(info)
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
                           settings={"derived_from": spec, "by": "cxr_batch.benchmark.calibrated_checkpoint",
                                     "seed": seed, "calibration_images": len(sample)})
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(ckpt, str(dst))
    return str(dst)


# ---------------------------------------------------------------- (a) plain PyTorch, tutorial style

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
                     batch_size: int, device: str = "cpu", cam_stride: int = 32, threshold: float = 0.5,
                     temperature: float = 1.0, num_workers: int = 2) -> None:
    """The yardstick. Written plainly on purpose: no tuning a tutorial would not have."""
    import matplotlib
    import pandas as pd
    import torch
    from torch.utils.data import DataLoader
    from torchvision import transforms as T

    transform = T.Compose([T.Resize(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    # DataLoader forks its workers; after Ray has started threads in this process, forkserver is safer.
    import ray

    context = "forkserver" if ray.is_initialized() else None
    loader = DataLoader(XrayFiles(archive, paths, transform), batch_size=batch_size, num_workers=num_workers,
                        multiprocessing_context=context)
    from .model import torchvision_resnet

    # torchvision's own ResNet, as a tutorial builds it, with the checkpoint's layer4 (trained
    # cxr-batch models drop its stride: cam_stride 16), or it would be another network.
    net = torchvision_resnet(arch, cam_stride)
    net.fc = torch.nn.Linear(net.fc.in_features, len(CLASSES))
    net.load_state_dict(_torchvision_names(state_dict))
    net.eval().to(device)
    features = {}
    net.layer4.register_forward_hook(lambda module, inputs, output: features.update(layer4=output))
    jet = matplotlib.colormaps["jet"]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    cam_dir = out.parent / (out.stem + "-cams")
    rows = []
    with torch.no_grad():
        for images, names in loader:
            probs = torch.softmax(net(images.to(device)) / temperature, dim=1)[:, POSITIVE].cpu()
            cams = torch.einsum("bchw,c->bhw", features["layer4"], net.fc.weight[POSITIVE])
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


# ---------------------------------------------------------------- (c) the model alone

def bare_forward(spec: str, *, precision: str, compile: bool, batch_size: int, batches: int,
                 device: str = "cpu") -> float:
    """Images/s of the Scorer's own model preparation and forward on in-memory tensors (warm)."""
    import torch

    from .registry import describe, load
    from .score import prepare_model
    from .transforms import normalize

    info = describe(spec)
    dev = torch.device(device)
    model = prepare_model(load(info), dev, channels_last=True, compile=compile)
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


# ---------------------------------------------------------------- JPEG decoding, CPU against GPU

def decode_check(archive: str, paths: list[str], *, image_size: int, device: str, limit: int = 256) -> dict:
    """Images/s of the decode stage's own work (PIL reduced-scale decode + resize, one core) and, on a
    GPU, of torchvision's nvJPEG decode + antialiased resize on the GPU, on the same files in memory."""
    from .decode import decode_image
    from .transforms import to_model_pixels

    blobs = []
    for p in paths[:limit]:
        with open(os.path.join(archive, p), "rb") as f:
            blobs.append(f.read())
    t0 = time.perf_counter()
    for data in blobs:
        to_model_pixels(decode_image(data, draft=image_size).gray, image_size)
    out = {"images": len(blobs), "pil_draft_per_core_images_per_s": round(len(blobs) / (time.perf_counter() - t0), 1)}
    if device == "cuda":
        try:
            out["gpu_nvjpeg_images_per_s"] = _gpu_decode_rate(blobs, image_size)
        except Exception as e:  # report, don't lose the rest of the benchmark
            out["gpu_error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
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


# ---------------------------------------------------------------- memory

class PeakMemory:
    """Peak summed RSS of this process and all its descendants, sampled from /proc in a thread.

    RSS counts pages shared between processes (torch's libraries, Ray's object store) once per
    process, so it overstates the machine's use; ``peak_anon_mb`` (private heap pages) does not.
    The sums also depend on how many Ray workers happen to be alive at once; ``peak_process_mb``,
    the largest single process, does not."""

    def __init__(self, interval_s: float = 0.25):
        self.interval_s, self.peak_rss_mb, self.peak_anon_mb, self.peak_process_mb = interval_s, 0.0, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        rss = anon = 0
        for pid in _tree(os.getpid()):
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            rss += int(line.split()[1])
                            self.peak_process_mb = max(self.peak_process_mb, int(line.split()[1]) / 1024)
                        elif line.startswith("RssAnon:"):
                            anon += int(line.split()[1])
            except OSError:  # the process ended between listing and reading
                pass
        self.peak_rss_mb = max(self.peak_rss_mb, rss / 1024)
        self.peak_anon_mb = max(self.peak_anon_mb, anon / 1024)


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the name in (...) may hold spaces
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


# ---------------------------------------------------------------- the run

def _timed(fn, *args, **kwargs) -> dict:
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        value = fn(*args, **kwargs)
        seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(mem.peak_rss_mb), "peak_anon_mb": round(mem.peak_anon_mb),
            "peak_process_mb": round(mem.peak_process_mb), "value": value}


def compare(reference, other) -> dict:
    """Label agreement and max |P difference| of ``other`` against ``reference`` (DataFrames), on path."""
    cols = ["path", "pred", "prob_pneumonia"]
    ref = reference[reference["pred"].notna()][cols]
    both = ref.merge(other[other["pred"].notna()][cols], on="path", suffixes=("_ref", ""))
    if both.empty:
        return {"compared": 0, "label_agreement": None, "max_prob_diff": None}
    return {"compared": len(both), "label_agreement": round(float((both["pred_ref"] == both["pred"]).mean()), 4),
            "max_prob_diff": float((both["prob_pneumonia_ref"] - both["prob_pneumonia"]).abs().max())}


def run_benchmark(s: BenchSettings, *, log=print) -> dict:
    import gc

    import pandas as pd
    import torch

    from .discover import discover
    from .output import read_table
    from .raycluster import ensure_ray
    from .registry import describe, load
    from .score import ScoreSettings, run_score

    work = Path(s.workdir)
    work.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(), "settings": asdict(s)}
    log(f"benchmark settings: {json.dumps(asdict(s))}")
    t0 = time.perf_counter()
    archive = s.archive or str(make_bench_archive(work / "archive", s.images, s.min_side, s.max_side, seed=s.seed))
    paths = [e.path for e in discover(archive)][: s.images]
    sizes = [os.path.getsize(os.path.join(archive, p)) for p in paths]
    result["archive"] = {"path": archive, "images": len(paths), "mean_kb": round(sum(sizes) / len(sizes) / 1024),
                         "prepared_s": round(time.perf_counter() - t0, 1)}
    device = _device(s.device)
    result["device"] = device if device == "cpu" else f"cuda: {torch.cuda.get_device_name()}"
    info = describe(s.model)
    model = s.model
    if s.calibrate and not info.trained:
        name = "".join(c if c.isalnum() else "-" for c in s.model)[-60:]  # the cache is per spec and seed
        model = calibrated_checkpoint(s.model, archive, paths, work / f"calibrated-{name}-seed{s.seed}.ckpt",
                                      seed=s.seed)
    result["model"] = {"spec": s.model, "scored_as": model, "calibrated_head": model != s.model, "arch": info.arch}
    log(f"archive {archive}: {len(paths)} images, mean {result['archive']['mean_kb']} KB; model {model}")

    scored = describe(model)  # the model (a), (b) and (c) all run
    state = load(scored).state_dict()
    base_paths = paths[: s.baseline_images] if s.baseline_images else paths
    r = _timed(baseline_pytorch, archive, base_paths, state, scored.arch, work / "baseline.parquet",
               batch_size=s.batch_size, device=device, cam_stride=scored.cam_stride, threshold=scored.threshold,
               temperature=scored.temperature)
    result["baseline"] = _rate(r, len(base_paths))
    log(f"(a) plain PyTorch fp32: {result['baseline']['images_per_s']:.2f} images/s")
    del state
    gc.collect()

    result["forward"] = {}
    for mode in s.modes:
        precision, compiled, _ = parse_mode(mode)
        key = _forward_key(mode)
        if key not in result["forward"]:  # CAMs or not, the forward is the same
            ips = bare_forward(model, precision=precision, compile=compiled, batch_size=s.batch_size,
                               batches=s.forward_batches, device=device)
            result["forward"][key] = {"images_per_s": round(ips, 2)}
            log(f"(c) bare forward {key}: {ips:.2f} images/s")
        if compiled:
            torch._dynamo.reset()
    gc.collect()
    if s.decode_check:
        result["decode_check"] = decode_check(archive, paths, image_size=info.image_size, device=device)
        log(f"decode check: {result['decode_check']}")

    started = ensure_ray(None, num_cpus=s.num_cpus)
    try:
        import ray
        import ray.data

        result["ray_cpus"] = ray.cluster_resources().get("CPU", 0)
        # Ray Data's first execution in a process starts its own helper actors (~4 s here). Paid
        # once before any mode, with ray.init, so that it does not land on whichever mode runs first.
        t_warm = time.perf_counter()
        ray.data.range(2).map_batches(lambda b: b).materialize()
        result["ray_data_warmup_s"] = round(time.perf_counter() - t_warm, 1)
        result["score"] = {}
        for mode in s.modes:
            precision, compiled, cams = parse_mode(mode)
            out = work / f"score-{mode.replace('+', '-')}"
            settings = ScoreSettings(archive=archive, out=str(out), model=model, batch_size=s.batch_size,
                                     precision=precision, compile=compiled, cams=cams, overwrite=True,
                                     limit=len(paths), device="gpu" if device == "cuda" else "cpu")
            marks = []  # (time, rows done) each time rows reach the driver (at most every 2 s)
            started_at = time.perf_counter()
            r = _timed(run_score, settings, progress=lambda sm, total: marks.append(
                (time.perf_counter(), sm.scored + sm.errors)))
            summary = r.pop("value")
            row = _rate(r, summary.scored + summary.errors)
            row.update(errors=summary.errors, plan=summary.plan, **_steady(marks, started_at))
            result["score"][mode] = row
            log(f"(b) cxr-batch score {mode}: {row['images_per_s']:.2f} images/s ({row['seconds']:.1f} s,"
                f" peak RSS {row['peak_rss_mb']} MB)")
        if s.memory_check:
            result["memory_check"] = memory_check(s, work, log=log)
    finally:
        if started:
            ray.shutdown()

    ref = read_table(str(work / "score-fp32")).to_pandas()
    result["baseline"].update(compare(ref, pd.read_parquet(work / "baseline.parquet")))
    a = result["baseline"]["images_per_s"]
    for mode, row in result["score"].items():
        c = result["forward"][_forward_key(mode)]["images_per_s"]
        row.update(compare(ref, read_table(str(work / f"score-{mode.replace('+', '-')}")).to_pandas()))
        row.update(b_over_a=round(row["images_per_s"] / a, 2), b_over_c=round(row["images_per_s"] / c, 2),
                   b_over_c_steady=round(row["steady_images_per_s"] / c, 2) if row["steady_images_per_s"] else None)
    agreeing = [m for m, row in result["score"].items() if (row["label_agreement"] or 0) >= 0.99]
    result["fastest_agreeing_mode"] = max(agreeing, key=lambda m: result["score"][m]["images_per_s"])
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def _device(choice: str) -> str:
    import torch

    if choice == "gpu" and not torch.cuda.is_available():
        raise ValueError("--device gpu, but torch sees no GPU here; use --device cpu or auto.")
    return "cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu"


def _forward_key(mode: str) -> str:
    return mode.replace("+nocams", "")


def _steady(marks: list, t0: float) -> dict:
    """Start-up (seconds until the first rows are out) and the rate from then on: what the
    pipeline does per image once the actor is up, apart from what it costs to start."""
    if len(marks) < 2 or marks[-1][0] <= marks[0][0]:
        return {"first_rows_s": round(marks[0][0] - t0, 1) if marks else None, "steady_images_per_s": None}
    (t1, n1), (t2, n2) = marks[0], marks[-1]
    return {"first_rows_s": round(t1 - t0, 1), "steady_images_per_s": round((n2 - n1) / (t2 - t1), 2)}


def _rate(r: dict, images: int) -> dict:
    r.pop("value", None)
    return {"images": images, "images_per_s": round(images / r["seconds"], 2), **r}


def memory_check(s: BenchSettings, work: Path, *, log=print) -> dict:
    """Score N, then 10N small phantoms with the same settings: peak memory must not grow with N."""
    from .score import ScoreSettings, run_score

    n = s.memory_images
    archive = make_bench_archive(work / f"memory-archive-{s.memory_side}", 10 * n, s.memory_side, s.memory_side,
                                 seed=s.seed)
    out = {"model": s.memory_model, "side": s.memory_side}
    for key, limit in (("small", n), ("large", 10 * n)):
        settings = ScoreSettings(archive=str(archive), out=str(work / f"memory-{key}"), model=s.memory_model,
                                 batch_size=s.batch_size, overwrite=True, limit=limit)
        r = _timed(run_score, settings)
        r.pop("value")
        out[key] = {"images": limit, **r}
        log(f"memory check: {limit} images, peak RSS {r['peak_rss_mb']} MB, peak anon {r['peak_anon_mb']} MB")
    out["rss_growth"] = round(out["large"]["peak_rss_mb"] / out["small"]["peak_rss_mb"] - 1, 3)
    out["anon_growth"] = round(out["large"]["peak_anon_mb"] / out["small"]["peak_anon_mb"] - 1, 3)
    out["process_growth"] = round(out["large"]["peak_process_mb"] / out["small"]["peak_process_mb"] - 1, 3)
    return out


def machine() -> dict:
    import ray
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    mem_kb = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {"cpu": cpu, "cpus": os.cpu_count(), "memory_gb": round(mem_kb / 2**20, 1),
            "bf16_instructions": [f for f in ("avx512_bf16", "amx_bf16") if f in flags],
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "torch_threads": torch.get_num_threads(), "loadavg_start": list(os.getloadavg())}


def format_table(r: dict) -> str:
    a = r["baseline"]
    lines = [f"{'measurement':<34}{'images/s':>9}{'b/a':>7}{'b/c':>7}{'steady':>8}{'b/c':>6}{'peak RSS MB':>13}"
             f"{'agree fp32':>12}{'max |dP|':>10}",
             f"{'(a) plain PyTorch, fp32':<34}{a['images_per_s']:>9.2f}{'':>28}{a['peak_rss_mb']:>13}"
             f"{_pct(a.get('label_agreement')):>12}{_num(a.get('max_prob_diff')):>10}"]
    for mode, c in r["forward"].items():
        lines.append(f"{'(c) bare forward, ' + mode:<34}{c['images_per_s']:>9.2f}")
    for mode, b in r["score"].items():
        lines.append(f"{'(b) cxr-batch score, ' + mode:<34}{b['images_per_s']:>9.2f}{b['b_over_a']:>7.2f}"
                     f"{b['b_over_c']:>7.2f}{_num(b['steady_images_per_s'], 2):>8}{_num(b['b_over_c_steady'], 2):>6}"
                     f"{b['peak_rss_mb']:>13}{_pct(b['label_agreement']):>12}{_num(b['max_prob_diff']):>10}")
    lines.append(f"fastest mode agreeing with fp32 on >= 99% of labels: {r['fastest_agreeing_mode']}")
    m = r["machine"]
    lines.append(f"machine: {m['cpu']}, {m['cpus']} CPUs, {m['memory_gb']} GB; torch {m['torch']}, ray {m['ray']};"
                 f" load average {m['loadavg_start'][0]:.1f} at start, {m['loadavg_end'][0]:.1f} at end;"
                 f" device {r.get('device', 'cpu')}")
    if a["images"] != r["archive"]["images"]:
        lines.append(f"(a) ran on the first {a['images']} of the {r['archive']['images']} images")
    if "decode_check" in r:
        d = r["decode_check"]
        gpu = d.get("gpu_nvjpeg_images_per_s")
        lines.append(f"decode check ({d['images']} files in memory): PIL draft decode + resize"
                     f" {d['pil_draft_per_core_images_per_s']:.1f} images/s per CPU core"
                     + (f"; nvJPEG on the GPU + resize {gpu:.1f} images/s" if gpu else ""))
    if "memory_check" in r:
        m = r["memory_check"]
        lines.append(f"memory check ({m['model']}, {m['side']} px): {m['small']['images']} images peak RSS "
                     f"{m['small']['peak_rss_mb']} MB, {m['large']['images']} images {m['large']['peak_rss_mb']} MB"
                     f" ({m['rss_growth']:+.0%}; private anon {m['anon_growth']:+.0%}; largest process"
                     f" {m['small']['peak_process_mb']} -> {m['large']['peak_process_mb']} MB, {m['process_growth']:+.0%})")
    return "\n".join(lines)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"
