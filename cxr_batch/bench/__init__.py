"""`cxr-batch benchmark`: throughput of `cxr-batch score` against plain PyTorch and the bare model."""
