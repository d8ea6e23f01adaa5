"""Numbers -> PNGs for the reports: ROC, confusion matrix, training curves, a montage of errors,
reliability diagram and deletion curves.

Each function writes one PNG at ``path`` (parent folders created) and returns it as a ``Path``.

Figures are drawn on an explicit Agg canvas instead of through ``pyplot``: this works headless
(Ray workers, CI) without a display, never switches the backend of whoever imports us (a
notebook keeps its inline backend), and keeps no global figure registry that leaks memory when a
job draws hundreds of plots.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from .. import CLASSES
from .metrics import binary_metrics, roc_curve

DPI = 120


def _figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def _message(path, title: str, text: str) -> Path:
    """A small PNG that says why there is nothing to plot, so a report never has a broken image."""
    fig = _figure(5, 3)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=14, color="0.35")
    ax.set_axis_off()
    return _save(fig, path)


def plot_roc(y_true, score, threshold, path, *, title: str = "ROC") -> Path:
    """ROC curve with its AUC, the chance diagonal, and the operating point at ``threshold``."""
    m = binary_metrics(y_true, score, threshold)
    if m["roc_auc"] is None:
        return _message(path, title, "ROC undefined:\nonly one class present")
    fpr, tpr, _ = roc_curve(y_true, score)
    fig = _figure(5.2, 5)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, lw=2, color="C0", label=f"AUC = {m['roc_auc']:.3f} (n = {m['n']})")
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="0.6", label="chance")
    x, y = 1 - m["specificity"], m["sensitivity"]
    ax.plot([x], [y], "o", ms=9, color="C3", label=f"threshold = {m['threshold']:.3g}")
    # Put the note on the side of the point with room, so it never runs off the axes.
    ax.annotate(f"sens {y:.3f}\nspec {m['specificity']:.3f}", (x, y),
                xytext=(12 if x < 0.6 else -12, -28 if y > 0.3 else 12), textcoords="offset points",
                ha="left" if x < 0.6 else "right", fontsize=9,
                bbox={"boxstyle": "round", "fc": "white", "ec": "C3", "alpha": 0.9})
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal", title=title,
           xlabel="False positive rate (1 - specificity)", ylabel="True positive rate (sensitivity)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    return _save(fig, path)


def plot_confusion(confusion: dict, path, *, classes=CLASSES) -> Path:
    """2x2 matrix, truth in rows, prediction in columns; each cell shows count and row percentage."""
    missing = {"tn", "fp", "fn", "tp"} - set(confusion)
    if missing:
        raise ValueError(f"confusion lacks {sorted(missing)}; expected keys tn, fp, fn, tp.")
    if len(classes) != 2:
        raise ValueError(f"classes must name 2 classes, got {len(classes)}.")
    counts = np.array([[confusion["tn"], confusion["fp"]], [confusion["fn"], confusion["tp"]]], float)
    rows = counts.sum(axis=1, keepdims=True)
    # Colour by row share, not count: with an imbalanced test set the big class would hide the other.
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    fig = _figure(4.8, 4.2)
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            pct = f"{100 * share[i, j]:.1f}%" if rows[i, 0] else "n/a"
            ax.text(j, i, f"{int(counts[i, j])}\n{pct}", ha="center", va="center", fontsize=13,
                    color="white" if share[i, j] > 0.55 else "black")
    ax.set_xticks([0, 1], labels=list(classes))
    ax.set_yticks([0, 1], labels=list(classes))
    ax.set(xlabel="Predicted", ylabel="True", title=f"Confusion matrix (n = {int(counts.sum())})")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of true class")
    return _save(fig, path)


def _series(history: list[dict], key: str) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else float(r[key]) for r in history])


def _draw_series(ax, epochs, history, keys_labels, ylabel: str) -> None:
    drawn = False
    for key, label in keys_labels:
        y = _series(history, key)
        if np.isfinite(y).any():
            ax.plot(epochs, y, marker="o", ms=3, label=label)
            drawn = True
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not recorded", ha="center", va="center", color="0.5",
                transform=ax.transAxes)
    ax.set(xlabel="epoch", ylabel=ylabel)
    ax.grid(alpha=0.3)


def plot_training_curves(history: list[dict], path) -> Path:
    """Loss, accuracy and validation AUC per epoch; a dotted line where the phase changes.

    Missing or None values are gaps, a missing ``epoch`` is the row's 1-based position."""
    if not history:
        return _message(path, "Training curves", "no history recorded")
    epochs = np.array([r.get("epoch", i + 1) for i, r in enumerate(history)], float)
    fig = _figure(12, 3.8)
    axes = fig.subplots(1, 3)
    _draw_series(axes[0], epochs, history, [("train_loss", "train"), ("val_loss", "val")], "loss")
    _draw_series(axes[1], epochs, history, [("train_acc", "train"), ("val_acc", "val")], "accuracy")
    _draw_series(axes[2], epochs, history, [("val_auc", "val")], "ROC AUC")
    for ax, title in zip(axes, ("Loss", "Accuracy", "Validation AUC")):
        ax.set_title(title)
    # The head-only warmup and the full fine-tune behave differently; mark where one ends.
    phases = [r.get("phase") for r in history]
    for i in range(1, len(history)):
        if phases[i] != phases[i - 1] and phases[i] is not None:
            x = (epochs[i - 1] + epochs[i]) / 2
            for ax in axes:
                ax.axvline(x, ls=":", color="0.4", lw=1)
            axes[0].annotate(str(phases[i]), (x, 1), xycoords=("data", "axes fraction"),
                             xytext=(3, -12), textcoords="offset points", fontsize=8, color="0.3")
    return _save(fig, path)


