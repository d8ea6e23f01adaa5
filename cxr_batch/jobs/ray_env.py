"""Connecting to Ray: join a cluster (``--address`` / ``RAY_ADDRESS``) or start one in-process, and
keep Ray's own output in its log files.

Workers import ``cxr_batch``: on a cluster, install it on every node (cluster.yaml does) or submit
the job with ``ray job submit --working-dir .``, which ships this folder to every worker.

Quiet by default: the workers' and Ray Train's controller's output (per-epoch result dicts,
checkpoint paths, core_worker warnings) stays in the session's log files (/tmp/ray/session_latest/
logs) instead of being copied to this console, Ray's Python loggers print errors only, and Ray
Data draws no progress bars. The jobs print their own progress and summary instead; what a user
must see from a worker travels back as data (a row's ``error``, a training worker's ``notes``).
``verbose=True`` (``--verbose``) leaves Ray as it is.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from contextlib import contextmanager, nullcontext

RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")


def joining_a_cluster(address: str | None) -> bool:
    """True when ``address`` (or RAY_ADDRESS) names a cluster to join; False when Ray would start here."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None, verbose: bool = False) -> bool:
    """Make sure Ray is up; True when this call started it (the caller then shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not verbose:
        quiet()
    kwargs = dict(logging_level=logging.INFO if verbose else logging.ERROR, log_to_driver=verbose)
    if address:
        ray.init(address=address, **kwargs)
    else:
        # "local": a new Ray in this process, never a `ray start` cluster that Ray would otherwise
        # find in /tmp/ray/ray_current_cluster. The dashboard stays on: Ray Train V2 asks its state
        # API for worker status.
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
    if not verbose:
        quiet()  # ray.init configures its loggers again
    return True


def quiet() -> None:
    """Ray's console output of this process down to errors. Environment variables are read by the
    processes Ray starts from here (a local Ray); on a joined cluster the workers log to files anyway."""
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    for name in RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from ray.data import DataContext
    except ImportError:  # pragma: no cover - ray[data] is a dependency
        return
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


@contextmanager
def ray_running(address: str | None = None, *, num_cpus: int | None = None, verbose: bool = False):
    """``with ray_running(addr):`` Ray is up inside; shut down after only if this started it."""
    started = ensure_ray(address, num_cpus=num_cpus, verbose=verbose)
    with native_log_lines_dropped() if started and not verbose else nullcontext():
        try:
            yield
        finally:
            if started:
                import ray

                ray.shutdown()


# What Ray's C++ core writes: "[2026-12-01 04:11:37,130 E 21263 21263] core_worker.cc:2465: ...".
_NATIVE_LOG = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWE] \d+ \d+\] ")


@contextmanager
def native_log_lines_dropped():
    """Inside, the log lines that Ray's C++ core of this process mirrors onto stderr are dropped;
    everything else written to stderr passes through. The driver's core worker writes them to its
    log file (python-core-driver-*.log) as well, and mirrors its errors to stderr: with Ray Data's
    actor pools that is one "constructor arguments in the object store" line per pool (Ray issue
    53727), which is about Ray's internals, not the user's job. Fatal lines ("F") still pass.

    stderr (fd 2) becomes a pipe that a thread filters line by line; a partial line that cannot
    be a log line (a progress redraw) is passed on at once."""
    try:
        real = os.dup(2)
        read_end, write_end = os.pipe()
    except OSError:  # no usable stderr: nothing to filter
        yield
        return
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)
    pump = threading.Thread(target=_filter_lines, args=(read_end, real), daemon=True)
    pump.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)  # closes the pipe's last write end here: the thread sees the end
        pump.join(timeout=2)  # a child started inside may hold the pipe: the thread then stays, as a daemon


def _filter_lines(read_end: int, real: int) -> None:
    out = os.dup(real)
    held = b""
    try:
        while data := os.read(read_end, 65536):
            *lines, held = (held + data).split(b"\n")
            text = b"".join(line + b"\n" for line in lines if not _NATIVE_LOG.match(line))
            if held and not held.startswith(b"["):
                text, held = text + held, b""
            if text:
                os.write(out, text)
        if held:
            os.write(out, held)
    finally:
        os.close(read_end)
        os.close(out)


@contextmanager
def gpus_requested(n: int, *, timeout_s: float = 900, echo=print):
    """``with gpus_requested(4):`` the cluster has at least 4 GPUs inside; the request ends after.

    The jobs size their actor pools and train workers from the cluster as it is when they start, and
    a cluster whose GPU workers scale from zero (cluster.yaml) has no GPU until something asks: this
    asks the autoscaler, waits for the nodes to join, and withdraws the request on exit so idle
    nodes can go again. Nothing to do when ``n`` is 0 or the GPUs are already there.
    """
    import time

    import ray
    from ray.autoscaler.sdk import request_resources

    from ..errors import InputError

    have = ray.cluster_resources().get("GPU", 0)
    asked = n > 0 and have < n
    if asked:
        echo(f"asking the autoscaler for {n} GPUs (the cluster has {have:g}); waiting up to {timeout_s:g} s")
        request_resources(bundles=[{"GPU": 1}] * n)
    try:
        deadline = time.monotonic() + timeout_s
        while asked and (have := ray.cluster_resources().get("GPU", 0)) < n:
            if time.monotonic() > deadline:
                raise InputError(
                    f"Asked the autoscaler for {n} GPUs, but the cluster has {have:g} after {timeout_s:g} s. Check"
                    " `ray status` and the GPU node type's max_workers in cluster.yaml, or lower --wait-for-gpus.")
            time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
        yield
    finally:
        if asked:
            request_resources(bundles=[])  # withdraw: idle GPU nodes leave after idle_timeout_minutes


@contextmanager
def ray_for_job(address: str | None = None, *, wait_for_gpus: int = 0, wait_timeout: float = 900,
                verbose: bool = False, echo=print):
    """Ray up (joined, or started in this process) and, when asked, the GPUs the job sizes itself by."""
    with ray_running(address, verbose=verbose), gpus_requested(wait_for_gpus, timeout_s=wait_timeout, echo=echo):
        yield


def node_cpus() -> list[float]:
    """The CPUs of each live node of the Ray this process is connected to (nodes without CPUs left out)."""
    import ray

    return [n["Resources"]["CPU"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]


def check_shared_storage(paths: dict[str, str | None], *, job: str) -> None:
    """Refuse node-local paths on a multi-node cluster: every node's workers read and write them, so
    they must be on storage all nodes see (``s3://``, or a mount every node has: then set
    CXR_BATCH_SHARED_FS=1). ``paths`` maps an option name to its value (None: not used)."""
    message = node_local_problem(paths, len(node_cpus()), shared_fs=bool(os.environ.get("CXR_BATCH_SHARED_FS")), job=job)
    if message:
        from ..errors import InputError

        raise InputError(message)


def node_local_problem(paths: dict[str, str | None], nodes: int, *, shared_fs: bool, job: str) -> str | None:
    """The refusal for the first node-local path in ``paths``, or None when there is nothing to refuse."""
    from ..archive.storage import is_uri

    if nodes <= 1 or shared_fs:
        return None
    for option, path in paths.items():
        if path is not None and not is_uri(path):
            return (f"{option} {path} is a node-local path, but the Ray cluster has {nodes} nodes: {job} on every node"
                    " must see it. Use s3://bucket/... (or set CXR_BATCH_SHARED_FS=1 if every node mounts it at that path).")
    return None
