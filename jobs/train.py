"""Fine-tune on a Ray cluster: `cxr-batch train` as a `ray job submit` entrypoint.

Example (from the repository root, against the cluster of cluster.yaml, whose GPU nodes start at
zero: ask for 2, then train on 2 GPU workers):

    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/train.py \
        s3://my-bucket/chest_xray --out s3://my-bucket/runs/r101 --workers 2 --gpu --wait-for-gpus 2

On several nodes --out must be storage every node sees (s3://, or an NFS mount with
CXR_BATCH_SHARED_FS=1). Re-submitting with the same --out resumes from its last.ckpt. The last line
printed is the summary as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from _common import add_cluster_args
from cxr_batch.cli import format_train_summary
from cxr_batch.errors import CxrError
from cxr_batch.jobs.ray_env import gpus_requested, ray_running
from cxr_batch.jobs.train import PLACEMENTS, TrainSettings, run_train


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jobs/train.py", description="Fine-tune a ResNet on DATA/train, validate on DATA/val.")
    p.add_argument("data", help="folder or s3:// prefix with train/ (and val/) holding NORMAL/ and PNEUMONIA/")
    p.add_argument("--out", required=True, help="run folder (s3:// on a multi-node cluster): last.ckpt, best.ckpt, history.json")
    p.add_argument("--arch", default="resnet101", help="resnet18, resnet50 or resnet101 (default)")
    p.add_argument("--weights", default="imagenet", help="imagenet (default), none, or a state-dict file")
    p.add_argument("--epochs", type=int, default=10, help="total, warm-up included (default 10)")
    p.add_argument("--warmup-epochs", type=int, default=1, help="head-only epochs with a frozen backbone (default 1)")
    p.add_argument("--batch-size", type=int, default=32, help="per worker (default 32)")
    p.add_argument("--lr", type=float, default=None, help="fine-tuning lr (default 1e-4 pretrained, 5e-4 from scratch)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=2, help="data-parallel workers (default 2; one per GPU)")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="train on GPUs (default: when the cluster has them)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--placement", choices=PLACEMENTS, default="PACK",
                   help="PACK (default) fills a node first; SPREAD puts workers on different nodes")
    p.add_argument("--val-fraction", type=float, default=0.1, help="of train/, when val/ is missing or tiny")
    p.add_argument("--target-sensitivity", type=float, default=None, help="threshold for this val sensitivity (default: Youden's J)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-failures", type=int, default=1, help="worker-group restarts from the last checkpoint")
    p.add_argument("--register", action="store_true",
                   help="make best.ckpt the default model of `cxr-batch score` on the node running this job")
    add_cluster_args(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        s = TrainSettings(data=a.data, out=a.out, arch=a.arch, weights=a.weights, epochs=a.epochs,
                          warmup_epochs=a.warmup_epochs, batch_size=a.batch_size, lr=a.lr, image_size=a.image_size,
                          workers=a.workers, gpu=a.gpu, cpus_per_worker=a.cpus_per_worker, placement=a.placement,
                          val_fraction=a.val_fraction, target_sensitivity=a.target_sensitivity, seed=a.seed,
                          max_failures=a.max_failures)
        print("settings:", json.dumps(asdict(s)), flush=True)
        with ray_running(a.address), gpus_requested(a.wait_for_gpus, timeout_s=a.wait_timeout):
            summary = run_train(s, echo=lambda m: print(m, flush=True), register=a.register)
    except CxrError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    print(format_train_summary(summary))
    print(json.dumps({"summary": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
