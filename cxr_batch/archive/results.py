"""Where results land: the Parquet part files, their schema, resume bookkeeping, and CAM paths.

Rows are written by the driver in part files of a few thousand rows, each published atomically
(temp name + fsync + rename + fsync of the folder, or one S3 PUT), so a job killed at any moment,
or a machine that loses power, leaves only whole parts. A re-run reads the ``path`` column of the
parts already there and scores only the rest.

A part that is not Parquet any more (empty or truncated: a disk fault, a copy cut short) is
"damaged": readers skip it and say so, and a scoring run sets it aside under a hidden name
(``set_aside``), so that its files are scored again.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import unicodedata
import uuid
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage
from ..errors import InputError

SCHEMA = pa.schema([
    ("path", pa.string()),  # relative to the archive root, POSIX
    ("label", pa.string()),  # NORMAL / PNEUMONIA from a folder on the path, else null
    ("pred", pa.string()),  # class name; null when the file could not be scored
    ("prob_pneumonia", pa.float32()),
    ("threshold", pa.float32()),  # pred is PNEUMONIA when prob_pneumonia >= threshold
    ("logit_pneumonia", pa.float32()),  # log-odds logit_PNEUMONIA - logit_NORMAL, before the temperature
    ("temperature", pa.float32()),  # prob_pneumonia = sigmoid(logit_pneumonia / temperature); 1 = uncalibrated
    ("cam_path", pa.string()),
    ("cam_peak_x", pa.float32()),  # centre of the CAM's hot spot (model.cam.hot_spot), fraction of the width (0 = left)
    ("cam_peak_y", pa.float32()),  # ... and of the height (0 = top)
    ("cam_max", pa.float32()),  # the map's maximum in its own units (logits; cam.log_odds_map), before any display scaling
    # The out-of-distribution check (model/ood.py): distance of the image's features from the training
    # images'; NaN where not computed (--ood off, a model without the statistics, a file never decoded).
    ("ood_score", pa.float32()),
    ("out_of_scope", pa.bool_()),  # ood_score above the model's OOD threshold (status out_of_scope, or flagged by --ood flag)
    ("width", pa.int32()),  # the file's own pixel size
    ("height", pa.int32()),
    ("format", pa.string()),
    ("bytes", pa.int64()),
    ("sha256", pa.string()),
    ("modality", pa.string()),  # DICOM only
    ("view_position", pa.string()),
    ("sop_instance_uid", pa.string()),
    ("model", pa.string()),
    ("error", pa.string()),  # null when scored; else one line saying what is wrong
    ("status", pa.string()),  # one of STATUSES; null in tables written before it existed (read as done)
])

# What a row's file came to. "retry" rows are the environment's fault (an I/O error, a vanished
# file, no space, out of memory): a re-run scores those files again and its rows replace these.
SCORED, ERROR, SKIPPED, RETRY = "scored", "error", "skipped", "retry"
# Decoded, but it does not look like what the model was trained on (the OOD check): no prediction, no
# CAM. Done, like "skipped": a re-run does not score it again.
OUT_OF_SCOPE = "out_of_scope"
STATUSES = (SCORED, ERROR, SKIPPED, RETRY, OUT_OF_SCOPE)

# The string columns, as the scoring stages carry them (None, never NaN; see score_stages._strings).
TEXT_COLUMNS = tuple(f.name for f in SCHEMA if pa.types.is_string(f.type))

# Sequence numbers are zero-padded to 5 digits for a readable sort, and grow past 99999 (200 M rows
# of 2,000): the pattern takes any length, or a 6-digit part would be ignored and its files rescored.
_PART = re.compile(r"^part-[0-9a-f]{8}-\d{5,}\.parquet$")
# A damaged part's new name: the leading "_" hides it from Parquet readers (pyarrow, pandas, duckdb
# skip such files in a folder) and from ``part_files``; --overwrite deletes it with our other files.
DAMAGED_PREFIX = "_cxr_batch_damaged-"


class PartWriter:
    """Collects row tables and publishes them as ``part-<run>-<seq>.parquet`` files."""

    def __init__(self, out: str, metadata: dict, rows_per_part: int = 2000, *, run: str | None = None,
                 before_publish=None):
        self.out, self.rows_per_part = out, rows_per_part
        self.run = run or uuid.uuid4().hex[:8]
        self.before_publish = before_publish  # e.g. Lease.check: a run that lost --out must not publish
        self.seq, self.rows, self.pending = 0, 0, []  # rows: pending rows, not yet published
        self.schema = SCHEMA.with_metadata({b"cxr_batch": json.dumps(metadata, default=str).encode()})
        storage.makedirs(out)

    def add(self, table: pa.Table) -> None:
        self.pending.append(table.select(SCHEMA.names).cast(SCHEMA))
        self.rows += table.num_rows
        if self.rows >= self.rows_per_part:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        table = pa.concat_tables(self.pending).replace_schema_metadata(self.schema.metadata)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        storage.write_bytes_atomic(storage.join(self.out, f"part-{self.run}-{self.seq:05d}.parquet"), buf.getvalue(),
                                   durable=True, before_rename=self.before_publish)
        self.seq += 1
        self.pending, self.rows = [], 0


def part_files(out: str) -> list[str]:
    return sorted(storage.join(out, n) for n in storage.list_dir(out) if _PART.match(n))


class _Damaged(Exception):
    pass


def read_part(part: str, read):
    """``read(pyarrow.parquet.ParquetFile)`` on one part; None when the part is damaged (not Parquet:
    empty, truncated). A storage error (OSError) is not damage: it is raised, and a re-run tries again."""
    fs, path = storage.resolve(part)
    with fs.open_input_file(path) as f:
        try:
            pf = pq.ParquetFile(f)
        except pa.ArrowException as e:
            if isinstance(e, OSError):
                raise
            return None
        return read(pf)


def set_aside(parts: list) -> list[str]:
    """Rename damaged parts to DAMAGED_PREFIX + their name (hidden, kept for a person to look at);
    -> the new names."""
    names = []
    for part in parts:
        name = DAMAGED_PREFIX + posixpath.basename(part)
        storage.rename(part, storage.join(posixpath.dirname(part), name))
        names.append(name)
    return names


def damaged_note(names: list, what: str) -> str:
    """One line for the user about damaged parts (``what``: what was done with them)."""
    shown = ", ".join(names[:3]) + (f", ... ({len(names):,} in all)" if len(names) > 3 else "")
    return f"{len(names):,} damaged part files (not Parquet: empty or truncated) {what}: {shown}"


def done_path_batches(out: str, model_id: str, *, archive: str | None = None, batch_rows: int = 1 << 20,
                      retry_parts: list | None = None, damaged: list | None = None) -> Iterator[pa.Array]:
    """Paths that are done in ``out`` (a row whose status is not "retry"), as Arrow string arrays of
    about ``batch_rows`` paths (10 M done paths never sit in memory at once, nor as 10 M Python
    objects); refuses to mix two models' or two archives' rows in one table. The parts that hold
    "retry" rows are appended to ``retry_parts``: ``drop_retry_rows`` then opens only those. Damaged
    parts hold nothing done: they are appended to ``damaged`` (for ``set_aside``)."""
    done, rows = [], 0
    for part in part_files(out):
        table = read_part(part, lambda pf: _done_keys(pf, out, model_id, archive))
        if table is None:
            if damaged is not None:
                damaged.append(part)
            continue
        if "status" in table.column_names:
            retry = pc.fill_null(pc.equal(table["status"], RETRY), False)
            if retry_parts is not None and pc.any(retry).as_py():
                retry_parts.append(part)
            table = table.filter(pc.invert(retry))
        chunks = table.column("path").chunks
        done += chunks
        rows += sum(len(c) for c in chunks)
        if rows >= batch_rows:
            yield pa.concat_arrays(done)
            done, rows = [], 0
    if done:
        yield pa.concat_arrays(done)


def _done_keys(pf: pq.ParquetFile, out: str, model_id: str, archive: str | None) -> pa.Table:
    _check_same_job(out, json.loads((pf.schema_arrow.metadata or {}).get(b"cxr_batch", b"{}")), model_id, archive)
    return pf.read(columns=[c for c in ("path", "status") if c in pf.schema_arrow.names])


def _check_same_job(out: str, meta: dict, model_id: str, archive: str | None) -> None:
    """Resume is bound to the model and to the archive: the same relative path in another archive
    is another file, and must not be skipped as done."""
    if meta.get("model_id") not in (None, model_id):
        raise InputError(f"{out} already holds results of model {meta.get('model_id')}, not {model_id}:"
                         " pass --overwrite to start over, or a new --out.")
    theirs = (meta.get("settings") or {}).get("archive")
    if archive and theirs and theirs.rstrip("/") != archive.rstrip("/"):
        raise InputError(f"{out} already holds results of archive {theirs}, not {archive}: pass --overwrite"
                         " to start over, or a new --out.")


def drop_retry_rows(out: str, paths: pa.Array, *, parts: list | None = None, before_publish=None) -> int:
    """Rewrite each part that holds "retry" rows for any of ``paths`` without those rows (the new
    part replaces the old one atomically, under the same name), so that when those files are
    scored again no reader sees two rows for one file. ``parts``: the only parts that can hold
    such rows (``done_path_batches``'s ``retry_parts``); default every part. -> the number of rows dropped."""
    dropped = 0
    for part in part_files(out) if parts is None else parts:
        n, table = read_part(part, lambda pf: _without_retry_rows(pf, paths)) or (0, None)
        if not n:
            continue
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        storage.write_bytes_atomic(part, buf.getvalue(), durable=True, before_rename=before_publish)
        dropped += n
    return dropped


def _without_retry_rows(pf: pq.ParquetFile, paths: pa.Array) -> tuple[int, pa.Table | None]:
    """(rows dropped, the part's table without its "retry" rows for ``paths``); (0, None) when none."""
    if "status" not in pf.schema_arrow.names:
        return 0, None
    keys = pf.read(columns=["path", "status"])
    drop = pc.and_(pc.fill_null(pc.equal(keys["status"], RETRY), False), pc.is_in(keys["path"], value_set=paths))
    n = pc.sum(drop).as_py() or 0
    return (n, pf.read().filter(pc.invert(drop))) if n else (0, None)


def pending(files: pa.Table, done: Iterable[pa.Array]) -> pa.Table:
    """The rows of a listing whose path is in none of the ``done`` arrays (an anti-join, one batch
    of done paths at a time; order kept)."""
    for paths in done:
        if len(paths) and files.num_rows:
            files = files.filter(pc.invert(pc.is_in(files["path"], value_set=paths)))
    return files


def read_metadata(out: str) -> dict:
    """The ``cxr_batch`` metadata of the first readable part; {} when there is none."""
    for part in part_files(out):
        meta = read_part(part, lambda pf: json.loads(pf.schema_arrow.metadata[b"cxr_batch"]))
        if meta is not None:
            return meta
    return {}


def read_table(out: str, *, damaged: list | None = None) -> pa.Table:
    """Every readable part as one table; damaged parts are skipped (and appended to ``damaged``)."""
    tables = []
    for part in part_files(out):
        table = read_part(part, lambda pf: pf.read())
        if table is None:
            if damaged is not None:
                damaged.append(part)
            continue
        tables.append(table)
    if not tables:
        return SCHEMA.empty_table()
    # Parts written before a column was added lack it: those rows read as null there.
    return pa.concat_tables(tables, promote_options="default")


def safe_relpath(rel: str) -> str:
    """An input's relative path -> a relative POSIX path that cannot leave the folder it is joined to.

    Drops empty, ".", ".." and drive components, turns backslashes into separators, replaces control
    characters, and keeps unicode and spaces (they are legal names). Never returns an empty path.
    """
    rel = unicodedata.normalize("NFC", rel.replace("\\", "/"))
    parts = []
    for p in rel.split("/"):
        p = re.sub(r"[\x00-\x1f\x7f]", "_", p).strip()
        if p in ("", ".", "..") or re.fullmatch(r"[A-Za-z]:", p):
            continue
        # Most filesystems cap a name at 255 bytes, not characters; leave room for cam_uri's suffixes.
        parts.append(p.encode("utf-8", "replace")[:200].decode("utf-8", "ignore"))
    return posixpath.join(*parts) if parts else "_"


def default_cam_dir(out: str) -> str:
    """Where the CAMs of the output ``out`` go unless told: ``<out without .parquet>-cams`` beside it
    (one rule for the scoring job and the report that looks them up)."""
    base = out.rstrip("/")
    stem = base[: -len(".parquet")] if base.endswith(".parquet") else base
    return stem + "-cams"


def cam_uri(cam_dir: str, rel: str) -> str:
    safe = safe_relpath(rel)
    if safe != rel:
        # Sanitising can map two inputs onto one name (a\..\b.png and a/b.png, NFD and NFC
        # spellings, long names cut alike): a hash of the original keeps each image's PNG its own.
        safe += "~" + hashlib.sha256(rel.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return storage.join(cam_dir, *(safe + ".png").split("/"))
