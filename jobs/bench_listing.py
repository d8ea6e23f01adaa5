"""The archive I/O benchmark (listing rate local and S3, driver memory, time to the first scored
row) as a script; see cxr_batch/bench/listing.py. Run it directly (the --e2e part starts Ray):

    python jobs/bench_listing.py /tmp/cxr-listing --files 1000000 --s3-keys 20000 --e2e
"""

from __future__ import annotations

import sys

from cxr_batch.bench.listing import main

if __name__ == "__main__":
    sys.exit(main())
