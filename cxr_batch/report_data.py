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
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from . import CLASSES, POSITIVE, storage
from .errors import InputError
from .output import part_files, read_metadata

COLUMNS = ("path", "label", "pred", "prob_pneumonia", "threshold", "cam_path", "error", "status")
GALLERY_COLUMNS = ("path", "label", "pred", "prob_pneumonia", "threshold", "cam_path")
MAX_AUTO_DEPTH = 3  # folders are aggregated this deep; the report picks the shallowest useful level
MAX_ERROR_GROUPS = 2000  # distinct normalised messages kept; the rest are counted as "other messages"
EXAMPLES_PER_ERROR = 3
BATCH_ROWS = 131_072  # rows reduced at once: large enough that per-batch overhead is small

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


@dataclass(frozen=True)
class GallerySpec:
    name: str
    key: str  # "prob": highest P first; "margin": closest to the threshold first; "wrong": most confident errors
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
    errors: list[ErrorGroup] = field(default_factory=list)
    other_error_rows: int = 0  # rows whose message did not fit in MAX_ERROR_GROUPS groups
    galleries: dict = field(default_factory=dict)  # name -> pa.Table of GALLERY_COLUMNS (+ margin)
    parts: int = 0
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
        return {k: v for k, v in self.status_counts.items() if k not in ("scored", "error", "retry")}


# ---------------------------------------------------------------- reading

def open_results(results: str) -> tuple[pads.Dataset, list[str]]:
    """The part files of a ``cxr-batch score`` output as one pyarrow dataset (local or s3://)."""
    parts = part_files(results)
    if not parts:
        hint = " (it is a file: pass the output folder of `cxr-batch score`)" if storage.exists(results) and not storage.is_dir(results) else ""
        raise InputError(f"No results under {results}{hint}: expected part-*.parquet files written by `cxr-batch score`.")
    fs, _ = storage.resolve(parts[0])
    paths = [storage.resolve(p)[1] for p in parts]
    # Columns are only ever added: the newest part knows every column, and older parts read as null there.
    schema = pa.unify_schemas([pads.dataset(paths[i], filesystem=fs, format="parquet").schema
                               for i in sorted({0, len(paths) - 1})], promote_options="permissive")
    return pads.dataset(paths, schema=schema, filesystem=fs, format="parquet"), parts


def _batches(ds: pads.Dataset, columns: list[str], rows: int):
    """Record batches of about ``rows`` rows (parts hold ~2000 rows; reducing each alone costs overhead)."""
    pending, n = [], 0
    scanner = ds.scanner(columns=columns, batch_size=rows, fragment_readahead=2, batch_readahead=4)
    for batch in scanner.to_batches():
        if batch.num_rows:
            pending.append(batch)
            n += batch.num_rows
        if n >= rows:
            yield pa.Table.from_batches(pending)
            pending, n = [], 0
    if pending:
        yield pa.Table.from_batches(pending)


# ---------------------------------------------------------------- per-batch reductions

def _status(t: pa.Table) -> pa.Array:
    derived = pc.if_else(pc.is_null(t["error"]), "scored", "error")
    if "status" in t.column_names:
        return pc.coalesce(t["status"], derived)
    return derived


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
    idx = np.clip((p * n).astype(np.int64), 0, n - 1)  # P = 1.0 falls in the last bin
    return np.bincount(idx, minlength=n)


