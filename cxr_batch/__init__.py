"""cxr-batch: fine-tune a ResNet on chest X-rays with Ray Train and score archives with Ray Data.

The one place that names the classes: index 0 is NORMAL, index 1 is PNEUMONIA, everywhere
(model heads, labels, checkpoints, Parquet columns).
"""

CLASSES = ("NORMAL", "PNEUMONIA")
POSITIVE = 1  # index of PNEUMONIA, the class whose probability and CAM we report

__version__ = "0.1.0"
