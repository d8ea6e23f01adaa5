"""A results table -> the numbers a report shows, in one streaming pass with bounded memory.

The table can hold 10^7 rows, so no row ever becomes a Python object: record batches stream from
the Parquet parts (only the columns a report needs), each batch is reduced with pyarrow compute
to small partial aggregates (counts, a histogram, per-folder sums, per-message error groups,
top-k candidates for the galleries), and the partials are merged as they come. Memory is a few
batches plus the aggregates, whatever the table's size; the only thing that grows with the data
is the number of distinct folders and error messages, and both are capped.

Tables written before the ``status`` column existed are read as: error null -> scored, else a
permanent error; their retryable count is unknown (None), not zero.
"""

from __future__ import annotations

import re
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ... import CLASSES, POSITIVE
from ...archive import storage
from ...errors import InputError
from ...archive.results import part_files, read_metadata, read_part
from ..metrics import bin_index

COLUMNS = ("path", "label", "pred", "prob_pneumonia", "threshold", "cam_path", "error", "status", "ood_score")
GALLERY_COLUMNS = ("path", "label", "pred", "prob_pneumonia", "threshold", "cam_path", "ood_score")
MAX_AUTO_DEPTH = 3  # the report picks the shallowest level down to this with 2+ folders
# Folders tracked per level: an archive of one folder per study has a million at depth 2 or 3,
# and a table of them is neither readable nor small; a level past the cap is left out.
MAX_FOLDERS_AUTO = 20_000
MAX_FOLDERS = 200_000  # with an explicit --folder-depth: past this, ask for a shallower one
MAX_ERROR_GROUPS = 2000  # distinct normalised messages kept; the rest are counted as "other messages"
EXAMPLES_PER_ERROR = 3
BATCH_ROWS = 65_536  # rows reduced at once: large enough that per-batch overhead is small

# The variable parts of an error message, so that one cause is one group. RE2 syntax (pyarrow).
_NORMALISE = [
    (r"'[^']*'", "'…'"),
    (r'"[^"]*"', '"…"'),
    (r"(?:[A-Za-z][A-Za-z0-9+.-]*:)?(?:/[^\s/'\"():,]+){2,}/?", "…/…"),  # paths and URIs
    (r"\b0x[0-9A-Fa-f]+\b", "0x…"),
    (r"\b[0-9a-fA-F]{12,}\b", "…"),  # hashes, UIDs
    (r"\b\d+x\d+\b", "NxN"),  # image sizes
    (r"\b\d+(?:[.,]\d+)*\b", "N"),  # numbers, also 1,234,567 and 1.2.840.10008 (DICOM UIDs)
]


_GALLERY_KEYS = {"prob": ("prob_pneumonia", "descending"), "margin": ("margin", "ascending"),
                 "wrong": ("margin", "descending"), "ood": ("ood_score", "descending")}


@dataclass(frozen=True)
class GallerySpec:
    name: str
    key: str  # "prob": highest P first; "margin": closest to the threshold first; "wrong": most confident errors;
    # "ood": the out-of-scope rows farthest from the training images (highest ood_score) first
    k: int


@dataclass
class ErrorGroup:
    message: str  # normalised: the variable parts replaced
    status: str  # "error" (permanent) or "retry" (transient) or another status value
    count: int
    example_message: str
    examples: list[str]


