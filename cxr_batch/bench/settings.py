"""The benchmark's settings and its precision modes ("fp32", "bf16+compile", "bf16+nocams", ...)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from ..fields import DEVICES
from ..model.archs import TRAIN_STRIDE, check_cam

PRECISIONS = ("fp32", "bf16")
# "bf16+compile", "fp32+nocams", "bf16+compile+nocams", ...; "+cpudecode": JPEGs decoded by the CPUs even
# where the model runs on a GPU (score's --decode-on cpu; the other modes use its auto: the GPU there).
MODE_FLAGS = ("compile", "nocams", "cpudecode")
REFERENCE = "fp32"  # every other mode's labels are compared with this one's


@dataclass(frozen=True, kw_only=True)
class BenchSettings:
    workdir: str  # archive (unless given), outputs and the derived checkpoint go here
    archive: str | None = None  # None: generate phantoms into <workdir>/archive (kept for the next run)
    images: int = 600
    min_side: int = 1000  # generated phantoms are squares of a random side in [min_side, max_side]
    max_side: int = 2000
    model: str = "resnet101:none"
    calibrate: bool = True  # untrained head -> derived checkpoint with a spread of probabilities (see above)
    # For an ARCH:WEIGHTS model, the network to rebuild it as: cam_layer 3 (stride 16) or 2 (stride 8) cuts it
    # as `cxr-batch train --cam-layer` does; cam_stride 16 with layer 4 dilates layer4; None = the spec's own
    # (layer4, stride 32). A checkpoint brings its own.
    cam_stride: int | None = None
    cam_layer: int | None = None
    batch_size: int = 16
    modes: tuple[str, ...] = ("fp32", "bf16")
    # (d) `cxr-batch score` in a fresh process per engine (fp32): start-up included and broken down
    engines: tuple[str, ...] = ("local", "ray")
    device: str = "auto"  # auto: the GPU when torch sees one (then (a), (b) and (c) all use it), else the CPU
    baseline_images: int | None = None  # (a) on the first N images only (None: all): it is slow on big archives
    decode_check: bool = False  # also time JPEG decoding: PIL draft on one core vs torchvision on the GPU
    forward_batches: int = 6  # timed batches for (c), after one warm-up batch
    memory_check: bool = False
    memory_images: int = 100  # N: the check scores N, then 10N images
    memory_side: int = 128
    memory_model: str = "resnet18:none"
    # (e) training: one `cxr-batch train` worker beside a plain loop (bench/training.py)
    train_check: bool = False
    train_images: int = 96
    train_side: int = 160
    train_image_size: int = 128
    train_model: str = "resnet18"
    train_epochs: int = 2  # the last epoch's rate is the worker's: the first pays one-time costs
    num_cpus: int | None = None  # for a Ray the benchmark starts; None = all
    seed: int = 0

    def __post_init__(self):
        bad = [m for m in self.modes if parse_mode(m) is None]
        if bad or REFERENCE not in self.modes:
            raise InputError(f"Invalid modes {bad or list(self.modes)}. A mode is fp32 or bf16, optionally followed"
                             " by +compile and/or +nocams (no CAM PNGs), e.g. bf16+compile; fp32 is required"
                             " (every other mode is compared with it).")
        if not set(self.engines) <= {"local", "ray"}:
            raise InputError(f"Invalid engines {list(self.engines)}. Only local and ray are supported.")
        if self.device not in DEVICES:
            raise InputError(f"Invalid device {self.device!r}. Only {', '.join(DEVICES)} are supported.")
        if self.train_check and (self.train_images < 2 or self.train_epochs < 2):
            raise InputError("--train-images must be at least 2 and the training check runs at least 2 epochs.")
        if self.network() is not None:
            check_cam(*reversed(self.network()))
        if self.images < 1 or self.batch_size < 1 or not 32 <= self.min_side <= self.max_side:
            raise InputError("--images and --batch-size must be at least 1, and 32 <= --min-side <= --max-side.")


    def network(self) -> tuple[int, int] | None:
        """(cam_stride, cam_layer) to rebuild an ARCH:WEIGHTS model as; None: the spec's own network."""
        if self.cam_stride is None and self.cam_layer is None:
            return None
        layer = self.cam_layer or 4
        return self.cam_stride or (TRAIN_STRIDE[layer] if layer < 4 else 32), layer


def parse_mode(mode: str) -> tuple[str, bool, bool] | None:
    """"bf16+compile" -> ("bf16", compile=True, cams=True); "fp32+nocams" -> ("fp32", False, False);
    None when ``mode`` is not of that form."""
    precision, *flags = mode.split("+")
    if precision not in PRECISIONS or len(set(flags)) != len(flags) or not set(flags) <= set(MODE_FLAGS):
        return None
    return precision, "compile" in flags, "nocams" not in flags


def decode_on(mode: str) -> str:
    """score's --decode-on for a benchmark mode."""
    return "cpu" if "cpudecode" in mode.split("+") else "auto"
