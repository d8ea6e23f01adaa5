"""Score an archive on a Ray cluster: `cxr-batch score` as a `ray job submit` entrypoint.

Example (from the repository root, against the cluster of cluster.yaml):

    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/score.py \
        s3://my-bucket/chest_xray/test --out s3://my-bucket/scores/test \
        --model s3://my-bucket/runs/r101/best.ckpt --wait-for-gpus 4

Inside `ray job submit` RAY_ADDRESS names the cluster; run directly, it starts a local Ray. The last
line printed is the summary as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from _common import add_cluster_args
from cxr_batch.cli import format_summary
from cxr_batch.pixels.decode import DEFAULT_MAX_PIXELS
from cxr_batch.errors import CxrError
from cxr_batch.jobs.ray_env import gpus_requested, ray_running
from cxr_batch.jobs.score import ScoreSettings, run_score


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jobs/score.py", description="Score every chest X-ray under ARCHIVE into Parquet + CAM PNGs.")
    p.add_argument("archive", help="folder or s3:// prefix holding the images (any nesting)")
    p.add_argument("--out", required=True, help="Parquet output folder (local path or s3://)")
    p.add_argument("--model", default=None, help="checkpoint path/URI, or ARCH:WEIGHTS such as resnet18:none (smoke test)")
    p.add_argument("--cam-dir", default=None, help="where CAM PNGs go (default: <out>-cams)")
    p.add_argument("--no-cams", dest="cams", action="store_false", help="skip the CAM PNGs")
    p.add_argument("--cam-size", type=int, default=None, help="overlay side in px; 0 = the image's own size")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--actors", type=int, default=None, help="model replicas (default: one per GPU, else fit to CPUs)")
    p.add_argument("--cpus-per-actor", type=float, default=None, help="CPUs per model actor (torch threads)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in each actor")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images (decompression bombs)")
    p.add_argument("--overwrite", action="store_true", help="delete the output first (default: resume)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N files (sorted by path)")
    p.add_argument("--stall-timeout", type=float, default=900, help="fail after this many seconds without progress")
    add_cluster_args(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        s = ScoreSettings(archive=a.archive, out=a.out, model=a.model, cam_dir=a.cam_dir, cams=a.cams,
                          cam_size=a.cam_size, batch_size=a.batch_size, actors=a.actors,
                          cpus_per_actor=a.cpus_per_actor, device=a.device, precision=a.precision,
                          compile=a.compile, max_pixels=a.max_pixels, overwrite=a.overwrite, limit=a.limit,
                          stall_timeout_s=a.stall_timeout)
        print("settings:", json.dumps(asdict(s)), flush=True)
        with ray_running(a.address), gpus_requested(a.wait_for_gpus, timeout_s=a.wait_timeout):
            summary = run_score(s, progress=_progress)
    except CxrError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    print(json.dumps({"summary": asdict(summary)}))
    return 0


def _progress(summary, total: int) -> None:
    print(f"scored {summary.scored + summary.errors:,}/{total:,} files, {summary.errors:,} errors,"
          f" {summary.images_per_s:.1f} img/s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