@dataclass
class Aggregate:
    """Everything a report shows about a results table."""

    files: int = 0
    status_counts: dict = field(default_factory=dict)  # status -> rows
    has_status: bool = False  # False: an older table; retryable failures were not recorded
    flagged: int = 0
    bins: np.ndarray = field(default_factory=lambda: np.zeros(0))  # bin edges on [0, 1]
    hist: dict = field(default_factory=dict)  # label ("" = unlabelled) -> counts per bin (scored rows)
    by_label: dict = field(default_factory=dict)  # label -> {"scored": n, "flagged": n}
    threshold: tuple | None = None  # (min, max) of the threshold column over scored rows
    folder_depth: int = 1
    folders: pa.Table | None = None  # folder, files, scored, errors, retry, flagged, prob_sum
    folder_count: int = 0
    too_many_folders: list = field(default_factory=list)  # levels left out: more than MAX_FOLDERS_AUTO folders
    errors: list[ErrorGroup] = field(default_factory=list)
    other_error_rows: int = 0  # rows whose message did not fit in MAX_ERROR_GROUPS groups
    galleries: dict = field(default_factory=dict)  # name -> pa.Table of GALLERY_COLUMNS (+ margin)
    parts: int = 0
    damaged: list = field(default_factory=list)  # names of damaged parts, skipped (results.read_part)
    runs: int = 0

    def count(self, status: str) -> int:
        return int(self.status_counts.get(status, 0))

    @property
    def scored(self) -> int:
        return self.count("scored")

    @property
    def retry(self) -> int | None:
        return self.count("retry") if self.has_status else None

    @property
    def other_statuses(self) -> dict:
        return {k: v for k, v in self.status_counts.items() if k not in ("scored", "error", "retry", "skipped")}


# ---------------------------------------------------------------- reading

def _first_schema(parts) -> pa.Schema | None:
    """The schema of the first part in ``parts`` that is not damaged."""
    for part in parts:
        schema = read_part(part, lambda pf: pf.schema_arrow)
        if schema is not None:
            return schema
    return None


def open_results(results: str) -> tuple[list[str], pa.Schema]:
    """The part files of a ``cxr-batch score`` output (local or s3://) and the schema they share."""
    parts = part_files(results)
    # Columns are only ever added: the newest part knows every column, and older parts read as null there.
    schemas = [x for x in (_first_schema(parts), _first_schema(reversed(parts))) if x is not None]
    if not schemas:
        hint = " (it is a file: pass the output folder of `cxr-batch score`)" if storage.exists(results) and not storage.is_dir(results) else ""
        hint = hint or (" (only damaged parts: re-run `cxr-batch score`)" if parts else "")
        raise InputError(f"No results under {results}{hint}: expected part-*.parquet files written by `cxr-batch score`.")
    return parts, pa.unify_schemas(schemas, promote_options="permissive")


def _read_part(part: str, schema: pa.Schema) -> pa.Table | None:
    """One part in ``schema``; None when it is damaged."""
    t = read_part(part, lambda pf: pf.read(columns=[c for c in schema.names if c in pf.schema_arrow.names]))
    if t is None:
        return None
    for name in schema.names:
        if name not in t.column_names:  # a part from before the column existed
            t = t.append_column(schema.field(name), pa.nulls(t.num_rows, schema.field(name).type))
    return t.select(schema.names).cast(schema)


def _batches(parts: list[str], schema: pa.Schema, rows: int, threads: int = 4, damaged: list | None = None):
    """Tables of about ``rows`` rows, read from the parts in order by a few threads (object stores
    answer each GET in tens of ms); at most ``2 * threads`` parts are in flight, so memory stays flat.
    Damaged parts are skipped and appended to ``damaged``."""
    pending, n = [], 0
    damaged = [] if damaged is None else damaged
    with ThreadPoolExecutor(threads) as pool:
        window: deque = deque()
        for part in parts:
            window.append((part, pool.submit(_read_part, part, schema)))
            if len(window) < 2 * threads:
                continue
            name, t = window.popleft()
            if t.result() is None:
                damaged.append(name)
                continue
            pending.append(t.result())
            n += pending[-1].num_rows
            if n >= rows:
                yield pa.concat_tables(pending)
                pending, n = [], 0
        for name, t in window:
            if t.result() is None:
                damaged.append(name)
            else:
                pending.append(t.result())
    if pending:
        yield pa.concat_tables(pending)


# ---------------------------------------------------------------- per-batch reductions

