"""Score an archive on a Ray cluster: `cxr-batch score --json` as a `ray job submit` entrypoint.

Example (from the repository root, against the cluster of cluster.yaml):

    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/score.py \
        s3://my-bucket/chest_xray/test --out s3://my-bucket/scores/test \
        --model s3://my-bucket/runs/r101/best.ckpt --wait-for-gpus 4

The options are those of `cxr-batch score` (`python jobs/score.py --help`). Inside `ray job submit`
RAY_ADDRESS names the cluster; run directly, it starts a local Ray. The first line printed is the
settings as JSON ("settings: {...}"), the last one the summary ({"summary": {...}}).
"""

import sys

from cxr_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", "--json", *sys.argv[1:]], prog_name="cxr-batch"))
