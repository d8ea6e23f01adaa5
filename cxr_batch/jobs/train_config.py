"""What the training driver (train.py) and its workers (train_worker.py) share: the settings, the
learning-rate schedule, how the decision threshold is chosen (on the validation margins, mapped
onto the calibrated probabilities), and which epoch is "best".

One rule for the best epoch (``best_epoch``): the worker uses it to decide when to write
``best.ckpt``, the driver to report that epoch, so the two can never name different epochs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..model.calibration import calibrated
from ..model.archs import TRAIN_STRIDE, check_arch, check_cam
from ..pixels.decode import DEFAULT_MAX_PIXELS

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
    # Where the CAM and the head sit: 4 keeps the whole network (the standard transfer-learning recipe, and
    # the only one that learned on every task family tried: docs/decisions/001-full-network.md); 3 and 2 end it
    # at layer3 (stride 16) or layer2 (stride 8) for a finer map, at the cost of learning.
    cam_layer: int = 4
    cam_stride: int | None = None  # None = the layer's (archs.TRAIN_STRIDE); only layer4 has a choice (32, or 16 dilated)
    # Random shift of each training image, up to this share of its side in x and y (after the crop and rotation).
    # Off by default: the shifts were a fix for the layer2 map, and on the full network they are not yet shown
    # to learn as fast and as accurately (the same decision record).
    translate: float = 0.0
    # Weight of the CAM flip-consistency loss (model/camloss.py): each image trains beside its mirrored
    # twin and their maps must mirror too, which forbids the network to learn its evidence off the
    # lesion. 0 = plain training.
    cam_consistency: float = 0.0
    # Weight of the quiet-NORMAL loss (model/camloss.quiet_normal): no cell of a NORMAL image's map may vote
    # PNEUMONIA, so the map cannot carry a pattern common to both classes (hot top corners) that outshines a
    # faint lesion. 0 = off.
    cam_quiet: float = 0.0
    workers: int = 2
    gpu: bool | None = None  # None = use GPUs when the cluster has them
    # None = fit_worker_cpus: on CPU workers the most CPUs each that still places every worker (one worker
    # on a 2-CPU node gets both: torch's threads follow it, and a worker held to one thread trained about
    # 3x slower than a plain loop on both cores); 1 on GPU workers.
    cpus_per_worker: float | None = None
    # Ray placement group strategy for the workers: PACK fills one node first (fast all-reduce);
    # SPREAD prefers one worker per node, STRICT_SPREAD refuses to start without it.
    placement: str = "PACK"
    val_fraction: float = 0.1  # of train/, by patient, stratified, when val/ is missing or tiny (jobs/patients.py)
    target_sensitivity: float | None = None  # None: threshold by Youden's J on val
    seed: int = 0
    max_failures: int = 1  # worker-group restarts (from the last checkpoint) before giving up
    max_pixels: int = DEFAULT_MAX_PIXELS
    stop_after_epoch: int | None = None  # testing hook: end the run (not the count) after this epoch

    def __post_init__(self):
        check_arch(self.arch)
        # Resolved here, so the checkpoint, the run's settings and a resume see the number, not None.
        if self.cam_stride is None and self.cam_layer in TRAIN_STRIDE:
            object.__setattr__(self, "cam_stride", TRAIN_STRIDE[self.cam_layer])
        check_cam(self.cam_layer, self.cam_stride)
        if not 0 <= self.translate < 0.5:
            raise InputError(f"--translate must be at least 0 and below 0.5 (a share of the image side), not {self.translate}.")
        if not self.cam_quiet >= 0 or not self.cam_consistency >= 0:
            raise InputError("--cam-quiet and --cam-consistency must be at least 0 (0 = off).")
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


def fit_worker_cpus(workers: int, node_cpus: list[float], use_gpu: bool) -> float:
    """CPUs per training worker when --cpus-per-worker is not given: the most whole CPUs c such that
    every worker finds c CPUs on one node (sum over nodes of floor(cpus / c) >= workers; the nodes'
    totals, as _check_fits counts them), so the placement group can be placed and no node's cores sit idle when they could be used.
    GPU workers take 1: the GPU does the arithmetic, and GPU nodes an autoscaler has yet to start
    have no CPUs to count."""
    if use_gpu or not node_cpus:
        return 1.0
    for c in range(int(max(node_cpus)), 1, -1):
        if sum(int(n // c) for n in node_cpus) >= workers:
            return float(c)
    return 1.0


def lr_at(s: TrainSettings, epoch: int) -> tuple[str, float]:
    """(phase, lr) of 1-based ``epoch``: warm-up at warmup_lr, then cosine from finetune_lr to 5% of it."""
    if epoch <= s.n_warmup:
        return "warmup", s.warmup_lr
    n = s.epochs - s.n_warmup
    k = epoch - s.n_warmup - 1
    return "finetune", s.finetune_lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * k / max(1, n))))


def choose_threshold(y, p, target_sensitivity: float | None) -> tuple[float, str]:
    from ..reports.metrics import threshold_for_sensitivity, youden_threshold

    if len(set(np.asarray(y).tolist())) < 2:
        return 0.5, "default 0.5 (val has one class)"
    if target_sensitivity is not None:
        return float(threshold_for_sensitivity(y, p, target_sensitivity)), f"sensitivity >= {target_sensitivity:g} on val"
    return float(youden_threshold(y, p)), "Youden's J on val"


def calibrated_threshold(y, margin, temperature: float, target_sensitivity: float | None) -> tuple[float, str]:
    """The decision threshold on the calibrated P = sigmoid(margin / T): chosen on the margins (the
    rule needs only an order) and mapped through that same monotone transform, so the decisions
    are the raw margins' decisions whatever T is."""
    threshold, rule = choose_threshold(y, margin, target_sensitivity)
    if len(set(np.asarray(y).tolist())) == 2:  # else the default 0.5, already a probability
        threshold = float(calibrated(threshold, temperature))
    return threshold, rule


