"""The scoring job's driver: archive -> Ray Data stream -> Parquet rows + CAM overlay PNGs.

Stages (one Ray Data operator each, none relying on row order; every row carries ``path``):
  1. decode   CPU tasks: read bytes, hash, decode, resize to the model's input  (score_stages.decode_batch)
  2. model    an actor pool: forward pass -> P(PNEUMONIA) and the CAM          (score_stages.Scorer)
  3. finish   CPU tasks: CAM peak, overlay PNG written off the model's path    (score_stages.finish_batch)
  4. the driver publishes Parquet parts as rows stream in                      (archive/results.py)
Pure work lives in pixels/ and model/cam.py; score_stages.py holds what the workers run.
"""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace

import pyarrow as pa

from .. import CLASSES
from ..archive import storage
from ..archive.discover import discover
from ..archive.results import PartWriter, default_cam_dir, done_paths
from ..errors import InputError
from ..model.registry import ModelInfo, describe
from ..pixels.decode import DEFAULT_MAX_PIXELS
from .score_stages import Scorer, StageConfig, decode_batch, finish_batch

PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "gpu")
ENGINES = ("auto", "ray", "local")


@dataclass(frozen=True, kw_only=True)
class ScoreSettings:
    archive: str
    out: str  # a folder of Parquet part files (pandas, pyarrow, duckdb read it as one table)
    model: str | None = None  # checkpoint path/URI or ARCH:WEIGHTS; None = the registered default
    cam_dir: str | None = None  # None: "<out>-cams" beside the output
    cams: bool = True
    cam_size: int | None = None  # overlay side in px; None = the model's input size (fast); 0 = original size
    batch_size: int = 16  # images per forward pass
    actors: int | None = None  # model replicas; None = one per GPU, or as many CPU actors as fit
    cpus_per_actor: float | None = None  # None: sized from the cluster (see plan_resources)
    device: str = "auto"
    precision: str = "auto"  # auto = bf16 autocast where native (GPU sm80+, CPU AVX512-BF16/AMX), else fp32
    compile: bool = False  # torch.compile the model in each actor (slow start, faster steady state)
    channels_last: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    overwrite: bool = False
    rows_per_part: int = 2000
    limit: int | None = None  # score only the first N files (sorted by path): smoke tests
    stall_timeout_s: float = 900  # Ray Data raises instead of hanging this long without progress
    engine: str = "auto"  # ray | local (no Ray: this process + a process pool) | auto (see choose_engine)

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise InputError(f"Invalid engine {self.engine!r}. Only {', '.join(ENGINES)} are supported.")
        if self.precision not in PRECISIONS:
            raise InputError(f"Invalid precision {self.precision!r}. Only {', '.join(PRECISIONS)} are supported.")
        if self.device not in DEVICES:
            raise InputError(f"Invalid device {self.device!r}. Only {', '.join(DEVICES)} are supported.")
        if self.batch_size < 1 or (self.actors is not None and self.actors < 1):
            raise InputError("--batch-size and --actors must be at least 1.")

    def resolved_cam_dir(self) -> str:
        return self.cam_dir or default_cam_dir(self.out)


@dataclass(frozen=True)
class ResourcePlan:
    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    torch_threads: int
    task_cpus: float  # per decode / finish task
    engine: str = "ray"
    workers: int = 0  # local engine: decode/finish processes beside the model