@dataclass
class _Status:
    """Each row's status as masks (a string column per row would cost more than all the rest)."""

    scored: pa.Array
    error: pa.Array
    retry: pa.Array
    column: pa.Array | None  # the status strings, only where the table has them


def _status(t: pa.Table) -> _Status:
    failed = pc.is_valid(t["error"])
    if "status" not in t.column_names or t["status"].null_count == t.num_rows:
        return _Status(pc.invert(failed), failed, pa.repeat(False, t.num_rows), None)
    column = pc.coalesce(t["status"], pc.if_else(failed, "error", "scored"))
    return _Status(pc.equal(column, "scored"), pc.equal(column, "error"), pc.equal(column, "retry"), column)


def folder_of(paths, depth: int) -> pa.Array:
    """The first ``depth`` folders of each relative path ("" for a file at the top level)."""
    m = pc.extract_regex(paths, rf"^(?P<folder>(?:[^/]*/){{0,{int(depth)}}})")
    return pc.utf8_rtrim(pc.struct_field(m, "folder"), characters="/")


def normalise_errors(messages) -> pa.Array:
    for pattern, repl in _NORMALISE:
        messages = pc.replace_substring_regex(messages, pattern, repl)
    return messages


def _histogram(p: np.ndarray, edges: np.ndarray) -> np.ndarray:
    n = len(edges) - 1
    return np.bincount(bin_index(p, n), minlength=n)