def _load(image) -> np.ndarray:
    if isinstance(image, np.ndarray):
        return image
    with Image.open(image) as im:
        return np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB", "RGBA") else im)


def plot_montage(items: list[dict], path, *, title: str = "Most confident errors",
                 cols: int = 4) -> Path:
    """A grid of images (CAM overlays) with a caption above each; an empty list says "no errors"."""
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}.")
    if not items:
        return _message(path, title, "no errors")
    cols = min(cols, len(items))
    rows = -(-len(items) // cols)
    fig = _figure(3 * cols, 3.4 * rows + 0.4)
    fig.suptitle(title, fontsize=14)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, item in zip(axes, items):
        img = _load(item["image"])
        gray_u8 = img.ndim == 2 and img.dtype == np.uint8
        # A uint8 gray image keeps its own contrast instead of being stretched to min..max.
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None,
                  vmin=0 if gray_u8 else None, vmax=255 if gray_u8 else None)
        ax.set_title(textwrap.fill(str(item.get("caption", "")), 34), fontsize=8)
        ax.set_axis_off()
    for ax in axes[len(items):]:
        ax.set_axis_off()
    return _save(fig, path)


def plot_reliability(before: dict, after: dict, path, *, temperature: float) -> Path:
    """Reliability diagram: per bin of P(PNEUMONIA), the share that is PNEUMONIA against the mean
    predicted P, before (T = 1) and after temperature scaling; the diagonal is perfect calibration.
    ``before``/``after`` are calibration.reliability() dicts; marker area follows the bin's count."""
    fig = _figure(5.6, 5.4)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="0.6", label="perfect calibration")
    total = max(1, sum(before["count"]))
    for rel, colour, label in ((before, "C3", "before (T = 1)"), (after, "C0", f"after (T = {temperature:.2f})")):
        pts = [(m, f, c) for m, f, c in zip(rel["mean_p"], rel["frac_pos"], rel["count"]) if c]
        if not pts:
            continue
        m, f, c = (np.array(v, float) for v in zip(*pts))
        ax.plot(m, f, "-", color=colour, lw=1.5, label=f"{label}: ECE {rel['ece']:.3f}")
        ax.scatter(m, f, s=20 + 400 * c / total, color=colour, alpha=0.6, edgecolors="white")
    for edge in before["edges"][1:-1]:
        ax.axvline(edge, color="0.92", lw=0.8, zorder=0)
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal",
           xlabel="mean predicted P(PNEUMONIA) in the bin", ylabel="share of PNEUMONIA in the bin",
           title=f"Reliability ({len(before['count'])} equal-width bins, n = {total})")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def plot_deletion(deletion: dict, path) -> Path:
    """Mean P(PNEUMONIA) as the top CAM regions, or random regions, are greyed out step by step."""
    if not deletion or not deletion.get("n_images"):
        return _message(path, "Deletion curves", "no PNEUMONIA images sampled")
    x = np.asarray(deletion["fraction_deleted"])
    fig = _figure(6, 4.4)
    ax = fig.add_subplot()
    ax.plot(x, deletion["cam_curve"], "o-", ms=3, color="C3", label=f"CAM order: area {deletion['auc_cam']:.3f}")
    ax.plot(x, deletion["random_curve"], "o-", ms=3, color="0.4", label=f"random order: area {deletion['auc_random']:.3f}")
    ax.fill_between(x, deletion["cam_curve"], deletion["random_curve"], color="C3", alpha=0.12)
    lo, hi = deletion["auc_difference_ci95"]
    grid = "x".join(map(str, deletion["grid"]))
    ax.set(xlim=(0, 1), ylim=(-0.01, 1.01), xlabel=f"share of the image greyed out ({grid} blocks, mean grey fill)",
           ylabel="mean P(PNEUMONIA)",
           title=f"Deletion, {deletion['n_images']} PNEUMONIA images: gap {deletion['auc_difference']:.3f} [{lo:.3f}, {hi:.3f}]")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return _save(fig, path)
