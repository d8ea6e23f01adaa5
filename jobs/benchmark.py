"""Throughput of `cxr-batch score` against plain PyTorch and the bare model: `cxr-batch benchmark`
as a script. It starts its own local Ray (the comparison is on one machine), so run it directly:

    python jobs/benchmark.py /tmp/cxr-bench --out-json benchmark.json
    python jobs/benchmark.py /tmp/cxr-bench --modes fp32,bf16,bf16+compile --memory-check

The first run writes 600 phantom JPEGs of 1000-2000 px into WORKDIR/archive and keeps them. The
table goes to stdout, progress to stderr; docs/performance.md says how to read it.
"""

import sys

from cxr_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]], prog_name="cxr-batch"))
