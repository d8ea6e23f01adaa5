"""Training data: which files, split how, decoded once into memory, augmented per epoch.

Each Ray Train worker decodes only its own shard (rank::world) with the same decode path as
scoring, keeps it as uint8 (a 224 px image is 49 KB: the whole public set is 300 MB), and draws
fresh augmentations every epoch. That avoids a Ray Data read stage competing with the training
workers for CPUs (on 2 CPUs with 2 workers it would wait forever for one).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from .. import CLASSES
from ..archive import storage
from ..pixels.decode import decode_image
from ..archive.discover import discover, label_from_path
from ..errors import DecodeError, InputError
from ..pixels.transforms import to_model_pixels
from .patients import split_by_patient

MIN_VAL_IMAGES = 50  # below this (the public set's val/ has 16) AUC and a threshold are noise
MIN_VAL_PER_CLASS = 10


@dataclass(frozen=True)
class Split:
    train: list  # [(path relative to the data folder, label index)]
    val: list
    val_note: str  # how val was chosen, for the summary
    val_groups: tuple = ()  # patient key of each val item when val was split off by patient
    grouping: str = ""  # "grouped N images into M patients (...)"; "" when val/ was used as given

    def record(self) -> dict:
        """What the run keeps of it (val_files.json, the checkpoint; paths relative to the data
        folder): no patient ID in clear."""
        groups = list(self.val_groups) or [None] * len(self.val)
        return {"validation": self.val_note, "grouping": self.grouping or "val/ as given",
                "files": [rel for rel, _ in self.val],
                "val": [{"file": rel, "label": CLASSES[y], "patient": g} for (rel, y), g in zip(self.val, groups)]}


def labelled_files(data: str, split: str) -> list[tuple[str, int]]:
    """[(path relative to ``data``, label index)] of the labelled images under ``data``/``split``."""
    folder = storage.join(data, split)
    if not storage.is_dir(folder):
        return []
    out = []
    # Training data is the user's own curated tree, often split into folders of symlinks to bulk
    # storage: links are followed here (scoring keeps an archive's links inside it by default).
    for e in discover(folder, follow_symlinks=True):
        label = label_from_path(e.path)
        if label is not None:
            out.append((f"{split}/{e.path}", CLASSES.index(label)))
    return out


def make_split(data: str, *, val_fraction: float, seed: int) -> Split:
    train = labelled_files(data, "train")
    if not train:
        raise InputError(
            f"No labelled images under {storage.join(data, 'train')}: expected train/NORMAL/*.jpeg and"
            " train/PNEUMONIA/*.jpeg (the public pediatric pneumonia set's layout). Try `cxr-batch synth DIR`.")
    counts = np.bincount([y for _, y in train], minlength=2)
    if counts.min() == 0:
        raise InputError(f"train/ needs both classes; found NORMAL={counts[0]}, PNEUMONIA={counts[1]}.")
    val = labelled_files(data, "val")
    vcounts = np.bincount([y for _, y in val], minlength=2)
    if len(val) >= MIN_VAL_IMAGES and vcounts.min() >= MIN_VAL_PER_CLASS:
        return Split(train, val, f"val/ ({len(val)} images)")
    # Never by image: the public set has several images per patient (see jobs/patients.py).
    ps = split_by_patient(data, train, val_fraction, seed)
    why = "missing" if not val else f"has only {len(val)} images"
    return Split(ps.train, ps.val,
                 f"{len(ps.val)} images of {ps.n_val_patients} patients from train/ (about {val_fraction:.0%}, whole"
                 f" patients, stratified by class), because val/ {why}; {ps.grouping}", tuple(ps.val_groups), ps.grouping)


def shard(items: list, rank: int, world: int, seed: int) -> list:
    items = list(items)
    random.Random(seed).shuffle(items)  # mixes classes before striding, so shards are balanced
    return items[rank::world]


def load_pixels(data: str, items: list, image_size: int, max_pixels: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Decode a shard of ``data`` -> (uint8 (N, S, S), labels (N,), skipped [(path, error)])."""
    pixels, labels, skipped = [], [], []
    for rel, y in items:
        try:
            d = decode_image(storage.read_file(data, rel), max_pixels=max_pixels, draft=image_size)
        except DecodeError as e:  # the same one-line reasons as a scoring row's error
            skipped.append((rel, str(e)))
            continue
        pixels.append(to_model_pixels(d.gray, image_size))
        labels.append(y)
    if not pixels:
        return np.zeros((0, image_size, image_size), np.uint8), np.zeros(0, np.int64), skipped
    return np.stack(pixels), np.asarray(labels, np.int64), skipped


def augment(batch: torch.Tensor, gen: torch.Generator, *, scale=(0.7, 1.0), max_rotate=7.0,
            translate: float = 0.0) -> torch.Tensor:
    """uint8 (B, S, S) -> float [0, 1] (B, S, S), each image with its own random parameters:
    resized crop (70-100% of the area, aspect 0.85-1.18, so a lesion near the border survives),
    rotation, horizontal flip, then a shift of up to ``translate`` of the side in x and y (edge
    rows repeated), brightness/contrast. One affine grid_sample per batch, on the batch's device
    (the GPU in GPU training: the worker's one CPU would otherwise feed it); the random parameters
    come from the CPU generator ``gen`` either way, so runs are reproducible.

    Why the shift: without it a network learns where in the frame lesions tend to be, and its map's
    peaks are pulled towards mid-height (upper lesions found low, lower ones high). The crop alone
    moves the frame too little."""
    b, s, _ = batch.shape
    x = batch.float().unsqueeze(1) / 255.0
    u = torch.rand(b, 6, generator=gen).to(x.device)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    aspect = torch.exp((u[:, 1] - 0.5) * 2 * 0.17)
    sx, sy = torch.sqrt(area * aspect).clamp(max=1), torch.sqrt(area / aspect).clamp(max=1)
    tx, ty = (1 - sx) * (2 * u[:, 2] - 1), (1 - sy) * (2 * u[:, 3] - 1)
    angle = torch.deg2rad((2 * u[:, 4] - 1) * max_rotate)
    flip = torch.where(u[:, 5] < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    m = torch.stack([torch.stack([sx * cos * flip, -sy * sin], 1), torch.stack([sx * sin * flip, sy * cos], 1)], 1)
    shift = torch.zeros(b, 2, 1, device=x.device)
    if translate > 0:  # drawn only then, so runs without it keep their random streams
        # Output pixel p shows the cropped image at p + t, i.e. the input at m (p + t) + (tx, ty):
        # one resampling for both (normalised coordinates span 2, hence 2 * translate).
        t = (2 * torch.rand(b, 2, generator=gen) - 1) * 2 * translate
        shift = m @ t.to(x.device).unsqueeze(2)
    theta = torch.cat([m, torch.stack([tx, ty], 1).unsqueeze(2) + shift], 2)
    grid = torch.nn.functional.affine_grid(theta, x.shape, align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    v = torch.rand(b, 2, generator=gen).to(x.device)
    contrast = (0.8 + 0.4 * v[:, 0]).view(b, 1, 1, 1)
    brightness = ((v[:, 1] - 0.5) * 0.2).view(b, 1, 1, 1)
    mean = x.mean(dim=(2, 3), keepdim=True)
    return ((x - mean) * contrast + mean + brightness).clamp(0, 1).squeeze(1)
