"""Out-of-distribution (OOD) statistics: does an image look like the ones the model was trained on?

The score is the Mahalanobis distance (Lee et al. 2018) of an image's pooled last features (the
vector the linear head reads, ``features.mean((2, 3))``) to the nearest class mean of the training
images, under one covariance shared by the classes. It is fitted after training on the training
images, and its threshold is a percentile of the validation images' scores: a score above it means
"not like anything the model was made for" (docs/decisions/002-ood-score.md says why this score
and not the energy score or a nearest-neighbour distance).

Training sets here can be small beside the feature width (a few hundred images, 512-2048
channels), so the sample covariance is singular: it is shrunk towards a multiple of the identity
(a fixed Ledoit-Wolf-style blend), which keeps it invertible and the distance stable.

Pure numpy for the fit (float64) and torch for the score (on the model's device, beside the
forward pass); nothing here knows of Ray, files or checkpoints beyond the plain entries they hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHOD = "mahalanobis"
# Blend of the sample covariance with a multiple of the identity (same trace): enough to invert a
# covariance of fewer images than channels, small enough to keep its shape (more shrinkage let the
# lateral and abdomen phantoms through: docs/decisions/002-ood-score.md).
SHRINKAGE = 0.01
# The threshold: this percentile of the validation images' scores. A high one, because a
# radiograph put out of scope is a result lost, while foreign images sit far above it.
PERCENTILE = 99.5


@dataclass(frozen=True)
class OodStats:
    means: np.ndarray  # (classes, D) mean pooled feature of each class's training images
    precision: np.ndarray  # (D, D) inverse of the shared, shrunk covariance
    threshold: float  # a score above this is out of scope
    percentile: float = PERCENTILE  # of the validation scores, that set the threshold
    shrinkage: float = SHRINKAGE
    n_train: int = 0
    n_val: int = 0
    method: str = METHOD

    def to_entries(self) -> dict:
        """Checkpoint entries: tensors, numbers and strings only (torch.load(weights_only=True) reads them)."""
        import torch

        return {"method": self.method, "means": torch.from_numpy(np.asarray(self.means, np.float32)),
                "precision": torch.from_numpy(np.asarray(self.precision, np.float32)),
                "threshold": float(self.threshold), "percentile": float(self.percentile),
                "shrinkage": float(self.shrinkage), "n_train": int(self.n_train), "n_val": int(self.n_val)}


def from_entries(entries) -> OodStats | None:
    """The statistics a checkpoint's ``ood`` entry holds; None for a checkpoint written without them."""
    if not isinstance(entries, dict) or entries.get("method") != METHOD:
        return None
    return OodStats(means=np.asarray(entries["means"], np.float32), precision=np.asarray(entries["precision"], np.float32),
                    threshold=float(entries["threshold"]), percentile=float(entries["percentile"]),
                    shrinkage=float(entries["shrinkage"]), n_train=int(entries["n_train"]), n_val=int(entries["n_val"]))


def threshold_of(entries) -> float | None:
    """The threshold alone, read from a checkpoint's small entries (no tensors needed)."""
    if not isinstance(entries, dict) or entries.get("method") != METHOD:
        return None
    return float(entries["threshold"])


def fit_gaussian(features: np.ndarray, labels: np.ndarray, *, n_classes: int = 2,
                 shrinkage: float = SHRINKAGE) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features (N, D) and their class indices (N,) -> (class means (C, D), precision (D, D)).
    A class with no image gets the mean of all images (it cannot be a nearer mean than there is)."""
    x = np.asarray(features, np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or len(x) < 2 or len(x) != len(y):
        raise ValueError(f"need (N, D) features with N >= 2 and one label each, got {x.shape} and {y.shape}")
    overall = x.mean(0)
    means = np.stack([x[y == c].mean(0) if (y == c).any() else overall for c in range(n_classes)])
    centred = x - means[y]
    cov = centred.T @ centred / len(x)
    d = cov.shape[0]
    shrunk = (1 - shrinkage) * cov + shrinkage * (np.trace(cov) / d) * np.eye(d)
    if not np.trace(cov) > 0:  # every image the same feature vector: any spread is far
        shrunk = np.eye(d)
    return means, np.linalg.inv(shrunk)


def pooled(features):
    """The vector the linear head reads: last features (N, C, H, W) averaged over the map -> (N, C), float32."""
    return features.float().mean(dim=(2, 3))


def pooled_features(model, pixels: np.ndarray, *, device, batch_size: int = 64) -> np.ndarray:
    """Model-sized uint8 pixels (N, S, S) -> pooled features (N, D) of an eval-mode CamResNet, as scoring sees them."""
    import torch

    from ..pixels.transforms import normalize

    out = []
    with torch.inference_mode():
        for i in range(0, len(pixels), batch_size):
            _, features = model(normalize(torch.from_numpy(np.ascontiguousarray(pixels[i:i + batch_size])).to(device)))
            out.append(pooled(features).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.fc.in_features), np.float32)


def mahalanobis(features, means, precision):
    """Distance of each pooled feature vector (torch (N, D)) to its nearest class mean (torch (C, D))
    under ``precision`` (torch (D, D)) -> torch (N,). A 2-class head makes this two (N, D) x (D, D)
    products: small beside the network's forward pass."""
    import torch

    x = features.to(precision.dtype)
    d2 = torch.stack([(((x - m) @ precision) * (x - m)).sum(1) for m in means], 1)
    return d2.min(1).values.clamp(min=0).sqrt()


def threshold_at(scores, percentile: float = PERCENTILE) -> float:
    """The ``percentile`` (0-100) of in-distribution ``scores`` (linear interpolation between ranks)."""
    s = np.asarray(scores, np.float64)
    s = s[np.isfinite(s)]
    if not len(s):
        raise ValueError("no finite scores to set a threshold on")
    return float(np.percentile(s, percentile))


def auroc(in_scores, out_scores) -> float | None:
    """P(an out-of-distribution score > an in-distribution one), ties counted half (Mann-Whitney)."""
    a = np.asarray(in_scores, np.float64)
    b = np.asarray(out_scores, np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if not len(a) or not len(b):
        return None
    a = np.sort(a)
    below, up_to = np.searchsorted(a, b, "left"), np.searchsorted(a, b, "right")
    return float((below + 0.5 * (up_to - below)).sum() / (len(a) * len(b)))
