"""Connecting to Ray: join a cluster (``--address`` / ``RAY_ADDRESS``) or start one in-process.

Workers import ``cxr_batch``: on a cluster, install it on every node (cluster.yaml does) or submit
the job with ``ray job submit --working-dir .``, which ships this folder to every worker.
"""

from __future__ import annotations

import logging
import os


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Make sure Ray is up; True when this call started it (the caller then shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(logging_level=logging.WARNING)
    if address:
        cwd = _cwd()
        ray.init(address=address, **kwargs)
        _reenter(cwd)
    else:
        # "local": a new Ray in this process, never a `ray start` cluster that Ray would otherwise
        # find in /tmp/ray/ray_current_cluster. The dashboard stays on: Ray Train V2 asks its state
        # API for worker status.
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
    return True


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except FileNotFoundError:
        return None


def _reenter(cwd: str | None) -> None:
    """Under `ray job submit --working-dir . --runtime-env-json '{"env_vars": ...}'`, the driver's
    ray.init() unpacks the working dir again over the driver's own cwd (seen with Ray 2.60 on the
    first run of a new package): the old folder is deleted, so getcwd() and every relative path fail,
    though the same path exists again. Stepping back into it by name fixes both."""
    if cwd and _cwd() != cwd and os.path.isdir(cwd):
        os.chdir(cwd)
