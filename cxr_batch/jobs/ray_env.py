"""Connecting to Ray: join a cluster (``--address`` / ``RAY_ADDRESS``) or start one in-process.

Workers import ``cxr_batch``: on a cluster, install it on every node (cluster.yaml does) or submit
the job with ``ray job submit --working-dir .``, which ships this folder to every worker.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Make sure Ray is up; True when this call started it (the caller then shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **kwargs)
    else:
        # "local": a new Ray in this process, never a `ray start` cluster that Ray would otherwise
        # find in /tmp/ray/ray_current_cluster. The dashboard stays on: Ray Train V2 asks its state
        # API for worker status.
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
    return True


@contextmanager
def ray_running(address: str | None = None):
    """``with ray_running(addr):`` Ray is up inside; shut down after only if this started it."""
    started = ensure_ray(address)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


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