def plan_resources(cluster_cpus: float, cluster_gpus: float, s: ScoreSettings) -> ResourcePlan:
    """Size the pool so it always fits: Ray Data waits forever (no error) for resources that never come.

    GPUs: one actor per GPU, a fixed pool (an autoscaling GPU pool can stay at one replica).
    CPU only: leave one CPU to decode/finish tasks and give the rest to actors of up to 4 CPUs each;
    torch in an actor uses as many threads as the CPUs it holds.
    """
    use_gpu = cluster_gpus >= 1 and s.device != "cpu"
    if s.device == "gpu" and cluster_gpus < 1:
        raise InputError("--device gpu, but the Ray cluster has no GPU; use --device cpu or auto.")
    task_cpus = 0.5 if cluster_cpus < 4 else 1.0
    if use_gpu:
        actors = s.actors or int(cluster_gpus)
        if actors > cluster_gpus:
            raise InputError(f"--actors {actors} exceeds the cluster's {int(cluster_gpus)} GPUs.")
        cpus = s.cpus_per_actor if s.cpus_per_actor is not None else 1.0
        return ResourcePlan(actors, cpus, 1.0, max(1, int(cpus)), task_cpus)
    free = cluster_cpus - 2 * task_cpus  # one decode and one finish task can always run
    if free < 0.5:
        raise InputError(f"The Ray cluster has {cluster_cpus:g} CPUs; scoring needs at least 1.5.")
    cpus = s.cpus_per_actor if s.cpus_per_actor is not None else max(0.5, min(4.0, free))
    actors = s.actors or max(1, int(free // cpus))
    if actors * cpus > free + 1e-9:
        raise InputError(
            f"{actors} actors x {cpus:g} CPUs do not fit beside the decode tasks on {cluster_cpus:g} CPUs;"
            " lower --actors or --cpus-per-actor.")
    threads = max(1, math.ceil(cpus))
    if cluster_cpus < 4 and s.cpus_per_actor is None and s.actors is None:
        # One actor on a small node. The decode and finish tasks hold half a CPU each but use about
        # 5% of one per image that ResNet-101 takes (draft JPEG decode, 224 px PNGs): idling that CPU
        # halves throughput, so torch gets every CPU and the tasks interleave (docs/benchmark.md).
        threads = int(cluster_cpus)
    return ResourcePlan(actors, cpus, 0.0, threads, task_cpus)


# ---------------------------------------------------------------- the job

@dataclass
class ScoreSummary:
    seen: int = 0
    already_done: int = 0
    scored: int = 0
    errors: int = 0
    seconds: float = 0.0
    out: str = ""
    cam_dir: str | None = None
    model: dict = field(default_factory=dict)
    plan: dict = field(default_factory=dict)
    # Start-up, in seconds: model_check_s (describe() on the driver: torch import, checkpoint read and
    # a model build, before any engine); first_rows_s (since run_score began, any engine); ray_start_s (a Ray this
    # run started); the local engine's engine_start_s (since run_score began) and, from its
    # LocalStats, pool_start_s, torch_import_s, model_build_s (durations), first_decode_s and
    # first_batch_s (since the engine started), workers_lost.
    startup: dict = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return (self.scored + self.errors) / self.seconds if self.seconds > 0 else 0.0


def run_score(s: ScoreSettings, *, progress=None, echo=None, ray_context=None) -> ScoreSummary:
    """Score ``s.archive`` into ``s.out``.

    The engine (``choose_engine``) runs the stages: Ray Data on the Ray this process is connected
    to, or started with ``ray_context()`` (default: a local Ray) when there is none; or the local
    engine, which needs no Ray. ``progress(summary, total)`` is called as rows arrive (at most every
    2 s, and at the end); ``echo(line)`` gets one line per stage of the job."""
    t0 = time.perf_counter()
    info = describe(s.model)  # imports torch and builds the model once, to fail fast on a bad one
    t_described = time.perf_counter() - t0
    s = replace(s, model=info.spec, archive=storage.absolute(s.archive), out=storage.absolute(s.out),
                cam_dir=storage.absolute(s.cam_dir) if s.cam_dir else None)
    cam_dir = s.resolved_cam_dir() if s.cams else None
    if s.overwrite:
        storage.delete_dir(s.out)
        if cam_dir:
            storage.delete_dir(cam_dir)
    files = discover(s.archive)[: s.limit]
    done = done_paths(s.out, info.model_id)
    todo = [f.path for f in files if f.path not in done]
    engine = choose_engine(s.engine, len(todo))
    summary = ScoreSummary(seen=len(files), already_done=len(files) - len(todo), out=s.out, cam_dir=cam_dir,
                           model=info.to_dict(), startup={"model_check_s": round(t_described, 3)})
    t_ray = time.perf_counter()
    with nullcontext() if engine == "local" or ray_is_up() else (ray_context or _local_ray)():
        if engine == "ray":
            summary.startup["ray_start_s"] = round(time.perf_counter() - t_ray, 2)
        plan = _plan(engine, s)
        summary.plan = asdict(plan)
        metadata = {"settings": asdict(s), "model_id": info.model_id, "model": info.to_dict(),
                    "classes": list(CLASSES), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        writer = PartWriter(s.out, metadata, s.rows_per_part)
        if echo:
            echo(f"score: {len(files):,} files, {len(todo):,} to score"
                 + (f" ({summary.already_done:,} have a row from an earlier run)" if summary.already_done else "")
                 + f"; {_describe_plan(plan)}")
        if todo:
            stages = stage_config(s, info, plan, cam_dir)
            _stream(_rows(engine, todo, s, stages, plan, summary, t0), writer, summary, len(todo), t0, progress)
        writer.flush()
    summary.seconds = time.perf_counter() - t0
    if progress:
        progress(summary, len(todo))
    return summary


# ---------------------------------------------------------------- engines

def ray_is_up() -> bool:
    """Ray initialised in this process (without importing ray, ~1 s, when it is not even loaded)."""
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def choose_engine(engine: str, n_files: int, *, cpus: int | None = None, gpus: int | None = None,
                  connected: bool | None = None) -> str:
    """``auto``: the local engine for a run that would start its own single-node Ray; Ray otherwise.

    Ray when this process is already connected to Ray or RAY_ADDRESS names a cluster (the work
    should go where the user put it), when the node has several GPUs (one model actor per GPU; the
    local engine drives one), and on a CPU node of more than LOCAL_MAX_CPUS CPUs for archives of
    more than LOCAL_MAX_FILES files (there several model actors of a few threads each beat one
    process with every thread, and Ray's ~10 s of start-up is small beside the run).
    Measured on 2 CPUs (docs/benchmark.md): the local engine is faster at every archive size.
    """
    if engine != "auto":
        return engine
    from .local_engine import node_cpus, node_gpus

    connected = ray_is_up() if connected is None else connected
    if connected or os.environ.get("RAY_ADDRESS"):
        return "ray"
    gpus = node_gpus() if gpus is None else gpus
    cpus = node_cpus() if cpus is None else cpus
    if gpus > 1 or (gpus == 0 and cpus > LOCAL_MAX_CPUS and n_files > LOCAL_MAX_FILES):
        return "ray"
    return "local"


LOCAL_MAX_CPUS = 8
LOCAL_MAX_FILES = 20_000


def _local_ray():
    from .ray_env import ray_running

    return ray_running(None)


def _plan(engine: str, s: ScoreSettings) -> ResourcePlan:
    if engine == "local":
        from .local_engine import node_cpus

        cpus = node_cpus()
        # The model gets every CPU: the pool's decode and finish work is ~12 CPU-ms per image against
        # ~100-180 for ResNet-101, and a pool process only runs when there is work.
        return ResourcePlan(1, float(cpus), 0.0, s.cpus_per_actor and int(s.cpus_per_actor) or cpus, 1.0,
                            engine="local", workers=max(1, cpus - 1))
    import ray

    res = ray.cluster_resources()
    return plan_resources(res.get("CPU", 0), res.get("GPU", 0), s)


def _describe_plan(plan: ResourcePlan) -> str:
    if plan.engine == "local":
        return (f"local engine (no Ray): model in this process with {plan.torch_threads} threads,"
                f" {plan.workers} decode/finish process(es)")
    return (f"{plan.actors} model actor(s) x {plan.cpus_per_actor:g} CPU"
            + (f" + {plan.gpus_per_actor:g} GPU" if plan.gpus_per_actor else ""))


def stage_config(s: ScoreSettings, info: ModelInfo, plan: ResourcePlan, cam_dir: str | None) -> StageConfig:
    """The stage callables' arguments, the same for every engine."""
    info_d = info.to_dict()
    # A map task batches only the rows of the blocks it is given: blocks of 33 rows reached the
    # model as 16 + 16 + 1 (a third of all forward passes held 1-2 images, and each new size
    # recompiles under torch.compile). So blocks and decode batches are multiples of the batch.
    return StageConfig(
        decode=dict(archive=s.archive, image_size=info.image_size, max_pixels=s.max_pixels),
        scorer=dict(info=info_d, threads=plan.torch_threads, precision=s.precision, compile=s.compile,
                    channels_last=s.channels_last),
        finish=dict(info=info_d, cam_dir=cam_dir, cam_size=s.cam_size, archive=s.archive, max_pixels=s.max_pixels),
        batch_size=s.batch_size, decode_rows=s.batch_size * max(1, 32 // s.batch_size))


def _rows(engine: str, todo: list[str], s: ScoreSettings, stages: StageConfig, plan: ResourcePlan,
          summary: ScoreSummary, t0: float):
    if engine == "local":
        from .local_engine import LocalStats, run_local

        stats = LocalStats()
        summary.startup["engine_start_s"] = round(time.perf_counter() - t0, 3)
        try:
            yield from run_local(pa.table({"path": todo}), stages, workers=plan.workers, stats=stats)
        finally:
            summary.startup.update({k: v for k, v in asdict(stats).items() if k != "events"})
        return
    yield from _pipeline(todo, s, stages, plan).iter_batches(batch_size=None, batch_format="pyarrow")


def _pipeline(paths: list[str], s: ScoreSettings, stages: StageConfig, plan: ResourcePlan):
    """The Ray Data stream of the three stages over ``paths``, sized by ``plan``."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.execution_no_progress_timeout_s = s.stall_timeout_s
    ctx.enable_progress_bars = False  # our own one-line progress reads better in logs
    ctx.print_on_execution_start = False
    rows = stages.decode_rows
    block_rows = rows * max(1, math.ceil(len(paths) / 4096 / rows))  # <= ~4096 blocks
    ds = ray.data.from_arrow([pa.table({"path": paths[i: i + block_rows]}) for i in range(0, len(paths), block_rows)])
    ds = ds.map_batches(decode_batch, batch_size=rows, num_cpus=plan.task_cpus, batch_format="numpy",
                        fn_kwargs=stages.decode)
    ds = ds.map_batches(Scorer, batch_size=stages.batch_size, batch_format="numpy",
                        compute=ActorPoolStrategy(size=plan.actors), num_cpus=plan.cpus_per_actor,
                        num_gpus=plan.gpus_per_actor, fn_constructor_kwargs=stages.scorer)
    return ds.map_batches(finish_batch, batch_size=rows, num_cpus=plan.task_cpus, batch_format="numpy",
                          fn_kwargs=stages.finish)


def _stream(rows, writer: PartWriter, summary: ScoreSummary, total: int, t0: float, progress) -> None:
    """Publish rows as they arrive and count them; report progress at most every 2 s."""
    last = 0.0
    for table in rows:
        summary.startup.setdefault("first_rows_s", round(time.perf_counter() - t0, 3))
        writer.add(table)
        ok = table.column("error").null_count  # error is null exactly for scored rows
        summary.scored += ok
        summary.errors += table.num_rows - ok
        summary.seconds = time.perf_counter() - t0
        if progress and time.perf_counter() - last > 2:
            last = time.perf_counter()
            progress(summary, total)
