"""Where a table's predictions came from: the model and run recorded in its Parquet metadata, and
what the checkpoint itself says about its training (data, epochs, validation, threshold rule).

The checkpoint is read for its small entries only, and without torch: importing torch alone costs
~740 MB of memory and seconds, three times what the rest of a report of a million rows needs. A
checkpoint is a zip whose ``data.pkl`` holds the dict; a restricted unpickler reads it with every
tensor replaced by a placeholder and refuses any global that is not a tensor, a storage or an
OrderedDict (nothing in the file can run). Files in another layout go through the checked loader.
Its hash is compared with the model id in the table, so the page says whether the file at that
path is still the one that scored.
"""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
import zipfile

from ...archive import storage
from ...errors import CxrError

# Checkpoint entries that are weights or bookkeeping, not provenance.
_SKIP = {"state_dict", "optimizer", "format", "version", "classes", "history"}


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


def _load_small(uri: str) -> tuple[dict, str]:
    """(checkpoint dict without its weights, model id). Only data.pkl is read whole; the rest streams
    through the hash, so a 325 MB checkpoint costs a few MB of memory."""
    fs, path = storage.resolve(uri)
    try:
        with fs.open_input_file(path) as f:
            ck = read_small_entries(f)
    except (zipfile.BadZipFile, StopIteration, pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError):
        from ...model.checkpoint import load_checkpoint  # a legacy or foreign file: the checked loader says what it is

        loaded = load_checkpoint(uri)
        return loaded.ckpt, loaded.model_id
    return ck, _sha16(fs, path)


def checkpoint_facts(uri: str, expected_id: str | None = None) -> dict:
    """What the checkpoint at ``uri`` says about itself; {"error": ...} when it cannot be read."""
    try:
        ck, model_id = _load_small(uri)
    except FileNotFoundError:
        return {"uri": uri, "error": f"not found: {uri}"}
    except (CxrError, OSError) as e:
        return {"uri": uri, "error": str(e).splitlines()[0][:300] if str(e) else type(e).__name__}
    facts = {k: v for k, v in ck.items() if k not in _SKIP and not hasattr(v, "shape")}
    history = ck.get("history") or []
    facts.update(uri=uri, model_id=model_id, epochs_trained=len(history),
                 same_file=None if expected_id is None else model_id == expected_id)
    for k, v in list(facts.items()):
        if isinstance(v, (list, tuple)) and len(v) > 20:  # e.g. the validation file list: its size, not its names
            facts[k] = f"{len(v):,} entries"
    return facts


def provenance(meta: dict) -> dict:
    """The table's metadata -> {"model": ..., "settings": ..., "checkpoint": facts or None, ...}."""
    model = dict(meta.get("model") or {})
    spec = model.get("spec") or (meta.get("settings") or {}).get("model")
    checkpoint = None
    if model.get("trained") and spec:
        checkpoint = checkpoint_facts(spec, meta.get("model_id"))
    return {"model": model, "model_id": meta.get("model_id"), "settings": meta.get("settings") or {},
            "started": meta.get("started"), "checkpoint": checkpoint}
