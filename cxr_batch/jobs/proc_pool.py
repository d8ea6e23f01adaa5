"""A small process pool for the local engine: one task per worker at a time, so a worker that dies
loses exactly the task it held (its rows come back absent, as a dead Ray worker's would) and the
pool starts a replacement; every other task goes on.

Why not ``concurrent.futures.ProcessPoolExecutor``: when one of its workers dies it marks the whole
pool broken and fails every pending future, without saying which task killed it, so one poison
file would cost every batch in flight. Why not Ray: its start-up (``ray.init``, worker and actor
processes) is what the local engine exists to avoid on small archives.

Workers are started with ``spawn`` (a fresh interpreter: the driver may hold torch's OpenMP threads,
which a fork would copy in an unusable state) and never import torch: the stage functions they run
use numpy and Pillow only. A dispatcher thread in the driver hands out tasks and collects results,
so the workers stay busy while the driver's main thread runs the model (torch releases the GIL).
"""

from __future__ import annotations

import heapq
import itertools
import multiprocessing
import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait

LOST = "lost"  # the worker died while holding the task
FAILED = "failed"  # the task raised: a bug, not a property of one file (stages turn file errors into rows)
DONE = "done"


@dataclass
class Result:
    task: int
    status: str  # DONE | FAILED | LOST
    value: object = None  # the function's return value (DONE) or a traceback text (FAILED)
    tag: object = None  # whatever the caller passed to submit()


def _worker_main(conn, nice: int, env: dict) -> None:
    os.environ.update(env)
    if nice:
        os.nice(nice)
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        task, fn, args, kwargs = msg
        try:
            conn.send((task, DONE, fn(*args, **kwargs)))
        except BaseException:  # the driver decides what a failure means; this process goes on
            conn.send((task, FAILED, traceback.format_exc(limit=20)))


class _Worker:
    def __init__(self, ctx, nice: int, env: dict):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, nice, env), daemon=True)
        self.proc.start()
        child.close()
        self.task = None  # (priority, id, tag) of the task it holds


class ProcessPool:
    """``submit(fn, *args, priority=, tag=)`` -> task id; ``get(timeout)`` -> the next ``Result``.

    Lower ``priority`` runs first (the local engine finishes scored batches before it decodes more).
    ``env`` is set in each worker before any task (e.g. OMP_NUM_THREADS=1), ``nice`` lowers its
    CPU priority."""

    def __init__(self, workers: int, *, nice: int = 0, env: dict | None = None):
        self._ctx = multiprocessing.get_context("spawn")
        self._nice, self._env = nice, dict(env or {})
        self._ids = itertools.count()
        self._pending: list = []  # heap of (priority, id, fn, args, kwargs, tag)
        self._results: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)
        self._closed = False
        self.workers = [_Worker(self._ctx, nice, self._env) for _ in range(max(1, workers))]
        self.replaced = 0  # workers that died and were replaced
        self._thread = threading.Thread(target=self._dispatch, name="proc-pool", daemon=True)
        self._thread.start()

    def submit(self, fn, *args, priority: int = 0, tag=None, **kwargs) -> int:
        task = next(self._ids)
        with self._lock:
            heapq.heappush(self._pending, (priority, task, fn, args, kwargs, tag))
        self._wake_w.send(b"")
        return task

    def get(self, timeout: float | None = None) -> Result | None:
        """The next finished task, in completion order; None when none finished within ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait_s = 1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic()))
            try:
                return self._results.get(timeout=wait_s)
            except queue.Empty:
                if not self._thread.is_alive():  # never wait forever on a dispatcher that is gone
                    raise RuntimeError("the local engine's process pool stopped dispatching") from None
                if deadline is not None and time.monotonic() >= deadline:
                    return None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake_w.send(b"")
        self._thread.join(timeout=10)
        for w in self.workers:
            try:
                w.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for w in self.workers:
            w.proc.join(timeout=5)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ the dispatcher thread

    def _dispatch(self) -> None:
        try:
            self._loop()
        except BaseException:
            if not self._closed:
                traceback.print_exc()

    def _loop(self) -> None:
        while not self._closed:
            self._hand_out()
            busy = [w for w in self.workers if w.task is not None]
            ready = wait([self._wake_r] + [w.conn for w in busy] + [w.proc.sentinel for w in busy])
            if self._wake_r in ready:
                while self._wake_r.poll():
                    self._wake_r.recv_bytes()
            for w in busy:
                if w.conn in ready or w.proc.sentinel in ready:
                    self._collect(w)

    def _hand_out(self) -> None:
        for w in self.workers:
            if w.task is not None:
                continue
            with self._lock:
                if not self._pending:
                    return
                priority, task, fn, args, kwargs, tag = heapq.heappop(self._pending)
            w.task = (priority, task, tag)
            try:
                w.conn.send((task, fn, args, kwargs))
            except (OSError, BrokenPipeError):  # it died while idle: give the task to its replacement
                with self._lock:
                    heapq.heappush(self._pending, (priority, task, fn, args, kwargs, tag))
                self._replace(w)
                return

    def _collect(self, w: _Worker) -> None:
        _, task, tag = w.task
        try:
            got, status, value = w.conn.recv()  # a result sent just before dying still counts
            assert got == task
        except (EOFError, OSError):
            # The process died with the task (a crash in a decoder, the OOM killer, a kill -9). Replaced
            # before the result is out, so that whoever reads it also sees the new worker counted.
            self._replace(w)
            self._results.put(Result(task, LOST, None, tag))
            return
        w.task = None
        self._results.put(Result(task, status, value, tag))

    def _replace(self, w: _Worker) -> None:
        w.proc.join(timeout=1)
        w.conn.close()
        self.workers[self.workers.index(w)] = _Worker(self._ctx, self._nice, self._env)
        self.replaced += 1
