"""The local engine: the scoring stages in this process and a small process pool, without Ray.

For a single-node run that starts its own Ray, Ray's start-up (``ray.init``, its worker processes,
the model actor's process, torch imported and the model built there) was 12-16 s of a 40-80 s run
on 600 images. Here:

  decode    ``decode_batch`` in a pool of ``cpus - 1`` spawned processes that never import torch;
            started first, so they decode while this process imports torch and builds the model
  model     ``Scorer`` in this process, torch with every CPU (or the GPU)
  finish    ``finish_batch`` in the same pool, ahead of any further decoding

The model never waits once it is built: decoded batches queue ahead of it (bounded, so memory does
not grow with the archive), and finished rows are handed back as they come, in any order.
A pool process that dies loses only the batch it held: those paths are absent from the output
and the driver finds them by an anti-join, as with a dead Ray worker (RUNLOOP.md).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

from ..errors import Stalled
from .proc_pool import DONE, FAILED, ProcessPool
from .score_stages import Scorer, StageConfig, decode_batch, finish_batch

FINISH, DECODE = 0, 1  # pool priorities: finishing frees memory and yields rows; decode can wait


def node_cpus() -> int:
    """CPUs this process may run on (taskset / cgroup cpusets respected)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def node_gpus() -> int:
    """NVIDIA GPUs visible to this process, without importing torch (~2-4 s): the driver's kernel
    module lists them under /proc, CUDA_VISIBLE_DEVICES narrows them."""
    try:
        n = len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        n = min(n, len([d for d in visible.split(",") if d.strip() and not d.strip().startswith("-")]))
    return n


@dataclass
class LocalStats:
    """Start-up of the local engine: what each part costs, in seconds (durations, or since the
    engine started)."""

    pool_start_s: float = 0.0  # processes spawned (they import numpy/Pillow on their own time)
    torch_import_s: float = 0.0  # 0 when this process had torch already
    model_build_s: float = 0.0  # checkpoint read, network built, BN folded
    first_decode_s: float | None = None  # first decoded batch back from the pool
    first_batch_s: float | None = None  # first forward pass done (includes oneDNN/cuDNN warm-up)
    workers_lost: int = 0  # pool processes that died (their batches are absent)
    model_ready_s: float | None = None  # since the engine started: torch imported and the model built


