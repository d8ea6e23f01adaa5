"""The checkpoint format shared by training and scoring (safe loading of the file: weights.py).

A checkpoint is one ``torch.save`` of a plain dict (tensors, numbers, strings, lists, dicts), so it
loads with ``torch.load(weights_only=True)`` (``weights.load_state_file_bytes``): a file that would
need to unpickle a Python object (and could run code doing so) is refused, not executed.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import torch

from .. import CLASSES
from ..archive import storage
from ..errors import CheckpointError, InputError, one_line
from .entries import FORMAT, check_format, check_model
from .network import CamResNet, build_model
from .weights import load_state_file_bytes, read_file

VERSION = 1


def make_checkpoint(model: CamResNet, *, arch: str, image_size: int, threshold: float, settings: dict, cam_stride: int = 32,
                    cam_layer: int = 4, epoch: int = 0, metrics: dict | None = None, optimizer: dict | None = None,
                    history: list | None = None, temperature: float = 1.0, validation: dict | None = None) -> dict:
    """``temperature``: scoring reports softmax(logits / T); ``threshold`` is on that calibrated scale.
    ``validation``: ``Split.record()`` (jobs/trainset.py, also written as val_files.json): which files
    validated this model, how they were chosen and how grouped into patients (stored as "val_files",
    "val_note" and "val_grouping")."""
    state = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    validation = validation or {}
    return {
        "format": FORMAT, "version": VERSION, "arch": arch, "classes": list(CLASSES),
        "image_size": int(image_size), "cam_stride": int(cam_stride),
        "cam_layer": int(cam_layer), "threshold": float(threshold), "settings": settings,
        "temperature": float(temperature), "val_files": list(validation.get("files", [])),
        "val_note": str(validation.get("validation", "")), "val_grouping": str(validation.get("grouping", "")),
        "epoch": int(epoch), "metrics": metrics or {}, "history": history or [],
        "state_dict": state, "optimizer": optimizer,
    }


def save_checkpoint(ckpt: dict, uri: str) -> None:
    """Write atomically (temp name + rename on local disks; S3 puts are atomic already)."""
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    storage.write_bytes_atomic(uri, buf.getvalue())


@dataclass(frozen=True)
class LoadedCheckpoint:
    ckpt: dict
    model_id: str  # first 16 hex digits of the file's sha256


def load_checkpoint(uri: str) -> LoadedCheckpoint:
    data = read_file(uri)
    ckpt = load_state_file_bytes(data, uri)
    check_format(ckpt, uri)
    check_model(ckpt, uri)
    return LoadedCheckpoint(ckpt, hashlib.sha256(data).hexdigest()[:16])


def model_from_checkpoint(ckpt: dict, uri: str = "the checkpoint") -> CamResNet:
    """The network a checkpoint describes, with its weights. Cheap enough (no copy of the
    weights) that the driver calls it to vet a checkpoint before any Ray work."""
    # Built on the meta device: no memory and no random initialisation for weights that the
    # checkpoint replaces at once, a cost every scoring actor would pay at start-up; init=False
    # too, or the meta normal_ would import torch._dynamo, which is slow (network.build_model).
    arch = ckpt["arch"]
    try:
        with torch.device("meta"):
            model = build_model(arch, "none", cam_stride=int(ckpt.get("cam_stride", 32)),
                                cam_layer=int(ckpt.get("cam_layer", 4)), init=False)  # older checkpoints: layer4
    except InputError as e:
        raise CheckpointError(f"{uri}: {e}") from None
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{uri} has no state_dict of weights; was it written by `cxr-batch train`?")
    try:
        model.load_state_dict(state, assign=True)  # strict: every key present, every shape right
    except (RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{uri}: its weights do not fit a {arch} ({one_line(e)}). Was it written by"
                              " `cxr-batch train`, unmodified?") from None
    return model


def _unwrap(model):
    return getattr(model, "module", getattr(model, "_orig_mod", model))
