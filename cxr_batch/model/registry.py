"""Which model a command uses: ``--model`` (a checkpoint or ARCH:WEIGHTS), else ``CXR_BATCH_MODEL``,
else the checkpoint that the last finished training registered as the user's default.

Importing this module imports no torch: ``describe(spec, check=False)`` answers from a checkpoint's
small entries, so `cxr-batch score` can start decoding while torch loads (jobs/local_engine.py)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..archive import storage
from ..errors import CheckpointError, InputError
from .archs import ARCHS, WEIGHTS, check_cam, resnet_grid
from .entries import check_model
from .ood import threshold_of

if TYPE_CHECKING:
    import torch

    from .network import CamResNet
    from .ood import OodStats

DEFAULT_IMAGE_SIZE = 224


@dataclass(frozen=True)
class ModelInfo:
    spec: str  # what the user gave: a checkpoint path/URI or "resnet18:none"
    arch: str
    model_id: str  # checkpoint sha256 prefix, or the ARCH:WEIGHTS spec itself
    image_size: int
    threshold: float  # P(PNEUMONIA) at or above which the prediction is PNEUMONIA
    trained: bool  # False for ARCH:WEIGHTS: the 2-class head is random
    cam_stride: int = 32  # 16: layer4 without its stride, or a map from layer3 (see model.build_model)
    cam_layer: int = 4  # 3 / 2: the network ends at layer3 / layer2 (what `cxr-batch train` writes; model.build_model)
    temperature: float = 1.0  # P(PNEUMONIA) = softmax(logits / T): fitted on validation (model/calibration.py); 1 = none
    cam_offset: float = 0.0  # input pixel on which CAM cell 0's receptive field is centred (receptive.cam_grid)
    # An image whose OOD score (model/ood.py) is above this is out of scope; None: the checkpoint has no
    # OOD statistics (written before they existed, or ARCH:WEIGHTS).
    ood_threshold: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def home() -> Path:
    base = os.environ.get("CXR_BATCH_HOME") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "cxr-batch")
    return Path(base)


def register_default(checkpoint_uri: str) -> Path:
    path = home() / "default-model.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": storage.absolute(checkpoint_uri), "registered": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    return path


def default_spec() -> str | None:
    if os.environ.get("CXR_BATCH_MODEL"):
        return os.environ["CXR_BATCH_MODEL"]
    path = home() / "default-model.json"
    if path.exists():
        return json.loads(path.read_text())["model"]
    return None


def parse_arch_spec(spec: str) -> tuple[str, str] | None:
    """"resnet18:none" -> ("resnet18", "none"); None when ``spec`` is not of that form."""
    arch, sep, weights = spec.partition(":")
    if not sep or arch not in ARCHS or "/" in arch:
        return None
    return arch, weights


def describe(spec: str | None, *, check: bool = True) -> ModelInfo:
    """Resolve the model on the driver: fails fast, before any Ray work, on a bad spec or file.

    ``check``: also build the network and load its weights, so that weights which do not fit fail
    here, in one line, not in every scoring actor. ``check=False`` reads only a checkpoint's small
    entries and hash, without torch: for the local engine, whose model is built in this same
    process, after its decode pool has started (the build checks the weights then)."""
    spec = spec or default_spec()
    if not spec:
        raise InputError(
            "No model given and no default model registered. Train one (`cxr-batch train DATA --out RUN`,"
            " or `cxr-batch demo`), or pass --model CHECKPOINT (or --model resnet18:none for a smoke test)."
        )
    parsed = parse_arch_spec(spec)
    if parsed:
        arch, weights = parsed
        if weights not in WEIGHTS:
            weights = storage.absolute(weights)  # the scoring actors' working directory is not ours
            spec = f"{arch}:{weights}"
            if not storage.exists(weights):
                raise InputError(f"Invalid --model {spec}: weights must be imagenet, none or an existing file.")
            if check:
                from .network import build_model

                build_model(arch, weights)  # refuse an unsafe or foreign file here, not in every scoring actor
        grid = _grid(arch, 32, 4, DEFAULT_IMAGE_SIZE, check)
        return ModelInfo(spec, arch, spec, DEFAULT_IMAGE_SIZE, 0.5, False, cam_stride=grid.stride, cam_offset=grid.offset)
    spec = storage.absolute(spec)
    if check:
        from .checkpoint import load_checkpoint, model_from_checkpoint
        from .receptive import cam_grid

        loaded = load_checkpoint(spec)
        ck, model_id = loaded.ckpt, loaded.model_id
        model = model_from_checkpoint(ck, spec)  # weights that do not fit fail here, in one line, not in every actor
        grid = cam_grid(model.trunk, int(ck["image_size"]))
    else:
        from .entries import checkpoint_entries

        ck, model_id = checkpoint_entries(spec)
        grid = _checkpoint_grid(ck, spec)
    return ModelInfo(spec, ck["arch"], model_id, int(ck["image_size"]), float(ck["threshold"]), True,
                     cam_stride=grid.stride, cam_offset=grid.offset, cam_layer=int(ck.get("cam_layer", 4)),
                     temperature=float(ck.get("temperature", 1.0)),  # older checkpoints: T = 1
                     ood_threshold=threshold_of(ck.get("ood")))


def _grid(arch: str, cam_stride: int, cam_layer: int, image_size: int, check: bool):
    """The map's geometry: walked out of the network's layers when it is built anyway (check),
    else from archs.resnet_grid, which tests and every Scorer hold to the walked one."""
    if not check:
        return resnet_grid(cam_stride, image_size)
    import torch

    from .network import build_model
    from .receptive import cam_grid

    with torch.device("meta"):  # the layers alone tell the geometry; no weights needed
        return cam_grid(build_model(arch, "none", cam_stride=cam_stride, cam_layer=cam_layer, init=False).trunk,
                        image_size)


def _checkpoint_grid(ck: dict, uri: str):
    """What load_checkpoint and model_from_checkpoint refuse, refused from the entries alone."""
    check_model(ck, uri)
    try:
        stride, layer = int(ck.get("cam_stride", 32)), int(ck.get("cam_layer", 4))  # older checkpoints: layer4
        check_cam(layer, stride)
        float(ck["threshold"])
        return resnet_grid(stride, int(ck["image_size"]))
    except (InputError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{uri}: {e}. Was it written by `cxr-batch train`, unmodified?") from None


def load(info: ModelInfo) -> CamResNet:
    """Build the network for ``info`` (in each scoring actor: the weights never travel through Ray)."""
    return load_with_ood(info)[0]


def load_with_ood(info: ModelInfo) -> tuple[CamResNet, OodStats | None]:
    """``load``, and the checkpoint's OOD statistics (None where it has none), from one read of the file."""
    from .checkpoint import load_checkpoint, model_from_checkpoint
    from .network import build_model
    from .ood import from_entries

    parsed = parse_arch_spec(info.spec)
    if parsed:
        return build_model(*parsed).eval(), None
    loaded = load_checkpoint(info.spec)
    if loaded.model_id != info.model_id:
        raise InputError(f"{info.spec} changed while the job ran (hash {loaded.model_id} != {info.model_id}).")
    return model_from_checkpoint(loaded.ckpt, info.spec).eval(), from_entries(loaded.ckpt.get("ood"))


def fc_weight(model: CamResNet) -> torch.Tensor:
    return model.fc.weight.detach()


def fc_bias(model: CamResNet) -> torch.Tensor:
    return model.fc.bias.detach()
