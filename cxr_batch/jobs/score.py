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
import sys
import time
import warnings
import uuid
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace

import pyarrow as pa
import pyarrow.compute as pc

from .. import CLASSES
from ..archive import storage
from ..archive.discover import check_archive, label_from_path, list_archive, read_manifest
from ..archive.lease import Lease
from ..archive.outdir import check_placement, clear_output, same_folder
from ..archive.results import (ERROR, OUT_OF_SCOPE, RETRY, SCHEMA, SCORED, SKIPPED, PartWriter, damaged_note,
                               done_path_batches, drop_retry_rows, pending, set_aside)
from ..archive.storage import too_big
from ..errors import InputError
from ..model.registry import ModelInfo, describe
from .ray_env import check_shared_storage, joining_a_cluster
from .runloop import Outcome, RetryPolicy, drive
from .score_settings import ScoreSettings
from .score_stages import Scorer, StageConfig, decode_batch, finish_batch, skip_reason

DEVICE_DECODE_NOTE = "JPEGs decoded and overlays composed beside the model"  # the start line's and the summary's


@dataclass(frozen=True)
class ResourcePlan:
    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    torch_threads: int
    task_cpus: float  # per decode / finish task
    engine: str = "ray"
    workers: int = 0  # local engine: decode/finish processes beside the model
    decode_on: str = "cpu"  # where JPEGs are decoded: cpu (decode stage) or device (the Scorer's)


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
        # halves throughput, so torch gets every CPU and the tasks interleave (docs/performance.md).
        threads = int(cluster_cpus)
    return ResourcePlan(actors, cpus, 0.0, threads, task_cpus)


# ---------------------------------------------------------------- the job

@dataclass
class ScoreSummary:
    seen: int = 0  # files this run is responsible for (the listing, cut by --limit)
    already_done: int = 0
    scored: int = 0
    errors: int = 0
    skipped: int = 0  # files not scored by design (status "skipped"): the DICOM gate, extensionless non-DICOMs
    skipped_by: dict = field(default_factory=dict)  # skip reason ("Modality CT") -> files (score_stages.skip_reason)
    out_of_scope: int = 0  # over the model's OOD threshold under --ood skip (status "out_of_scope"; no prediction)
    flagged_out_of_scope: int = 0  # over it under --ood flag: scored, and marked in the out_of_scope column
    retry: int = 0  # files left with status "retry" (the environment failed them): the run is incomplete
    retried: int = 0  # files that failed transiently (or lost their worker) and were scored on a retry pass
    poison: int = 0  # files that killed their worker each time they were read alone (among errors)
    redone: int = 0  # "retry" rows of earlier runs scored again by this one
    unlisted: int = 0  # folders and entries the listing could not read (named in listing["unlisted"]): incomplete
    damaged_parts: int = 0  # part files of earlier runs that were not Parquet any more, set aside (see results.set_aside)
    listed: int = 0  # files in the listing or manifest, before --limit
    seconds: float = 0.0
    out: str = ""
    cam_dir: str | None = None
    run_id: str = ""
    model: dict = field(default_factory=dict)
    plan: dict = field(default_factory=dict)
    listing: dict = field(default_factory=dict)  # Listing.stats(): source, requests, outside_links, ...
    notes: list = field(default_factory=list)  # lines for the user (what --overwrite left, links not followed)
    # Start-up, in seconds: model_check_s (prepare(): describe() on the driver, a checkpoint read and a
    # model build, to fail fast on a bad model); first_rows_s (since run_score began, any engine); ray_start_s (a Ray this
    # run started); the local engine's engine_start_s (since run_score began) and, from its
    # LocalStats, pool_start_s, torch_import_s, model_build_s (durations), first_decode_s and
    # first_batch_s (since the engine started), workers_lost.
    startup: dict = field(default_factory=dict)

    @property
    def incomplete(self) -> bool:
        """Some file has no verdict yet (a "retry" row, or a folder not listed): a re-run goes on."""
        return bool(self.retry or self.unlisted)

    @property
    def images_per_s(self) -> float:
        return (self.scored + self.errors + self.skipped + self.out_of_scope) / self.seconds if self.seconds > 0 else 0.0


