"""Where a table's predictions came from: the model and run recorded in its Parquet metadata, and
what the checkpoint itself says about its training (data, epochs, validation, threshold rule).

The checkpoint is read for its small entries only, and without torch (model/entries.py): importing
torch alone costs ~740 MB of memory and seconds, three times what the rest of a report of a million
rows needs. Its hash is compared with the model id in the table, so the page says whether the file at that
path is still the one that scored.
"""

from __future__ import annotations

from ...errors import CxrError
from ...model.entries import checkpoint_entries

# Checkpoint entries that are weights or bookkeeping, not provenance.
_SKIP = {"state_dict", "optimizer", "format", "version", "classes", "history"}


def checkpoint_facts(uri: str, expected_id: str | None = None) -> dict:
    """What the checkpoint at ``uri`` says about itself; {"error": ...} when it cannot be read."""
    try:
        ck, model_id = checkpoint_entries(uri)
    except FileNotFoundError:
        return {"uri": uri, "error": f"not found: {uri}"}
    except (CxrError, OSError) as e:
        return {"uri": uri, "error": str(e).splitlines()[0][:300] if str(e) else type(e).__name__}
    facts = {k: v for k, v in ck.items() if k not in _SKIP and not hasattr(v, "shape")}
    if isinstance(facts.get("ood"), dict):  # its means and precision are weights: the threshold says what it does
        o = facts["ood"]
        facts["ood"] = (f"threshold {o.get('threshold'):.4g} on ood_score: the {o.get('percentile'):g}th percentile of"
                        f" {o.get('n_val')} validation images (fitted on {o.get('n_train')} training images)")
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
