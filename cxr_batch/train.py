"""The training job: Ray Train data-parallel fine-tuning of a CamResNet.

Transfer learning as it should be done: ImageNet weights when available, a new 2-class head, a
warm-up with the backbone frozen (so the random head's large gradients do not wreck pretrained
filters), then all layers at a lower learning rate with cosine decay. Classes are weighted by
inverse frequency (the public set is 74% PNEUMONIA). Every epoch all ranks all-reduce their
counts, rank 0 writes ``last.ckpt`` (and ``best.ckpt`` when val AUC improves), and a re-run of
the same ``--out`` resumes from ``last.ckpt``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from . import storage
from .decode import DEFAULT_MAX_PIXELS
from .errors import InputError
from .model import WEIGHTS, check_arch

THRESHOLD_RULES = ("youden", "sensitivity")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_SPREAD")


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    data: str  # folder (or s3:// prefix) with train/, val/, test/ each holding NORMAL/ and PNEUMONIA/
    out: str  # run folder: last.ckpt, best.ckpt, history.json; re-running it resumes
    arch: str = "resnet101"
    weights: str = "imagenet"  # imagenet | none | path to a torchvision state dict
    epochs: int = 10  # total, warm-up included
    warmup_epochs: int = 1  # head only, backbone frozen; skipped when weights=none (nothing to protect)
    batch_size: int = 32  # per worker
    lr: float | None = None  # fine-tuning lr (AdamW); None = 1e-4 pretrained, 5e-4 from scratch (2e-3 stalled for 6 epochs on phantoms)
    warmup_lr: float = 1e-3
    weight_decay: float = 1e-4
    image_size: int = 224
    cam_stride: int = 16  # 16: a 14x14 CAM at 224 px instead of 7x7 (see model.build_model)
    workers: int = 2
    gpu: bool | None = None  # None = use GPUs when the cluster has them
    cpus_per_worker: float = 1.0
    # Ray placement group strategy for the workers: PACK fills one node first (fast all-reduce);
    # SPREAD prefers one worker per node, STRICT_SPREAD refuses to start without it.
    placement: str = "PACK"
    val_fraction: float = 0.1  # of train/, by patient, stratified, when val/ is missing or tiny (patients.py)
    target_sensitivity: float | None = None  # None: threshold by Youden's J on val
    seed: int = 0
    max_failures: int = 1  # worker-group restarts (from the last checkpoint) before giving up
    max_pixels: int = DEFAULT_MAX_PIXELS
    stop_after_epoch: int | None = None  # testing hook: end the run (not the count) after this epoch

    def __post_init__(self):
        check_arch(self.arch)
        if self.epochs < 1 or self.workers < 1 or self.batch_size < 1:
            raise InputError("--epochs, --workers and --batch-size must be at least 1.")
        if self.target_sensitivity is not None and not 0 < self.target_sensitivity < 1:
            raise InputError("--target-sensitivity must be between 0 and 1, e.g. 0.95.")
        if self.image_size < 64:
            raise InputError("--image-size must be at least 64 px.")
        if self.placement not in PLACEMENTS:
            raise InputError(f"Invalid --placement {self.placement}. Only {', '.join(PLACEMENTS)} are supported.")

    @property
    def pretrained(self) -> bool:
        return self.weights != "none"

    @property
    def finetune_lr(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.pretrained else 5e-4)

    @property
    def n_warmup(self) -> int:
        return min(self.warmup_epochs, self.epochs - 1) if self.pretrained else 0


def lr_at(s: TrainSettings, epoch: int) -> tuple[str, float]:
    """(phase, lr) of 1-based ``epoch``: warm-up at warmup_lr, then cosine from finetune_lr to 5% of it."""
    if epoch <= s.n_warmup:
        return "warmup", s.warmup_lr
    n = s.epochs - s.n_warmup
    k = epoch - s.n_warmup - 1
    return "finetune", s.finetune_lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * k / max(1, n))))


def choose_threshold(y, p, target_sensitivity: float | None) -> tuple[float, str]:
    from .metrics import threshold_for_sensitivity, youden_threshold

    if len(set(np.asarray(y).tolist())) < 2:
        return 0.5, "default 0.5 (val has one class)"
    if target_sensitivity is not None:
        return float(threshold_for_sensitivity(y, p, target_sensitivity)), f"sensitivity >= {target_sensitivity:g} on val"
    return float(youden_threshold(y, p)), "Youden's J on val"


def run_train(s: TrainSettings, *, echo=print, register: bool = True) -> dict:
    """Run (or resume) training; returns the final summary dict. Ray must be initialised."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .train_loop import train_loop
    from .trainset import make_split

    s = replace(s, data=storage.absolute(s.data), out=storage.absolute(s.out),
                weights=s.weights if s.weights in WEIGHTS else storage.absolute(s.weights))
    split = make_split(s.data, val_fraction=s.val_fraction, seed=s.seed)
    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = bool(gpus >= 1) if s.gpu is None else s.gpu
    if use_gpu and gpus < s.workers:
        raise InputError(f"--gpu with {s.workers} workers, but the cluster has {int(gpus)} GPUs.")
    _check_fits(s, use_gpu)
    _check_shared_storage(s)
    storage.makedirs(s.out)
    storage.write_bytes_atomic(storage.join(s.out, "settings.json"), json.dumps(asdict(s), indent=2).encode())
    record = split.record()
    storage.write_bytes_atomic(storage.join(s.out, "val_files.json"), json.dumps(record, indent=1).encode())
    counts = np.bincount([y for _, y in split.train], minlength=2)
    echo(f"train: {len(split.train)} images (NORMAL {counts[0]}, PNEUMONIA {counts[1]}); validation: {split.val_note}")
    echo(f"model: {s.arch}, weights {s.weights}; {s.epochs} epochs ({s.n_warmup} warm-up), {s.workers} "
         f"{'GPU' if use_gpu else 'CPU'} workers x batch {s.batch_size}")
    t0 = time.perf_counter()
    ray_path, ray_fs = _ray_storage(s.out)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"settings": asdict(s), "train": split.train, "val": split.val, "class_counts": counts.tolist(),
                           "validation": {"files": record["files"], "grouping": split.val_note}},
        scaling_config=ScalingConfig(num_workers=s.workers, use_gpu=use_gpu, placement_strategy=s.placement,
                                     resources_per_worker={"CPU": s.cpus_per_worker}),
        run_config=RunConfig(
            # A fresh name each call: resuming is ours (from last.ckpt), so a finished earlier run
            # in the same storage cannot make Ray skip this one.
            name=f"train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
            storage_path=ray_path,
            storage_filesystem=ray_fs,
            failure_config=FailureConfig(max_failures=s.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    trainer.fit()
    if not storage.exists(storage.join(s.out, "history.json")):  # no epoch finished, yet Ray saw no error
        raise InputError(f"Training ended without finishing an epoch; nothing was written to {s.out}. See the"
                         " workers' messages above (unreadable images?).")
    history = json.loads(storage.read_bytes(storage.join(s.out, "history.json")))
    summary = _summary(s, history, split.val_note, time.perf_counter() - t0)
    if register and len(history) == s.epochs:
        from .registry import register_default

        summary["registered_as_default"] = str(register_default(summary["best_checkpoint"]))
    return summary


def _summary(s: TrainSettings, history: list, validation: str, seconds: float) -> dict:
    best = max(history, key=lambda h: (h["val_auc"] if h["val_auc"] is not None else -1, -h["val_loss"]))
    return {"out": s.out, "best_checkpoint": storage.join(s.out, "best.ckpt"), "best_epoch": best["epoch"],
            "epochs": len(history), "val_auc": best["val_auc"], "val_acc": best["val_acc"],
            "threshold": best["threshold"], "seconds": seconds, "validation": validation,
            "val_files": storage.join(s.out, "val_files.json"),
            # rows of runs begun before calibration existed lack these: T = 1 there
            "temperature": best.get("temperature", 1.0), "temperature_note": best.get("temperature_note", "not fitted"),
            "val_ece_before": best.get("val_ece_before"), "val_ece_after": best.get("val_ece_after"),
            "images_per_s_per_worker": float(np.mean([h["images_per_s_per_worker"] for h in history]))}


def _check_fits(s: TrainSettings, use_gpu: bool) -> None:
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    need = s.workers * s.cpus_per_worker
    if need > cpus:
        raise InputError(f"{s.workers} workers x {s.cpus_per_worker:g} CPUs need {need:g} CPUs; the Ray cluster has"
                         f" {cpus:g}. Lower --workers.")


def _check_shared_storage(s: TrainSettings) -> None:
    """Rank 0 writes checkpoints that every rank reads on restart: on several nodes that needs one
    filesystem all of them see. A local path is fine only when every node mounts it (NFS)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    if len(nodes) > 1 and not storage.is_uri(s.out) and not os.environ.get("CXR_BATCH_SHARED_FS"):
        raise InputError(
            f"--out {s.out} is a node-local path, but the Ray cluster has {len(nodes)} nodes: checkpoints must be on"
            " storage every node sees. Use --out s3://bucket/run (or set CXR_BATCH_SHARED_FS=1 if it is an NFS mount).")


def _ray_storage(out: str):
    """-> (storage_path, storage_filesystem) for Ray Train's RunConfig, under <out>/ray. For a URI
    Ray gets storage.py's own filesystem, so its files and our checkpoints go through one endpoint,
    region and set of credentials, decided in one place."""
    if storage.is_uri(out):
        fs, path = storage.resolve(storage.join(out, "ray"))
        return path, fs
    return os.path.abspath(os.path.join(out, "ray")), None