def run_local(paths: pa.Table, stages: StageConfig, *, workers: int, max_decoded: int | None = None,
              stats: LocalStats | None = None, stall_timeout_s: float | None = None) -> Iterator[pa.Table]:
    """Yield ``finish_batch`` outputs (Arrow tables) for the rows of ``paths`` (a ``path`` column,
    and whatever else decode_batch reads), each row at most once; rows of a lost batch are absent.

    ``max_decoded``: decoded rows allowed to wait for the model once it runs (default: 8 decode
    batches, 1.6 MB each at 224 px), flat in the archive's size. Until the model is built, more may
    wait (``startup_rows``, at most STARTUP_BYTES of pixels). ``stall_timeout_s``: ``Stalled`` is
    raised when the pool returns nothing for that long (--stall-timeout, as Ray Data's), and the pool's
    processes, stuck ones included, are ended."""
    stats = stats if stats is not None else LocalStats()
    t0 = time.perf_counter()
    rows = stages.decode_rows
    chunks = iter(range(0, paths.num_rows, rows))
    ahead = max_decoded or 8 * rows
    # One thread per worker for numpy/BLAS: the workers are many, the model wants the cores.
    pool = ProcessPool(workers, env={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    try:
        stats.pool_start_s = round(time.perf_counter() - t0, 3)
        state = _Flow(pool, paths, chunks, stages, startup_rows(stages, ahead))
        state.top_up()  # decoding starts before torch is even imported
        scorer = _build_scorer(stages, stats, t0)
        state.ahead = ahead  # from here on the model drains the queue: keep it short
        yield from _drive(state, scorer, stages, stats, t0, stall_timeout_s)
    finally:
        pool.close()
        stats.workers_lost = pool.replaced


# Pixels decoded ahead while this process imports torch and builds the model (3-6 s on a CPU, one
# core): with only the steady queue, the pool sat idle for ~3 of those seconds on 2 CPUs and then
# took CPU from the forward pass for the same decoding later.
STARTUP_BYTES = 64 << 20  # 1,312 rows at 224 px


def startup_rows(stages: StageConfig, ahead: int) -> int:
    """Rows that may be decoded before the model is ready: STARTUP_BYTES of model-sized pixels
    (uint8, one channel: 50 KB at 224 px), in whole decode batches, never fewer than the steady ``ahead``.
    JPEGs left for the device (``device_decode``) travel as whole files, ten times that: only ``ahead``."""
    if stages.decode.get("device_decode"):
        return ahead
    side = int(stages.decode["image_size"])  # decode_batch requires it: no default to hide a missing one
    rows = stages.decode_rows
    return max(ahead, STARTUP_BYTES // (side * side) // rows * rows)


class _Flow:
    """Bookkeeping of what is in the pool: decode tasks are submitted while the decoded-but-unscored
    rows and the rows being decoded stay under ``ahead``."""

    def __init__(self, pool: ProcessPool, paths: pa.Table, chunks, stages: StageConfig, ahead: int):
        self.pool, self.paths, self.chunks, self.stages, self.ahead = pool, paths, chunks, stages, ahead
        self.in_flight = 0  # tasks submitted, not yet back
        self.queued_rows = 0  # rows decoding or decoded and waiting for the model
        self.exhausted = False

    def top_up(self) -> None:
        while not self.exhausted and self.queued_rows < self.ahead:
            start = next(self.chunks, None)
            if start is None:
                self.exhausted = True
                return
            block = self.paths.slice(start, self.stages.decode_rows)
            batch = {name: np.asarray(block.column(name).to_pylist(), dtype=object) for name in block.column_names}
            self.pool.submit(decode_batch, batch, priority=DECODE, tag=("decode", block.num_rows), **self.stages.decode)
            self.in_flight += 1
            self.queued_rows += block.num_rows

    def finish(self, batch: dict) -> None:
        self.pool.submit(finish_batch, batch, priority=FINISH, tag=("finish", 0), **self.stages.finish)
        self.in_flight += 1

    @property
    def done(self) -> bool:
        return self.exhausted and self.in_flight == 0


def _build_scorer(stages: StageConfig, stats: LocalStats, t0: float) -> Scorer:
    import importlib
    import sys

    t = time.perf_counter()
    had_torch = "torch" in sys.modules
    importlib.import_module("torch")  # timed apart from the model build: it is the larger part on a CPU

    stats.torch_import_s = 0.0 if had_torch else round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    scorer = Scorer(**stages.scorer)
    stats.model_build_s = round(time.perf_counter() - t, 3)
    stats.model_ready_s = round(time.perf_counter() - t0, 3)
    return scorer


STALLED = ("no progress for {s:g} s (--stall-timeout) in the local engine: a read or decode that does not return"
           " (a hung mount?). The rows written so far are kept: run again to resume.")


def _drive(state: _Flow, scorer: Scorer, stages: StageConfig, stats: LocalStats, t0: float,
           stall_timeout_s: float | None = None) -> Iterator[pa.Table]:
    while not state.done:
        r = state.pool.get(timeout=stall_timeout_s)
        if r is None:
            raise Stalled(STALLED.format(s=stall_timeout_s))
        state.in_flight -= 1
        kind, n = r.tag
        if r.status == FAILED:
            raise RuntimeError(f"a {kind} task failed in the local engine's pool:\n{r.value}")
        if kind == "decode":
            state.queued_rows -= n
            if r.status == DONE:
                if stats.first_decode_s is None:
                    stats.first_decode_s = round(time.perf_counter() - t0, 3)
                for part in _forward_batches(r.value, stages.batch_size):
                    state.finish(scorer(part))
                    if stats.first_batch_s is None:
                        stats.first_batch_s = round(time.perf_counter() - t0, 3)
            state.top_up()
        elif r.status == DONE:
            yield pa.table({k: _arrow(v) for k, v in r.value.items()})
        # LOST: the batch's rows stay absent; the driver's anti-join finds them (RUNLOOP.md).


def _forward_batches(batch: dict, size: int) -> Iterator[dict]:
    n = len(batch["path"])
    for i in range(0, n, size):
        yield {k: v[i: i + size] for k, v in batch.items()}


def _arrow(v) -> pa.Array:
    """A finish column as Arrow: object arrays of str/None -> string, numbers as they are."""
    if isinstance(v, np.ndarray) and v.dtype == object:
        return pa.array(v.tolist(), type=pa.string()) if all(x is None or isinstance(x, str) for x in v) \
            else pa.array(v.tolist())
    return pa.array(v)