class Aggregator:
    """Feed it batches (pyarrow Tables with the columns in COLUMNS that exist); read ``result``."""

    def __init__(self, *, depth: int | None, galleries: list[GallerySpec], bins: int = 50):
        self.depth = depth
        self.agg_depth = depth or MAX_AUTO_DEPTH
        self.specs = galleries
        self.a = Aggregate(bins=np.linspace(0, 1, bins + 1))
        self._folders: list[pa.Table] = []
        self._errors: dict[tuple[str, str], list] = {}
        self._tmin, self._tmax = np.inf, -np.inf

    def add(self, t: pa.Table) -> None:
        a = self.a
        a.files += t.num_rows
        a.has_status = a.has_status or "status" in t.column_names
        status = _status(t)
        for v in pc.value_counts(status).to_pylist():
            a.status_counts[v["values"]] = a.status_counts.get(v["values"], 0) + v["counts"]
        scored = pc.equal(status, "scored")
        flagged = pc.and_(scored, pc.equal(t["pred"], CLASSES[POSITIVE])).fill_null(False)
        a.flagged += pc.sum(flagged).as_py() or 0
        self._add_scored(t.filter(scored), flagged.filter(scored))
        self._add_folders(t, status, flagged)
        self._add_errors(t.filter(pc.invert(scored)), status.filter(pc.invert(scored)))

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

    def _add_galleries(self, s: pa.Table) -> None:
        cols = [c for c in GALLERY_COLUMNS if c in s.column_names]
        g = s.select(cols).append_column("margin", pc.abs(pc.subtract(s["prob_pneumonia"], s["threshold"])))
        for spec in self.specs:
            cand = g
            if spec.key == "wrong":
                wrong = pc.and_(pc.is_valid(g["label"]), pc.not_equal(g["label"], g["pred"])).fill_null(False)
                cand = g.filter(wrong)
            old = self.a.galleries.get(spec.name)
            if old is not None:
                cand = pa.concat_tables([old, cand])
            keys = {"prob": [("prob_pneumonia", "descending")], "margin": [("margin", "ascending")],
                    "wrong": [("margin", "descending")]}[spec.key] + [("path", "ascending")]
            k = min(spec.k, cand.num_rows)
            self.a.galleries[spec.name] = cand.take(pc.select_k_unstable(cand, k, sort_keys=keys)) if k else cand

    def _add_folders(self, t: pa.Table, status: pa.Array, flagged: pa.Array) -> None:
        scored = pc.equal(status, "scored")
        prob = pc.if_else(scored, t["prob_pneumonia"].cast(pa.float64()), 0.0)
        part = pa.table({
            "folder": folder_of(t["path"], self.agg_depth), "files": pa.array(np.ones(t.num_rows, np.int64)),
            "scored": scored.cast(pa.int64()), "errors": pc.equal(status, "error").cast(pa.int64()),
            "retry": pc.equal(status, "retry").cast(pa.int64()), "flagged": flagged.cast(pa.int64()),
            "prob_sum": prob.fill_null(0.0),
        })
        self._folders.append(_sum_by(part, "folder"))
        if len(self._folders) >= 16:
            self._folders = [_sum_by(pa.concat_tables(self._folders), "folder")]

    def _add_errors(self, e: pa.Table, status: pa.Array) -> None:
        if not e.num_rows:
            return
        msg = e["error"].fill_null("(no message)")
        g = pa.table({"status": status, "norm": normalise_errors(msg), "msg": msg, "path": e["path"]})
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
        folders = _sum_by(pa.concat_tables(self._folders), "folder") if self._folders else None
        a.folder_depth, a.folders = self._choose_depth(folders)
        a.folder_count = 0 if a.folders is None else a.folders.num_rows
        return a

    def _choose_depth(self, folders: pa.Table | None) -> tuple[int, pa.Table | None]:
        """The given depth, or the shallowest level that splits the table into two or more folders."""
        if folders is None:
            return self.depth or 1, None
        if self.depth:
            return self.depth, folders
        for d in range(1, MAX_AUTO_DEPTH + 1):
            keys = folder_of(pc.binary_join_element_wise(folders["folder"], "/", ""), d)  # "a/b" -> "a/b/"
            rolled = _sum_by(folders.set_column(folders.schema.get_field_index("folder"), "folder", keys), "folder")
            if rolled.num_rows >= 2 or d == MAX_AUTO_DEPTH:
                return d, rolled
        raise AssertionError("unreachable")


def _sum_by(t: pa.Table, key: str) -> pa.Table:
    cols = [c for c in t.column_names if c != key]
    out = t.group_by(key).aggregate([(c, "sum") for c in cols])
    return out.rename_columns([c.removesuffix("_sum") if c != key else c for c in out.column_names])


# ---------------------------------------------------------------- the pass

def aggregate(results: str, *, depth: int | None = None, galleries: list[GallerySpec] = (), bins: int = 50,
              batch_rows: int = BATCH_ROWS) -> tuple[Aggregate, dict]:
    """One pass over a results folder -> (Aggregate, the table's ``cxr_batch`` metadata)."""
    ds, parts = open_results(results)
    columns = [c for c in COLUMNS if c in ds.schema.names]
    missing = {"path", "pred", "prob_pneumonia", "error"} - set(columns)
    if missing:
        raise InputError(f"{results} is not a cxr-batch results table: it lacks the column(s) {', '.join(sorted(missing))}.")
    agg = Aggregator(depth=depth, galleries=list(galleries), bins=bins)
    for t in _batches(ds, columns, batch_rows):
        if "label" not in t.column_names:
            t = t.append_column("label", pa.nulls(t.num_rows, pa.string()))
        if "threshold" not in t.column_names:
            t = t.append_column("threshold", pa.nulls(t.num_rows, pa.float32()))
        agg.add(t)
    a = agg.result()
    a.parts = len(parts)
    a.runs = len({re.sub(r"^part-([0-9a-f]+)-.*$", r"\1", p.rsplit("/", 1)[-1]) for p in parts})
    return a, read_metadata(results)
