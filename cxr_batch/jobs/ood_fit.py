"""After training: fit the out-of-distribution statistics (model/ood.py) and store them in best.ckpt.

The statistics are the best model's own pooled features of the training images, through the same
decode and preprocessing as scoring (pixels/transforms.py; no augmentation); the threshold is a
percentile of the validation images' scores. It runs as one Ray task with a training worker's
resources (its GPU too), where DATA and --out are already known to be reachable, so the driver
never holds a model. last.ckpt keeps none: its weights are the last epoch's, not best.ckpt's, and
a resume of the run refits after its new best.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from ..archive import storage
from .train_config import TrainSettings
from .trainset import Split, load_pixels


def fit_ood(s: TrainSettings, split: Split, *, use_gpu: bool) -> dict:
    """Fit and store the statistics of ``s.out``/best.ckpt; -> what the training summary says of them."""
    import ray

    task = ray.remote(_fit_task).options(num_cpus=s.cpus_per_worker, num_gpus=1 if use_gpu else 0, max_retries=0)
    return ray.get(task.remote(asdict(s), split.train, split.val))


def _fit_task(settings: dict, train: list, val: list) -> dict:
    import torch

    from ..model.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
    from ..model.ood import OodStats, PERCENTILE, SHRINKAGE, fit_gaussian, mahalanobis, pooled_features, threshold_at

    s = TrainSettings(**settings)
    uri = storage.join(s.out, "best.ckpt")
    ckpt = load_checkpoint(uri).ckpt
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model_from_checkpoint(ckpt, uri).eval().to(device)
    x, y, _ = load_pixels(s.data, train, s.image_size, s.max_pixels)  # unreadable images: said by the workers already
    means, precision = fit_gaussian(pooled_features(model, x, device=device), y, shrinkage=SHRINKAGE)
    vx, _, _ = load_pixels(s.data, val, s.image_size, s.max_pixels)
    val_feats = pooled_features(model, vx, device=device)
    val_scores = mahalanobis(torch.from_numpy(val_feats), torch.from_numpy(means), torch.from_numpy(precision)).numpy()
    stats = OodStats(means=means, precision=precision, threshold=threshold_at(val_scores, PERCENTILE),
                     n_train=len(y), n_val=len(vx))
    save_checkpoint({**ckpt, "ood": stats.to_entries()}, uri)
    return {"threshold": stats.threshold, "percentile": stats.percentile, "n_train": stats.n_train,
            "n_val": stats.n_val, "val_out_of_scope": float(np.mean(val_scores > stats.threshold)) if len(vx) else None}