class Aggregator:
    """Feed it batches (pyarrow Tables with the columns in COLUMNS that exist); read ``result``."""

    def __init__(self, *, depth: int | None, galleries: list[GallerySpec], bins: int = 50):
        self.depth = depth
        self.specs = galleries
        self.a = Aggregate(bins=np.linspace(0, 1, bins + 1))
        levels = [depth] if depth else range(1, MAX_AUTO_DEPTH + 1)
        self._folders = [_FolderSums(d, MAX_FOLDERS if depth else MAX_FOLDERS_AUTO) for d in levels]
        self._errors: dict[tuple[str, str], list] = {}
        self._tmin, self._tmax = np.inf, -np.inf

    def add(self, t: pa.Table) -> None:
        a = self.a
        a.files += t.num_rows
        a.has_status = a.has_status or "status" in t.column_names
        st = _status(t)
        if st.column is None:
            counts = {"scored": pc.sum(st.scored).as_py() or 0, "error": pc.sum(st.error).as_py() or 0}
        else:
            counts = {v["values"]: v["counts"] for v in pc.value_counts(st.column).to_pylist()}
        for k, n in counts.items():
            a.status_counts[k] = a.status_counts.get(k, 0) + n
        flagged = pc.and_(st.scored, pc.equal(t["pred"], CLASSES[POSITIVE])).fill_null(False)
        a.flagged += pc.sum(flagged).as_py() or 0
        self._add_scored(t.filter(st.scored), flagged.filter(st.scored))
        if st.column is not None and "ood_score" in t.column_names:
            out_of_scope = pc.equal(st.column, "out_of_scope").fill_null(False)
            if pc.any(out_of_scope).as_py():
                self._add_galleries(t.filter(out_of_scope), ood=True)
        self._add_folders(t, st, flagged)
        failed = pc.invert(st.scored)
        self._add_errors(t.filter(failed), None if st.column is None else st.column.filter(failed))

    def _add_scored(self, s: pa.Table, flagged: pa.Array) -> None:
        if not s.num_rows:
            return
        a = self.a
        p = s["prob_pneumonia"].to_numpy(zero_copy_only=False).astype(np.float64)
        labels = s["label"].fill_null("")
        for label in pc.unique(labels).to_pylist():
            mask = pc.equal(labels, label)
            counts = _histogram(p[mask.to_numpy(zero_copy_only=False)], a.bins)
            a.hist[label] = a.hist.get(label, 0) + counts
            d = a.by_label.setdefault(label, {"scored": 0, "flagged": 0})
            d["scored"] += int(counts.sum())
            d["flagged"] += pc.sum(flagged.filter(mask)).as_py() or 0
        thr = s["threshold"]
        self._tmin = min(self._tmin, pc.min(thr).as_py() if thr.null_count < len(thr) else np.inf)
        self._tmax = max(self._tmax, pc.max(thr).as_py() if thr.null_count < len(thr) else -np.inf)
        self._add_galleries(s)

    def _add_galleries(self, s: pa.Table, ood: bool = False) -> None:
        """Top-k candidates of each gallery: of the scored rows ``s``, or with ``ood`` of the out-of-scope ones."""
        cols = [c for c in GALLERY_COLUMNS if c in s.column_names]
        g = s.select(cols).append_column("margin", pc.abs(pc.subtract(s["prob_pneumonia"], s["threshold"])))
        for spec in self.specs:
            if (spec.key == "ood") != ood:
                continue
            column, order = _GALLERY_KEYS[spec.key]
            keep = pc.is_valid(g[column])
            if spec.key == "wrong":
                keep = pc.and_(keep, pc.and_(pc.is_valid(g["label"]), pc.not_equal(g["label"], g["pred"])).fill_null(False))
            old = self.a.galleries.get(spec.name)
            if old is not None and old.num_rows >= spec.k > 0:
                # Only rows that can enter the top k: most batches then hand on none.
                worst = (pc.min if order == "descending" else pc.max)(old[column])
                keep = pc.and_(keep, (pc.greater_equal if order == "descending" else pc.less_equal)(g[column], worst))
            cand = g.filter(keep)
            if old is not None:
                cand = pa.concat_tables([old, cand])
            k = min(spec.k, cand.num_rows)
            idx = pc.select_k_unstable(cand, k, sort_keys=[(column, order), ("path", "ascending")]) if k else []
            self.a.galleries[spec.name] = cand.take(idx)

    def _add_folders(self, t: pa.Table, st: _Status, flagged: pa.Array) -> None:
        prob = pc.if_else(st.scored, t["prob_pneumonia"].cast(pa.float64()), 0.0)
        sums = pa.table({
            "files": pa.array(np.ones(t.num_rows, np.int64)), "scored": st.scored.cast(pa.int64()),
            "errors": st.error.cast(pa.int64()), "retry": st.retry.cast(pa.int64()),
            "flagged": flagged.cast(pa.int64()), "prob_sum": prob.fill_null(0.0),
        })
        for level in self._folders:
            level.add(t["path"], sums)

    def _add_errors(self, e: pa.Table, status: pa.Array | None) -> None:
        if not e.num_rows:
            return
        if status is None:  # a table without the status column: every failure is permanent
            status = pa.repeat("error", e.num_rows)
        msg = e["error"].fill_null("(no message)").combine_chunks()
        codes = pc.dictionary_encode(msg)  # a million failures share a handful of distinct messages:
        norm = pc.take(normalise_errors(codes.dictionary), codes.indices)  # normalise those, not every row
        g = pa.table({"status": status, "norm": norm, "msg": msg, "path": e["path"]})
        grouped = g.group_by(["status", "norm"], use_threads=False).aggregate([("path", "count"), ("path", "list"), ("msg", "first")])
        grouped = grouped.set_column(grouped.schema.get_field_index("path_list"), "path_list",
                                     pc.list_slice(grouped["path_list"], 0, 4 * EXAMPLES_PER_ERROR))
        for row in grouped.to_pylist():  # one row per distinct message in this batch, not per file
            key = (row["status"], row["norm"])
            entry = self._errors.get(key)
            if entry is None and len(self._errors) >= MAX_ERROR_GROUPS:
                self.a.other_error_rows += row["path_count"]
                continue
            if entry is None:
                entry = self._errors[key] = [0, row["msg_first"], []]
            entry[0] += row["path_count"]
            entry[2] = sorted(entry[2] + row["path_list"])[:EXAMPLES_PER_ERROR]

    def result(self) -> Aggregate:
        a = self.a
        a.threshold = (self._tmin, self._tmax) if np.isfinite(self._tmin) else None
        a.errors = sorted((ErrorGroup(norm, st, n, msg, sorted(ex)) for (st, norm), (n, msg, ex) in self._errors.items()),
                          key=lambda g: (-g.count, g.message))
        a.folder_depth, a.folders = self._choose_depth()
        a.folder_count = 0 if a.folders is None else a.folders.num_rows
        a.too_many_folders = [f.depth for f in self._folders if f.dropped]
        return a

    def _choose_depth(self) -> tuple[int, pa.Table | None]:
        """The given depth, or the shallowest level that splits the table into two or more folders."""
        levels = [(f.depth, f.table()) for f in self._folders if not f.dropped]
        if not levels or levels[0][1] is None:
            return self.depth or 1, None
        return next(((d, t) for d, t in levels if t.num_rows >= 2), levels[-1])


