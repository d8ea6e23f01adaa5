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
from ..fields import CLUSTER, DEVICES, INPUT, MODEL, OUTPUT, PERFORMANCE, TRAINING, setting
from ..model.archs import ARCHS, CAM_LAYERS, CAM_STRIDES, TRAIN_STRIDE, check_arch, check_cam
from ..pixels.decode import DEFAULT_MAX_PIXELS

PLACEMENTS = ("PACK", "SPREAD", "STRICT_SPREAD")
LR_PRETRAINED, LR_SCRATCH = 1e-4, 5e-4  # the fine-tuning lr when --lr is not given


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    data: str  # folder (or s3:// prefix) with train/, val/, test/ each holding NORMAL/ and PNEUMONIA/
    out: str = setting(help="Run folder (local or s3://) for last.ckpt, best.ckpt and history.json; a re-run resumes"
                       " it.", group=OUTPUT)
    arch: str = setting("resnet101", "The ResNet to fine-tune.", group=MODEL, choices=ARCHS)
    weights: str = setting("imagenet", "Starting weights: torchvision's ImageNet weights, none (random) or a local"
                           " state-dict file.", group=MODEL)
    epochs: int = setting(10, "Total epochs, warm-up included.", group=TRAINING)
    # Skipped when weights=none: a random backbone has nothing to protect from the new head's first steps.
    warmup_epochs: int = setting(1, "Epochs that train only the new head, the backbone frozen (pretrained weights"
                                 " only).", group=TRAINING)
    batch_size: int = setting(32, "Images per worker and step.", group=TRAINING)
    # From scratch needs the larger rate; a much larger one stalled training on phantoms.
    lr: float | None = setting(None, "Fine-tuning learning rate (AdamW, cosine decay).", group=TRAINING,
                               shown=f"{LR_PRETRAINED:g} pretrained, {LR_SCRATCH:g} from scratch")
    warmup_lr: float = 1e-3
    weight_decay: float = 1e-4
    image_size: int = setting(224, "Side in px of the images the network sees.", group=MODEL)
    # 4 keeps the whole network (the standard transfer-learning recipe, and the only one that learned on
    # every task family tried: docs/decisions/001-full-network.md); 3 and 2 end it at layer3 (stride 16)
    # or layer2 (stride 8) for a finer map, at the cost of learning.
    cam_layer: int = setting(4, "Where the network ends and its CAM is read: 4 is the whole ResNet, 3 and 2 cut it"
                             " after layer3 or layer2 for a finer map that learns more slowly.", group=MODEL,
                             choices=CAM_LAYERS)
    # Resolved in __post_init__ (archs.TRAIN_STRIDE); only layer4 has a choice (32, or 16 dilated).
    cam_stride: int | None = setting(None, "Stride of the CAM's cells: with --cam-layer 4, 32 keeps layer4 as built"
                                     " and 16 dilates it for a finer map.", group=MODEL, choices=CAM_STRIDES,
                                     shown="the layer's own")
    # Applied after the crop and rotation. Off by default: the shifts were a fix for the layer2 map, and on
    # the full network they are not yet shown to learn as fast and as accurately (the same decision record).
    translate: float = setting(0.0, "Random shift of each training image, up to this share of its side; 0 is off.",
                               group=TRAINING)
    # model/camloss.py: the mirrored twin forbids the network to learn its evidence off the lesion.
    cam_consistency: float = setting(0.0, "Weight of the CAM flip-consistency loss: each image trains beside its"
                                     " mirror image, whose CAM must mirror its own; 0 is off.", group=TRAINING)
    # model/camloss.quiet_normal: the map cannot carry a pattern common to both classes (hot top
    # corners) that outshines a faint lesion.
    cam_quiet: float = setting(0.0, "Weight of the quiet-NORMAL loss: no cell of a NORMAL image's CAM may vote"
                               " PNEUMONIA; 0 is off.", group=TRAINING)
    workers: int = setting(2, "Data-parallel Ray Train workers, one GPU each when they train on GPUs.",
                           group=PERFORMANCE)
    device: str = setting("auto", "Where the workers train; auto uses GPUs when the cluster has them.",
                          group=PERFORMANCE, choices=DEVICES)
    # What --device resolves to: None = GPUs when the cluster has them. Also the old --gpu/--no-gpu flag.
    gpu: bool | None = setting(None, "Deprecated: use --device gpu or --device cpu.", group=PERFORMANCE)
    # None = fit_worker_cpus: on CPU workers the most CPUs each that still places every worker (one worker
    # on a small node gets all its cores: torch's threads follow it, and a worker held to one thread
    # trains far slower than a plain loop on every core); 1 on GPU workers.
    cpus_per_worker: float | None = setting(None, "CPUs (and torch threads) per worker.", group=PERFORMANCE,
                                            shown="on CPU workers the most that still places every worker, 1 on"
                                                  " GPU workers")
    placement: str = setting("PACK", "How the workers spread over nodes: PACK fills one node first (a fast"
                             " all-reduce), SPREAD prefers one worker per node, STRICT_SPREAD requires it.",
                             group=CLUSTER, choices=PLACEMENTS)
    # By patient, stratified (jobs/patients.py).
    val_fraction: float = setting(0.1, "Share of train/ held out for validation when val/ is missing or tiny, by"
                                  " whole patients and stratified by class.", group=INPUT)
    target_sensitivity: float | None = setting(None, "Choose the decision threshold that reaches this sensitivity"
                                               " on validation.", group=TRAINING, shown="Youden's J")
    seed: int = setting(0, "Seed of the initial weights, the validation split and the order of the images.",
                        group=TRAINING)
    max_failures: int = setting(1, "Worker-group restarts, each from the last checkpoint, before the run fails.",
                                group=CLUSTER)
    max_pixels: int = DEFAULT_MAX_PIXELS
    stop_after_epoch: int | None = None  # testing hook: end the run (not the count) after this epoch

    def __post_init__(self):
        check_arch(self.arch)
        if self.device not in DEVICES:
            raise InputError(f"Invalid --device {self.device}. Only {', '.join(DEVICES)} are supported.")
        wanted = {"auto": None, "cpu": False, "gpu": True}[self.device]
        if self.gpu is None:
            object.__setattr__(self, "gpu", wanted)
        elif wanted is not None and wanted != self.gpu:
            raise InputError(f"--device {self.device} contradicts --{'' if self.gpu else 'no-'}gpu: drop --gpu/--no-gpu.")
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
        return self.lr if self.lr is not None else (LR_PRETRAINED if self.pretrained else LR_SCRATCH)

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
    from ..model.calibration import calibrated  # scipy: not for a command that only builds settings

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