def prepare(s: ScoreSettings) -> tuple[ScoreSettings, ModelInfo]:
    """-> (settings with absolute paths and the model's resolved spec, its ModelInfo). Refuses a bad
    model or an --out / CAM folder in the wrong place; the CLI calls it before it starts Ray.

    The model is described from a checkpoint's small entries, without torch (~4 s to import): its
    weights are checked before Ray starts (``_vetted``) or, in the local engine, by the model build
    in this process, which runs while the decode pool already reads the first images."""
    info = describe(s.model, check=False)
    s = replace(s, model=info.spec, archive=storage.absolute(s.archive), out=storage.absolute(s.out),
                cam_dir=storage.absolute(s.cam_dir) if s.cam_dir else None,
                manifest=storage.absolute(s.manifest) if s.manifest else None)
    check_archive(s.archive)
    check_placement(s.archive, s.out, s.resolved_cam_dir() if s.cams else None, overwrite=s.overwrite)
    return s, info


def run_score(s: ScoreSettings, *, progress=None, echo=None, ray_context=None, prepared=None) -> ScoreSummary:
    """Score ``s.archive`` into ``s.out``.

    Order: refuse a bad model or an --out in the wrong place before anything is written; when the
    engine (``choose_engine``) is Ray whatever the archive's size, start Ray (the one this process is
    connected to, else ``ray_context()``, default a local Ray) and refuse node-local paths on a
    multi-node cluster; take the lease on --out; list; start Ray now if the archive's size made the
    engine Ray; clear (--overwrite); skip what is done; run the stages under the retry policy
    (jobs/runloop.py).
    ``progress(summary, total)`` is called as rows arrive (at most every 2 s, and at the end);
    ``echo(line)`` gets one line per stage of the job. ``prepared``: what ``prepare(s)`` returned and the
    seconds it took, when the caller already ran it (the CLI does, to fail before anything starts)."""
    t0 = time.perf_counter()
    if prepared is None:
        s, info = prepare(s)
        t_prepared = time.perf_counter() - t0
    else:
        s, info, t_prepared = prepared
    cam_dir = s.resolved_cam_dir() if s.cams else None
    run_id = uuid.uuid4().hex[:8]
    summary = ScoreSummary(out=s.out, cam_dir=cam_dir, run_id=run_id, model=info.to_dict(),
                           startup={"model_check_s": round(t_prepared, 3)})
    with ExitStack() as stack:
        # Ray is needed whatever the archive's size (a cluster to join, several GPUs, --engine ray):
        # start it and refuse node-local paths before the lease writes anything to --out.
        early = choose_engine(s.engine, 0) == "ray"
        if early:
            info = stack.enter_context(_ray_engine(s, info, cam_dir, summary, ray_context))
        lease = _leases(stack, s, run_id, cam_dir, summary)
        files = _listing(s, summary)
        engine = choose_engine(s.engine, files.num_rows)
        if engine == "ray" and not early:
            info = stack.enter_context(_ray_engine(s, info, cam_dir, summary, ray_context))
        plan = _plan(engine, s)
        summary.plan = asdict(plan)
        if s.overwrite:
            summary.notes += clear_output(s.out, cam_dir).notes()
        todo, retry_parts = _resume(s, files, info, summary)
        info = info if todo.num_rows else _vetted(info, summary)  # nothing to score: a bad model is still refused
        metadata = {"settings": asdict(s), "model_id": info.model_id, "model": info.to_dict(),
                    "classes": list(CLASSES), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run_id": run_id}
        writer = PartWriter(s.out, metadata, s.rows_per_part, run=run_id, before_publish=lease.check)
        if echo:
            echo(_start_line(summary, todo.num_rows, plan))
        if todo.num_rows:
            # Old "retry" rows of these files go first (parts rewritten whole), so no reader sees two rows.
            summary.redone = drop_retry_rows(s.out, todo["path"].combine_chunks(), parts=retry_parts, before_publish=lease.check)
            publish = _publisher(writer, summary, todo.num_rows, t0, progress)
            outcome = _score(todo, s, engine, stage_config(s, info, plan, cam_dir), plan, info, summary, t0,
                             publish, echo)
            summary.retried, summary.poison = outcome.retried, len(outcome.poison)
        writer.flush()
        lease.check()
    summary.seconds = time.perf_counter() - t0
    if progress:
        progress(summary, todo.num_rows)
    return summary


def _leases(stack: ExitStack, s: ScoreSettings, run_id: str, cam_dir: str | None, summary: ScoreSummary) -> Lease:
    """Take the lease on --out, then on the CAM folder: two outputs can share one (``--out r`` and
    ``--out r.parquet`` both default to ``r-cams``), and two runs writing and pruning it would collide.
    -> the --out lease (the one publishing checks)."""
    lease = stack.enter_context(Lease(s.out, run_id=run_id, timeout_s=s.lease_timeout_s, details={"archive": s.archive}))
    leases = [lease]
    if cam_dir and not same_folder(cam_dir, s.out):
        leases.append(stack.enter_context(Lease(cam_dir, run_id=run_id, timeout_s=s.lease_timeout_s,
                                                details={"archive": s.archive}, option="--cam-dir")))
    summary.notes += [held.note for held in leases if held.note]  # an S3 server without conditional writes
    return lease


def _resume(s: ScoreSettings, files: pa.Table, info: ModelInfo, summary: ScoreSummary) -> tuple[pa.Table, list]:
    """-> (the listed files with no final row in --out yet, the parts that hold "retry" rows). Damaged
    parts (not Parquet any more) are set aside, and their files are scored again."""
    retry_parts: list = []  # named while the done paths are read, so the retry rows cost no second pass
    damaged: list = []
    todo = pending(files, done_path_batches(s.out, info.model_id, archive=s.archive, retry_parts=retry_parts,
                                            damaged=damaged))
    summary.already_done = files.num_rows - todo.num_rows
    if damaged:
        summary.damaged_parts = len(damaged)
        summary.notes.append(damaged_note(set_aside(damaged), "set aside; their files are scored again"))
    return todo, retry_parts


@contextmanager
def _ray_engine(s: ScoreSettings, info: ModelInfo, cam_dir: str | None, summary: ScoreSummary, ray_context):
    """Ray for the Ray engine: the one this process is connected to, else ``ray_context()`` (default a
    local Ray). On several nodes every path the workers touch must be on shared storage. Yields the
    model's ModelInfo, its weights checked first: in Ray, every model actor would fail on its own."""
    info = _vetted(info, summary)
    t = time.perf_counter()
    with nullcontext() if ray_is_up() else (ray_context or _local_ray)():
        summary.startup["ray_start_s"] = round(time.perf_counter() - t, 2)
        check_shared_storage({"ARCHIVE": s.archive, "--out": s.out, "--cam-dir": cam_dir}, job="the decode and CAM tasks")
        yield info


def _vetted(info: ModelInfo, summary: ScoreSummary) -> ModelInfo:
    """``describe`` with the network built and its weights loaded (prepare() only read the entries);
    the time goes to ``model_check_s``."""
    t = time.perf_counter()
    checked = describe(info.spec)
    if checked.model_id != info.model_id:
        raise InputError(f"{info.spec} changed while the job started (hash {checked.model_id} != {info.model_id}).")
    summary.model = checked.to_dict()
    summary.startup["model_check_s"] = round(summary.startup.get("model_check_s", 0.0) + time.perf_counter() - t, 3)
    return checked


def _start_line(summary: ScoreSummary, todo: int, plan: ResourcePlan) -> str:
    return (f"score: {summary.seen:,} files, {todo:,} to score"
            + (f" ({summary.already_done:,} have a row from an earlier run)" if summary.already_done else "")
            + f"; {_describe_plan(plan)}")


def _listing(s: ScoreSettings, summary: ScoreSummary) -> pa.Table:
    """The listing (or manifest), cut to --limit: (path, size, sniff), sorted by path."""
    if s.manifest:
        listing = read_manifest(s.manifest, s.archive)
    else:
        listing = list_archive(s.archive, follow_symlinks=s.follow_symlinks)
    summary.listed = listing.files.num_rows
    summary.listing = listing.stats()
    summary.unlisted = listing.incomplete
    if listing.outside_links:
        summary.notes.append(f"symlinks to outside the archive, not followed: {listing.outside_links:,}"
                             " (--follow-symlinks reads them)")
    files = listing.first(s.limit).files
    summary.seen = files.num_rows
    return files


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
    Measured on 2 CPUs (docs/performance.md): the local engine is faster at every archive size.
    """
    if engine != "auto":
        return engine
    from .local_engine import node_cpus, node_gpus

    connected = ray_is_up() if connected is None else connected
    if connected or joining_a_cluster(None):
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
        from .local_engine import node_cpus, node_gpus

        cpus = node_cpus()
        # The model gets every CPU: the pool's decode and finish work is ~12 CPU-ms per image against
        # ~100-180 for ResNet-101, and a pool process only runs when there is work.
        plan = ResourcePlan(1, float(cpus), 0.0, s.cpus_per_actor and int(s.cpus_per_actor) or cpus, 1.0,
                            engine="local", workers=max(1, cpus - 1))
        on_gpu = s.device != "cpu" and node_gpus() > 0  # the local Scorer takes a GPU when it sees one
    else:
        import ray

        res = ray.cluster_resources()
        plan = plan_resources(res.get("CPU", 0), res.get("GPU", 0), s)
        on_gpu = plan.gpus_per_actor > 0
    # On a GPU node the CPUs set the rate (decode ~9 ms of CPU per image): JPEGs go to the GPU there.
    decode_on = ("device" if on_gpu else "cpu") if s.decode_on == "auto" else s.decode_on
    return replace(plan, decode_on=decode_on)


def _describe_plan(plan: ResourcePlan) -> str:
    jpegs = f"; {DEVICE_DECODE_NOTE}" if plan.decode_on == "device" else ""
    if plan.engine == "local":
        return (f"local engine (no Ray): model in this process with {plan.torch_threads} threads,"
                f" {plan.workers} decode/finish process(es){jpegs}")
    return (f"{plan.actors} model actor(s) x {plan.cpus_per_actor:g} CPU"
            + (f" + {plan.gpus_per_actor:g} GPU" if plan.gpus_per_actor else "") + jpegs)


def stage_config(s: ScoreSettings, info: ModelInfo, plan: ResourcePlan, cam_dir: str | None) -> StageConfig:
    """The stage callables' arguments, the same for every engine."""
    info_d = info.to_dict()
    # A map task batches only the rows of the blocks it is given: blocks of 33 rows reached the
    # model as 16 + 16 + 1 (a third of all forward passes held 1-2 images, and each new size
    # recompiles under torch.compile). So blocks and decode batches are multiples of the batch.
    return StageConfig(
        decode=dict(archive=s.archive, image_size=info.image_size, max_pixels=s.max_pixels,
                    follow_symlinks=s.follow_symlinks, max_bytes=s.max_bytes, device_decode=plan.decode_on == "device",
                    gate=s.gate_rules()),
        scorer=dict(info=info_d, threads=plan.torch_threads, precision=s.precision, compile=s.compile,
                    channels_last=s.channels_last, max_pixels=s.max_pixels, ood=s.ood,
                    # Beside the device's decode, the overlays too (at the model's size: its input is the base).
                    overlay_scale=s.cam_scale if plan.decode_on == "device" and cam_dir and
                    s.cam_size in (None, info.image_size) else None, cam_point=s.cam_point),
        finish=dict(info=info_d, cam_dir=cam_dir, cam_size=s.cam_size, archive=s.archive, max_pixels=s.max_pixels,
                    cam_scale=s.cam_scale, ood=s.ood, follow_symlinks=s.follow_symlinks, max_bytes=s.max_bytes),
        batch_size=s.batch_size, decode_rows=s.batch_size * max(1, 32 // s.batch_size))


def _rows(engine: str, todo: pa.Table, s: ScoreSettings, stages: StageConfig, plan: ResourcePlan,
          summary: ScoreSummary, t0: float, isolate: bool = False):
    """One pass of the engine over ``todo``. ``isolate``: one file per decode call (and, on Ray, per
    block), so that a file that kills its worker loses only itself."""
    todo = todo.select(["path", "sniff"])  # sizes stay on the driver (--max-bytes was checked there)
    if isolate:
        stages = replace(stages, decode_rows=1)
    if engine == "local":
        from .local_engine import LocalStats, run_local

        stats = LocalStats()
        summary.startup.setdefault("engine_start_s", round(time.perf_counter() - t0, 3))
        try:
            yield from run_local(todo, stages, workers=plan.workers, stats=stats, stall_timeout_s=s.stall_timeout_s)
        finally:
            summary.startup.update(asdict(stats))
        return
    yield from _pipeline(todo, s, stages, plan).iter_batches(batch_size=None, batch_format="pyarrow")


def _pipeline(todo: pa.Table, s: ScoreSettings, stages: StageConfig, plan: ResourcePlan):
    """The Ray Data stream of the three stages over ``todo`` (path, sniff), sized by ``plan``."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    ctx = DataContext.get_current()
    ctx.execution_no_progress_timeout_s = s.stall_timeout_s
    ctx.enable_progress_bars = False  # our own one-line progress reads better in logs
    ctx.print_on_execution_start = False
    # A block whose task failed (its worker died: a crashing decoder, the OOM killer) is dropped, not
    # retried by Ray without end (tasks default to max_retries=-1): the run loop finds its files
    # missing from the output and retries them itself, one file per task (jobs/runloop.py).
    ctx.max_errored_blocks = -1
    rows = stages.decode_rows
    block_rows = rows * max(1, math.ceil(todo.num_rows / 4096 / rows))  # <= ~4096 blocks
    ds = ray.data.from_arrow([todo.slice(i, block_rows) for i in range(0, todo.num_rows, block_rows)])
    # ray_remote_args_fn is the one way to set max_retries in Ray 2.60 (see _no_ray_retries); its
    # deprecation warning would be printed in the middle of the user's progress lines.
    warnings.filterwarnings("ignore", message=".*ray_remote_args_fn.*deprecated")
    ds = ds.map_batches(decode_batch, batch_size=rows, num_cpus=plan.task_cpus, batch_format="numpy",
                        ray_remote_args_fn=_no_ray_retries, fn_kwargs=stages.decode)
    ds = ds.map_batches(Scorer, batch_size=stages.batch_size, batch_format="numpy",
                        compute=ActorPoolStrategy(size=plan.actors), num_cpus=plan.cpus_per_actor,
                        num_gpus=plan.gpus_per_actor, fn_constructor_kwargs=stages.scorer)
    return ds.map_batches(finish_batch, batch_size=rows, num_cpus=plan.task_cpus, batch_format="numpy",
                          ray_remote_args_fn=_no_ray_retries, fn_kwargs=stages.finish)


def _no_ray_retries() -> dict:
    """Remote args of the decode and finish tasks: the run loop retries lost files, not Ray. (Ray
    2.60 has no named map_batches parameter for task retries; ray_remote_args_fn, deprecated for
    2.64, is the way until then.)"""
    return {"max_retries": 0}


def _score(todo: pa.Table, s: ScoreSettings, engine: str, stages: StageConfig, plan: ResourcePlan,
           info: ModelInfo, summary: ScoreSummary, t0: float, publish, echo) -> Outcome:
    """The run loop: files over --max-bytes get their row from the listing; the rest go through the
    engine with the retry policy of jobs/runloop.py."""
    summary.notes += _ood_notes(s, info)
    failed = _failed_rows(info)
    big = pc.greater(todo["size"], s.max_bytes)
    if pc.any(big).as_py():
        publish(failed(todo.filter(big)["path"], too_big(s.max_bytes), ERROR))
        todo = todo.filter(pc.invert(big))

    def run(rows: pa.Table, isolate: bool):
        return _rows(engine, rows, s, stages, plan, summary, t0, isolate)

    return drive(todo, run, publish, failed, RetryPolicy(passes=s.retries, backoff_s=s.retry_backoff_s), note=echo)


def _failed_rows(info: ModelInfo):
    """-> ``rows(paths, error, status)``: whole-schema rows for files that never reached the stages."""
    def rows(paths, error: str, status: str) -> pa.Table:
        paths = paths.to_pylist() if hasattr(paths, "to_pylist") else list(paths)
        n = len(paths)
        cols = {f.name: pa.nulls(n, f.type) for f in SCHEMA}
        cols.update(path=pa.array(paths, pa.string()), label=pa.array([label_from_path(p) for p in paths], pa.string()),
                    error=pa.array([error] * n, pa.string()), status=pa.array([status] * n, pa.string()),
                    model=pa.array([info.model_id] * n, pa.string()))
        return pa.table(cols, schema=SCHEMA)
    return rows


def _publisher(writer: PartWriter, summary: ScoreSummary, total: int, t0: float, progress):
    """``publish(table)``: write final rows and count them by status; progress at most every 2 s."""
    last = [0.0]

    def publish(table: pa.Table) -> None:
        summary.startup.setdefault("first_rows_s", round(time.perf_counter() - t0, 3))
        writer.add(table)
        counts = {d["values"]: d["counts"] for d in pc.value_counts(table["status"].cast(pa.string())).to_pylist()}
        summary.scored += counts.get(SCORED, 0)
        summary.skipped += counts.get(SKIPPED, 0)
        if counts.get(SKIPPED):
            _count_skipped(summary.skipped_by, table)
        summary.retry += counts.get(RETRY, 0)
        summary.out_of_scope += counts.get(OUT_OF_SCOPE, 0)
        summary.flagged_out_of_scope += _flagged(table)
        summary.errors += table.num_rows - sum(counts.get(k, 0) for k in (SCORED, SKIPPED, RETRY, OUT_OF_SCOPE))
        summary.seconds = time.perf_counter() - t0
        if progress and time.perf_counter() - last[0] > 2:
            last[0] = time.perf_counter()
            progress(summary, total)
    return publish


MAX_SKIP_REASONS = 100  # distinct reasons counted by name: the values come from the files, so they are unbounded


def _count_skipped(by: dict, table: pa.Table) -> None:
    """Add ``table``'s "skipped" rows to ``by`` (reason -> files); past MAX_SKIP_REASONS, as "other reasons"."""
    skipped = table.filter(pc.fill_null(pc.equal(table["status"].cast(pa.string()), SKIPPED), False))
    for d in pc.value_counts(skipped["error"].cast(pa.string())).to_pylist():
        key = skip_reason(d["values"])
        key = key if key in by or len(by) < MAX_SKIP_REASONS else "other reasons"
        by[key] = by.get(key, 0) + d["counts"]


def _flagged(table: pa.Table) -> int:
    """Rows scored although over the OOD threshold (--ood flag)."""
    scored = pc.equal(table["status"].cast(pa.string()), SCORED)
    return pc.sum(pc.and_(scored, table["out_of_scope"]).fill_null(False)).as_py() or 0


def _ood_notes(s: ScoreSettings, info: ModelInfo) -> list[str]:
    """Said once per run, not per row: a model without OOD statistics scores whatever it is shown."""
    if s.ood == "off":
        return ["out-of-distribution check off (--ood off): every decoded image was scored, whatever it shows"]
    if info.ood_threshold is None:
        why = "an untrained head" if not info.trained else "a checkpoint written before they existed"
        return [f"the model has no out-of-distribution statistics ({why}): every decoded image was scored, whatever"
                " it shows; retrain with `cxr-batch train` to get them"]
    return []
