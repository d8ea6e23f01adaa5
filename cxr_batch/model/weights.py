"""Safe loading of torch files that may come from anywhere: checkpoints, and the ImageNet-style
state dicts that ``--weights FILE`` names. ``torch.load(weights_only=True)``: a file that would
need to unpickle a Python object (and could run code doing so) is refused, not executed.

Shared by the checkpoint format (checkpoint.py) and the network builder (network.py), which both
read such files; neither needs the other for it.
"""

from __future__ import annotations

import io
import pickle

import torch

from ..archive import storage
from ..errors import CheckpointError, one_line


def load_state_file(uri: str) -> dict:
    """A torch file that may come from anywhere -> its plain dict, refusing pickled code."""
    return load_state_file_bytes(read_file(uri), uri)


def load_state_file_bytes(data: bytes, uri: str) -> dict:
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is paragraphs of advice; the line naming the refused global is the news.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if "GLOBAL" in line or "WeightsUnpickler" in line), lines[-1] if lines else "")
        raise CheckpointError(
            f"Refusing to load {uri}: it holds pickled Python objects that could run code when loaded"
            f" (torch.load weights_only=True said: {detail[:160]}). Only plain tensor files (cxr-batch checkpoints, state dicts) are accepted."
        ) from None
    except Exception as e:
        raise CheckpointError(f"{uri} is not a PyTorch checkpoint ({type(e).__name__}: {one_line(e, 120)}).") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{uri} holds a {type(obj).__name__}, not a dict of tensors.")
    return obj


def read_file(uri: str) -> bytes:
    """The bytes of a checkpoint or weights file; a missing file or a folder is a CheckpointError."""
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        raise CheckpointError(f"Checkpoint not found: {uri}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{uri} is a folder; pass the checkpoint file in it (e.g. best.ckpt).") from None
