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
