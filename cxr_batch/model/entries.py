"""A checkpoint's small entries (arch, threshold, settings, history, ...) and its id, without torch and
without reading its weights into memory.

Importing torch alone costs ~740 MB of memory and seconds; a driver that only needs to know what a
checkpoint says (a report, evaluate after scoring, a training re-run checking what it would resume)
should not pay that, nor hold a 170 MB file. A checkpoint is a zip whose ``data.pkl`` holds the
dict; a restricted unpickler reads it with every tensor replaced by a placeholder and refuses any
global that is not a tensor, a storage or an OrderedDict (nothing in the file can run). Files in
another layout go through the checked loader (model.weights, ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
import zipfile

import pyarrow.fs as pafs

from .. import CLASSES
from ..archive import storage
from ..errors import CheckpointError
from .archs import ARCHS

FORMAT = "cxr-batch-checkpoint"


def check_format(ckpt: dict, uri: str) -> None:
    """Refuse a file that is a torch checkpoint but not ours (its entries would mean nothing here)."""
    if ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{uri} is not a cxr-batch checkpoint (no format={FORMAT!r} entry); train one with"
            " `cxr-batch train`, or pass ARCH:WEIGHTS such as resnet101:imagenet."
        )


def check_model(ckpt: dict, uri: str) -> None:
    """Refuse a checkpoint of ours whose network this version does not build (arch, classes)."""
    if ckpt.get("arch") not in ARCHS or list(ckpt.get("classes", [])) != list(CLASSES):
        raise CheckpointError(f"{uri}: unsupported arch {ckpt.get('arch')!r} or classes {ckpt.get('classes')!r}.")


class _Weights:
    """Stands for a tensor or storage that the report does not need."""

    def __init__(self, *args, **kwargs):
        pass


class _SmallEntries(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module.split(".")[0] == "torch" and (name.endswith("Storage") or name.startswith("_rebuild_")):
            return _Weights
        raise pickle.UnpicklingError(f"refusing global {module}.{name}")

    def persistent_load(self, pid):
        return _Weights()


def read_small_entries(f) -> dict:
    """A torch checkpoint (a seekable file) -> its dict with the tensors left out; raises on anything else."""
    with zipfile.ZipFile(f) as z:
        name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        obj = _SmallEntries(io.BytesIO(z.read(name))).load()
    if not isinstance(obj, dict):
        raise pickle.UnpicklingError(f"a {type(obj).__name__}, not a dict")
    return {k: v for k, v in obj.items() if not isinstance(v, _Weights)}


def _sha16(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def checkpoint_entries(uri: str, *, with_id: bool = True) -> tuple[dict, str | None]:
    """(checkpoint dict without its weights, model id). Only data.pkl is read whole; the rest streams
    through the hash, so a 325 MB checkpoint costs a few MB of memory; ``with_id=False`` skips the
    hash (id None) for a caller that only reads the entries. A file that is not a cxr-batch
    checkpoint is a CheckpointError, as with load_checkpoint."""
    fs, path = storage.resolve(uri)
    kind = fs.get_file_info(path).type
    if kind in (pafs.FileType.NotFound, pafs.FileType.Directory):
        raise CheckpointError.not_a_file(uri, folder=kind == pafs.FileType.Directory)
    try:
        with fs.open_input_file(path) as f:
            ck = read_small_entries(f)
    except (zipfile.BadZipFile, StopIteration, pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError):
        from .weights import load_state_file_bytes, read_file  # a legacy or foreign file: the checked loader says what it is

        data = read_file(uri)
        ck = load_state_file_bytes(data, uri)
        check_format(ck, uri)
        return ck, hashlib.sha256(data).hexdigest()[:16]
    check_format(ck, uri)
    return ck, _sha16(fs, path) if with_id else None
