"""The scoring job's settings: every option of `cxr-batch score`, declared once (default, choices
and help in each field's metadata; cxr_batch/fields.py), and checked when the settings are made."""

from __future__ import annotations

from dataclasses import dataclass

from ..archive.lease import DEFAULT_TIMEOUT_S
from ..errors import EXIT_INCOMPLETE, InputError
from ..fields import CLUSTER, DEVICES, INPUT, MODEL, OUTPUT, PERFORMANCE, setting
from ..model.cam import SCALES as CAM_SCALES
from ..model.evidence import CAM_POINTS
from ..pixels.decode import DEFAULT_MAX_PIXELS
from ..pixels.gate import DEFAULT_MODALITIES, DEFAULT_VIEWS

PRECISIONS = ("auto", "fp32", "bf16")
ENGINES = ("auto", "ray", "local")
DECODE_ON = ("auto", "cpu", "device")
OOD_MODES = ("skip", "flag", "off")
# The largest input file read (--max-bytes). Chest radiographs are 0.1-50 MB (a DICOM of a 3000 x 3000
# 16-bit detector image is 18 MB); 1 GiB leaves room for odd multi-frame objects while one decode
# worker holding a few such files still fits a 4 GB worker.
DEFAULT_MAX_BYTES = 1 << 30


