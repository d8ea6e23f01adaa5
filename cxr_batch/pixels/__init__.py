"""Bytes -> gray -> model input: decoding every image format, and the model's pixels. No Ray, and no torch at import time."""