def best_epoch(history: list[dict]) -> dict:
    """The best epoch of ``history``: highest validation AUC, ties to the lower validation loss; when
    no epoch has an AUC (val holds one class), the lowest validation loss. The first of equals wins,
    so an epoch that was best when it finished stays best until a later one is strictly better."""
    if not history:
        raise InputError("No epoch has finished yet, so there is no best epoch.")
    return max(history, key=lambda h: (h["val_auc"] is not None, h["val_auc"] or 0.0, -h["val_loss"]))


# A best validation AUC below this makes a model "weak": it is not registered as the default of `cxr-batch
# score` unless asked (chance is 0.5; the reference set's published bar is 0.968).
WEAK_VAL_AUC = 0.8
STILL_LEARNING_ACC = 0.9  # training accuracy below which a run whose best epoch is its last has not fitted yet


def still_learning(history: list[dict]) -> str | None:
    """A line for the summary when the schedule ended before the model stopped learning, else None.

    Why: the epoch count is the user's guess, and a run stopped early still writes a checkpoint that
    scores and explains worse than the same network trained on. Said when the best epoch is one of the last two, training accuracy is still below
    ``STILL_LEARNING_ACC`` and the training loss still fell over the last third of the epochs."""
    if len(history) < 3:
        return None
    last, third = history[-1], history[-(len(history) // 3) - 1]
    acc, loss, earlier = last.get("train_acc"), last.get("train_loss"), third.get("train_loss")
    best = best_epoch(history)["epoch"]
    if None in (acc, loss, earlier) or best < last["epoch"] - 1:
        return None
    if acc < STILL_LEARNING_ACC and loss < 0.95 * earlier:
        return (f"still learning when the schedule ended (training accuracy {acc:.2f}, loss {earlier:.3f} ->"
                f" {loss:.3f} over the last {len(history) // 3} epochs, best epoch {best} of {last['epoch']}): a new"
                " --out with more --epochs is likely better")
    return None


def weak_model(history: list[dict]) -> str | None:
    """Why the run's best model should not be trusted as a default, or None: its best validation AUC is
    below ``WEAK_VAL_AUC``, validation could not measure one, or the run ended still learning."""
    auc = best_epoch(history)["val_auc"]
    if auc is None:
        return "validation holds one class, so nothing measured whether the model learned"
    if auc < WEAK_VAL_AUC:
        return f"best validation AUC {auc:.3f} is below {WEAK_VAL_AUC:g} (chance 0.5)"
    return "it ended still learning" if still_learning(history) else None