@dataclass(frozen=True, kw_only=True)
class ScoreSettings:
    archive: str
    # A folder of Parquet part files (pandas, pyarrow, duckdb read it as one table).
    out: str = setting(help="Parquet output: a folder of part files (local path or s3://).", group=OUTPUT)
    model: str | None = setting(None, "A checkpoint from `cxr-batch train`, or ARCH:WEIGHTS such as resnet101:imagenet"
                                " or resnet18:none (an untrained head).", group=MODEL,
                                shown="$CXR_BATCH_MODEL, else the model the last training registered")
    cam_dir: str | None = setting(None, "Folder for the CAM overlay PNGs.", group=OUTPUT,
                                  shown="<out>-cams beside the output")
    cams: bool = setting(True, "Write a CAM overlay PNG per image.", group=OUTPUT)
    # None: the model's input size, the cheapest overlay; 0: the image's own resolution.
    cam_size: int | None = setting(None, "Side of the overlay PNGs in px; 0 keeps the image's own resolution.",
                                   group=OUTPUT, shown="the model's input size")
    # absolute: one fixed range of the map's logit units (cam.ABSOLUTE_RANGE), so a confident NORMAL
    # stays cold and heat says how strong; relative: every image, NORMAL too, shows a hot spot.
    cam_scale: str = setting("absolute", "How overlays show heat: absolute, one fixed range for every image so that"
                             " a confident NORMAL stays cold; relative, min-max per image.", group=OUTPUT,
                             choices=CAM_SCALES)
    # evidence costs one backward pass per batch (model/evidence.py), map nothing beyond the forward.
    cam_point: str = setting("map", "Where cam_peak_x/y come from: map, the centre of the CAM's hot spot; evidence,"
                             " the input pixels that make it hot (one backward pass per batch).", group=MODEL,
                             choices=CAM_POINTS)
    batch_size: int = setting(16, "Images per forward pass.", group=PERFORMANCE)
    actors: int | None = setting(None, "Model replicas.", group=PERFORMANCE,
                                 shown="one per GPU, else as many as the CPUs fit")
    cpus_per_actor: float | None = setting(None, "CPUs (and torch threads) per model actor.", group=PERFORMANCE,
                                           shown="sized from the cluster")  # see plan_resources
    device: str = setting("auto", "Where the model runs; auto takes a GPU when there is one.", group=PERFORMANCE,
                          choices=DEVICES)
    precision: str = setting("auto", "Arithmetic of the forward pass; auto is bf16 autocast where the hardware"
                             " computes bf16 natively, else fp32.", group=PERFORMANCE, choices=PRECISIONS)
    compile: bool = setting(False, "torch.compile the model in each actor (a slower start, a faster steady state).",
                            group=PERFORMANCE)
    channels_last: bool = True
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, "Images above this many pixels get an error row (decompression"
                              " bombs).", group=INPUT)
    overwrite: bool = setting(False, "First delete what earlier runs wrote to the output and CAM folders (only"
                              " cxr-batch's own files) instead of resuming.", group=OUTPUT)
    # Small values make tests see parts early.
    rows_per_part: int = setting(2000, "Rows per published Parquet part.", group=OUTPUT)
    limit: int | None = setting(None, "Score only the first N files, sorted by path.", group=INPUT,
                                shown="every file")
    manifest: str | None = setting(None, "Score the files that this CSV (`path`, optional `size`), .txt (a path a"
                                   " line) or Parquet file lists, relative to ARCHIVE, instead of listing ARCHIVE.",
                                   group=INPUT)
    follow_symlinks: bool = setting(False, "Also read symlinks whose target lies outside ARCHIVE.", group=INPUT)
    lease_timeout_s: float = setting(DEFAULT_TIMEOUT_S, "Seconds without a heartbeat after which another run may take"
                                     " over this run's lease on the output (see archive/lease.py).", group=OUTPUT)
    max_bytes: int = setting(DEFAULT_MAX_BYTES, "Files larger than this many bytes get an error row and are not"
                             " read.", group=INPUT)
    retries: int = setting(3, "Retry passes, with backoff, for files that failed for a transient reason; what still"
                           f" fails has status 'retry' and the run exits {EXIT_INCOMPLETE}.", group=PERFORMANCE)
    # Pass k waits retry_backoff_s * 2**(k-1) (see jobs/runloop.py).
    retry_backoff_s: float = setting(2.0, "Seconds before the first retry pass, doubled for each next one.",
                                     group=PERFORMANCE)
    engine: str = setting("auto", "ray: Ray Data on any cluster; local: this process and a process pool, no Ray"
                          " start-up; auto: chosen from the machine and the number of files (see docs/score.md).",
                          group=CLUSTER, choices=ENGINES)  # see choose_engine
    # device: the Scorer decodes on the model's device (nvJPEG on a GPU; pixels/device_decode.py).
    decode_on: str = setting("auto", "Where JPEGs are decoded and overlays composed: device, beside the model"
                             " (nvJPEG on a GPU); cpu, in CPU workers; auto, device when the model runs on a GPU.",
                             group=PERFORMANCE, choices=DECODE_ON)
    stall_timeout_s: float = setting(900, "Stop after this many seconds without progress; what was written is kept"
                                     " and a re-run resumes.", group=PERFORMANCE)
    # The DICOM header gate (pixels/gate.py): values compare upper-case.
    gate: bool = setting(True, "Skip, unread, each DICOM whose header says it is no frontal chest radiograph (see"
                         " docs/dicom-gate.md).", group=INPUT)
    modalities: tuple[str, ...] = setting(DEFAULT_MODALITIES, "DICOM Modality values the gate lets through,"
                                          " comma-separated.", group=INPUT)
    views: tuple[str, ...] = setting(DEFAULT_VIEWS, "DICOM ViewPosition values the gate lets through, comma-separated"
                                     " (a file without one always passes).", group=INPUT)
    ood: str = setting("skip", "Images unlike the model's training images (see docs/ood.md): skip gives them status"
                       " out_of_scope and no prediction, flag keeps the prediction and marks them, off checks"
                       " nothing.", group=MODEL, choices=OOD_MODES)

    def __post_init__(self):
        if self.ood not in OOD_MODES:
            raise InputError(f"Invalid --ood {self.ood}. Only {', '.join(OOD_MODES)} are supported.")
        if self.engine not in ENGINES:
            raise InputError(f"Invalid engine {self.engine!r}. Only {', '.join(ENGINES)} are supported.")
        if self.precision not in PRECISIONS:
            raise InputError(f"Invalid precision {self.precision!r}. Only {', '.join(PRECISIONS)} are supported.")
        if self.cam_scale not in CAM_SCALES:
            raise InputError(f"Invalid --cam-scale {self.cam_scale}. Only {', '.join(CAM_SCALES)} are supported.")
        if self.cam_point not in CAM_POINTS:
            raise InputError(f"Invalid --cam-point {self.cam_point}. Only {', '.join(CAM_POINTS)} are supported.")
        if self.cam_point == "evidence" and self.compile:
            raise InputError("--cam-point evidence needs gradients, which a compiled model here does not give: drop --compile.")
        if self.device not in DEVICES:
            raise InputError(f"Invalid device {self.device!r}. Only {', '.join(DEVICES)} are supported.")
        if self.decode_on not in DECODE_ON:
            raise InputError(f"Invalid --decode-on {self.decode_on!r}. Only {', '.join(DECODE_ON)} are supported.")
        if self.batch_size < 1 or (self.actors is not None and self.actors < 1):
            raise InputError("--batch-size and --actors must be at least 1.")
        if self.gate and not (self.modalities and self.views):
            raise InputError("--modalities and --views each need at least one value (or pass --no-gate).")

    def gate_rules(self) -> dict | None:
        """The gate's keyword arguments for the decode stage (pixels/gate.gate_reason); None: no gate."""
        return {"modalities": tuple(self.modalities), "views": tuple(self.views)} if self.gate else None

    def resolved_cam_dir(self) -> str:
        from ..archive.results import default_cam_dir  # pyarrow: not for a command that only builds settings

        return self.cam_dir or default_cam_dir(self.out)