class _FolderSums:
    """Per-folder sums at one depth, merged as batches come; gives up past ``cap`` folders."""

    def __init__(self, depth: int, cap: int):
        self.depth, self.cap, self.parts, self.rows, self.dropped = depth, cap, [], 0, False

    def add(self, paths, sums: pa.Table) -> None:
        if self.dropped:
            return
        part = _sum_by(sums.append_column("folder", folder_of(paths, self.depth)), "folder")
        self.parts.append(part)
        self.rows += part.num_rows
        if len(self.parts) >= 16 or self.rows > 2 * self.cap:
            merged = self.table()
            self.parts, self.rows = [merged], merged.num_rows
            if merged.num_rows > self.cap:
                if self.cap >= MAX_FOLDERS:
                    raise InputError(f"More than {self.cap:,} folders at --folder-depth {self.depth}: choose a smaller depth.")
                self.parts, self.dropped = [], True

    def table(self) -> pa.Table | None:
        return _sum_by(pa.concat_tables(self.parts), "folder") if self.parts else None


def _sum_by(t: pa.Table, key: str) -> pa.Table:
    cols = [c for c in t.column_names if c != key]
    out = t.group_by(key).aggregate([(c, "sum") for c in cols])
    return out.rename_columns([c.removesuffix("_sum") if c != key else c for c in out.column_names])


# ---------------------------------------------------------------- the pass

def aggregate(results: str, *, depth: int | None = None, galleries: list[GallerySpec] = (), bins: int = 50,
              batch_rows: int = BATCH_ROWS) -> tuple[Aggregate, dict]:
    """One pass over a results folder -> (Aggregate, the table's ``cxr_batch`` metadata)."""
    parts, schema = open_results(results)
    missing = {"path", "pred", "prob_pneumonia", "error"} - set(schema.names)
    if missing:
        raise InputError(f"{results} is not a cxr-batch results table: it lacks the column(s) {', '.join(sorted(missing))}.")
    schema = pa.schema([schema.field(c) for c in COLUMNS if c in schema.names])
    agg = Aggregator(depth=depth, galleries=list(galleries), bins=bins)
    damaged: list = []
    for t in _batches(parts, schema, batch_rows, damaged=damaged):
        if "label" not in t.column_names:
            t = t.append_column("label", pa.nulls(t.num_rows, pa.string()))
        if "threshold" not in t.column_names:
            t = t.append_column("threshold", pa.nulls(t.num_rows, pa.float32()))
        agg.add(t)
    a = agg.result()
    a.parts = len(parts) - len(damaged)
    a.damaged = [p.rsplit("/", 1)[-1] for p in damaged]
    a.runs = len({re.sub(r"^part-([0-9a-f]+)-.*$", r"\1", p.rsplit("/", 1)[-1]) for p in parts})
    return a, read_metadata(results)
