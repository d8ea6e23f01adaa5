"""Loading torch files that may come from anywhere, without unpickling: checkpoints, the
ImageNet-style state dicts that ``--weights FILE`` names, and torchvision's ImageNet weights.

Every file goes through ``torch.load(weights_only=True)``: plain tensors, numbers, strings, lists
and dicts load; a file that would need to unpickle a Python object (and could run code doing so)
is refused, not executed. Shared by the checkpoint format (checkpoint.py) and the network builder
(network.py), which both read such files; neither needs the other for it.

ImageNet weights are found the way torch.hub finds them (torchvision's URL; the cache folder
``$TORCH_HOME/hub/checkpoints``, i.e. ``torch.hub.get_dir()``; a download goes to a temporary name
and is moved into place only when its hash matches), but unlike torchvision's ``get_state_dict``,
which calls the hub loader with ``weights_only=False``, the file is never unpickled, and its
sha256 is checked against the prefix in its name (``resnet101-cd907fc2.pth``) on every load, not
only right after a download: a cached file that was swapped or cut short is refused too.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import posixpath
import re
from urllib.parse import urlparse

import torch

from ..archive import storage
from ..errors import CheckpointError, InputError, one_line

# torch.hub's HASH_REGEX is r"-([a-f0-9]*)\." (any length, even none); torchvision's names carry
# 8 hex digits. Asking for 8 or more keeps a local "resnet-1.pth" from reading as hash prefix "1".
HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")


def load_state_file(uri: str) -> dict:
    """A torch file that may come from anywhere -> its plain dict, refusing pickled code."""
    return load_state_file_bytes(read_file(uri), uri)


def load_state_file_bytes(data: bytes, uri: str) -> dict:
    """The bytes of a torch file -> its plain dict, refusing pickled code."""
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
        raise CheckpointError.not_a_file(uri, folder=False) from None
    except IsADirectoryError:
        raise CheckpointError.not_a_file(uri, folder=True) from None


# ---------------------------------------------------------------- ImageNet-style weights files

def hash_prefix(name: str) -> str | None:
    """The sha256 prefix a torchvision-style file name promises: resnet18-f37072fd.pth -> f37072fd."""
    m = HASH_IN_NAME.search(posixpath.basename(str(name)))
    return m.group(1) if m else None


def check_hash(data: bytes, uri: str) -> None:
    """torch.hub's check_hash rule: the file's sha256 must start with the prefix in its name.
    A name without one (a user's own ``my_resnet.pth``) promises nothing and is not checked."""
    prefix = hash_prefix(uri)
    if prefix is None:
        return
    digest = hashlib.sha256(data).hexdigest()
    if not digest.startswith(prefix):
        raise CheckpointError(
            f"Refusing to load {uri}: its sha256 starts {digest[:len(prefix)]}, but its name promises {prefix}"
            " (a partial download or a different file). Delete it and fetch it again.")


def load_weights_file(uri: str) -> dict:
    """A state-dict file (local path or URI) -> dict, hash-checked when its name carries a hash."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise InputError(f"Weights file not found: {uri}") from None
    except IsADirectoryError:
        raise InputError(f"{uri} is a folder; pass the state-dict file (e.g. resnet101-cd907fc2.pth).") from None
    check_hash(data, uri)
    return load_state_file_bytes(data, uri)


def cache_path(url: str) -> str:
    """Where torch.hub keeps the file of ``url``: <torch.hub.get_dir()>/checkpoints/<its name>."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", posixpath.basename(urlparse(url).path))


def fetch(url: str) -> str:
    """The cached file of ``url``, downloaded first when missing (to a temporary name, moved into
    place only when its sha256 matches the name's prefix: torch.hub's own download routine)."""
    path = cache_path(url)
    if os.path.exists(path):
        return path
    prefix = hash_prefix(path)
    if prefix is None:
        raise InputError(f"{url} names no sha256 prefix to check a download against; pass --weights FILE.")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, path, prefix, progress=False)
    except Exception as e:  # offline (URLError), refused, or a hash mismatch (RuntimeError)
        raise InputError(
            f"Could not download {url} ({type(e).__name__}: {one_line(e, 120)}). Put that file at"
            f" {path}, or pass --weights FILE or --weights none.") from None
    return path


def imagenet_state(url: str) -> dict:
    """torchvision's ImageNet state dict at ``url``: cached or downloaded, hash-checked, never unpickled."""
    return load_weights_file(fetch(url))
