"""Where a table's predictions came from: the model and run recorded in its Parquet metadata, and
what the checkpoint itself says about its training (data, epochs, validation, threshold rule).

The checkpoint is read only for its small entries: a local file is memory-mapped (a 325 MB
ResNet-101 checkpoint costs no memory and ~0.1 s), and its hash is compared with the model id in
the table, so the page says whether the file at that path is still the one that scored.
"""

from __future__ import annotations

import hashlib
import os

from . import storage
from .errors import CxrError

# Checkpoint entries that are weights or bookkeeping, not provenance.
_SKIP = {"state_dict", "optimizer", "format", "version", "classes", "history"}


def _sha16(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _load_small(uri: str) -> tuple[dict, str]:
    """(checkpoint dict, model id) without reading the weights into memory when the file is local."""
    if not storage.is_uri(uri) and os.path.isfile(uri):
        import torch

        try:
            ck = torch.load(uri, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # an old-format or foreign file: the checked loader says what is wrong
            from .checkpoint import load_checkpoint

            loaded = load_checkpoint(uri)
            return loaded.ckpt, loaded.model_id
        if not isinstance(ck, dict):
            raise CxrError(f"{uri} holds a {type(ck).__name__}, not a checkpoint dict.")
        return ck, _sha16(uri)
    from .checkpoint import load_checkpoint

    loaded = load_checkpoint(uri)
    return loaded.ckpt, loaded.model_id


def checkpoint_facts(uri: str, expected_id: str | None = None) -> dict:
    """What the checkpoint at ``uri`` says about itself; {"error": ...} when it cannot be read."""
    try:
        ck, model_id = _load_small(uri)
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
