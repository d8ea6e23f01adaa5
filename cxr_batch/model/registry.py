"""Which model a command uses: ``--model`` (a checkpoint or ARCH:WEIGHTS), else ``CXR_BATCH_MODEL``,
else the checkpoint that the last finished training registered as the user's default."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..archive import storage
from .checkpoint import load_checkpoint, model_from_checkpoint
from ..errors import InputError
from .network import ARCHS, WEIGHTS, CamResNet, build_model
from .receptive import cam_grid

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
    cam_layer: int = 4  # 3: the network ends at layer3 (every model `cxr-batch train` writes; model.build_model)
    temperature: float = 1.0  # P(PNEUMONIA) = softmax(logits / T): fitted on validation (model/calibration.py); 1 = none
    cam_offset: float = 0.0  # input pixel on which CAM cell 0's receptive field is centred (receptive.cam_grid)

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


def describe(spec: str | None) -> ModelInfo:
    """Resolve the model on the driver: fails fast, before any Ray work, on a bad spec or file."""
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
            build_model(arch, weights)  # refuse an unsafe or foreign file here, not in every scoring actor
        with torch.device("meta"):  # the layers alone tell the geometry; no weights needed
            grid = cam_grid(build_model(arch, "none").trunk, DEFAULT_IMAGE_SIZE)
        return ModelInfo(spec, arch, spec, DEFAULT_IMAGE_SIZE, 0.5, False, cam_stride=grid.stride, cam_offset=grid.offset)
    spec = storage.absolute(spec)
    loaded = load_checkpoint(spec)
    ck = loaded.ckpt
    model = model_from_checkpoint(ck, spec)  # weights that do not fit fail here, in one line, not in every actor
    grid = cam_grid(model.trunk, int(ck["image_size"]))
    return ModelInfo(spec, ck["arch"], loaded.model_id, int(ck["image_size"]), float(ck["threshold"]), True,
                     cam_stride=grid.stride, cam_offset=grid.offset, cam_layer=int(ck.get("cam_layer", 4)),
                     temperature=float(ck.get("temperature", 1.0)))  # older checkpoints: T = 1


def load(info: ModelInfo) -> CamResNet:
    """Build the network for ``info`` (in each scoring actor: the weights never travel through Ray)."""
    parsed = parse_arch_spec(info.spec)
    if parsed:
        model = build_model(*parsed)
    else:
        loaded = load_checkpoint(info.spec)
        if loaded.model_id != info.model_id:
            raise InputError(f"{info.spec} changed while the job ran (hash {loaded.model_id} != {info.model_id}).")
        model = model_from_checkpoint(loaded.ckpt, info.spec)
    return model.eval()


def fc_weight(model: CamResNet) -> torch.Tensor:
    return model.fc.weight.detach()


def fc_bias(model: CamResNet) -> torch.Tensor:
    return model.fc.bias.detach()
