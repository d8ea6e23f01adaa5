"""The built-in example archive: phantoms (phantom.py) written in the public pediatric pneumonia
set's layout, ``{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg``, plus ``truth.csv`` (path,label,x,y,r)
so that tests and ``cxr-batch evaluate`` can check that a CAM peak falls on the planted lesion."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from .. import CLASSES
from ..errors import InputError
from .phantom import JPEG_QUALITY, check_size
from . import FAMILIES
from .texture import family_image

SPLITS = ("train", "val", "test")


def make_archive(out_dir, *, n_train=160, n_val=40, n_test=80, size=256, seed=0, pos_fraction=0.5,
                 family="phantom") -> Path:
    """Write a phantom archive in the pediatric pneumonia set's layout; returns truth.csv's path.

    ``n_*`` count images per split, both classes together; ``round(n * pos_fraction)`` of each
    split are PNEUMONIA. Every image has its own generator seeded from (seed, split, index), so
    an archive is reproducible and one split does not change when another's size does.
    ``family`` picks the kind of image (synth/texture.py): the phantom, or an additive opacity on a
    textured background (``texture``) or on a flattened, textured phantom film (``film``).
    """
    check_size(size)
    if family not in FAMILIES:
        raise InputError(f"Invalid family {family}. Only {', '.join(FAMILIES)} are supported.")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"Refusing to write the example archive into {out}: it exists and is not empty. "
                         "Pass a new or empty directory.")
    if not 0.0 <= pos_fraction <= 1.0:
        raise InputError(f"Invalid pos_fraction {pos_fraction}: it must lie in [0, 1].")
    counts = {"train": n_train, "val": n_val, "test": n_test}
    if any(int(c) < 0 for c in counts.values()):
        raise InputError(f"Invalid image counts {counts}: each must be 0 or more.")
    rows = []
    for s, split in enumerate(SPLITS):
        rows += _write_split(out, split, s, int(counts[split]), size, seed, pos_fraction, family)
    truth = out / "truth.csv"
    with truth.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "x", "y", "r"])
        w.writerows(sorted(rows))
    return truth


def _write_split(out: Path, split: str, s: int, n: int, size: int, seed: int, pos_fraction: float, family: str) -> list:
    labels = np.zeros(n, dtype=int)
    labels[: int(round(n * pos_fraction))] = 1
    # Shuffle so that file index says nothing about the class.
    np.random.default_rng([seed, s, 1_000_003]).shuffle(labels)
    for name in CLASSES:
        (out / split / name).mkdir(parents=True, exist_ok=True)
    rows = []
    for i, y in enumerate(labels):
        pixels, truth = family_image(np.random.default_rng([seed, s, i]), size, family=family, opacity=bool(y))
        rel = f"{split}/{CLASSES[y]}/{split}-{i:05d}.jpeg"
        Image.fromarray(pixels).save(out / rel, quality=JPEG_QUALITY)
        xyr = [f"{truth[k]:.5f}" for k in ("x", "y", "r")] if truth else ["", "", ""]
        rows.append([rel, CLASSES[y], *xyr])
    return rows
