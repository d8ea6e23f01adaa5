"""Fine-tune on a Ray cluster: `cxr-batch train --json` as a `ray job submit` entrypoint.

Example (from the repository root, against the cluster of cluster.yaml, whose GPU nodes start at
zero: ask for 2, then train on 2 GPU workers):

    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/train.py \
        s3://my-bucket/chest_xray --out s3://my-bucket/runs/r101 --workers 2 --device gpu --wait-for-gpus 2

The options are those of `cxr-batch train` (`python jobs/train.py --help`). On several nodes --out
must be storage every node sees (s3://, or an NFS mount with CXR_BATCH_SHARED_FS=1). Re-submitting
with the same --out resumes from its last.ckpt. Joining a cluster, the run does not register itself
as the default model unless --register is given. The first line printed is the settings as JSON
("settings: {...}"), the last one the summary ({"summary": {...}}).
"""

import sys

from cxr_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "--json", *sys.argv[1:]], prog_name="cxr-batch"))
