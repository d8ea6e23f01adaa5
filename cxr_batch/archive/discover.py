"""Find the images in an archive: a local folder or an ``s3://`` prefix, any nesting, up to 10^7 files.

The listing is an Arrow table (``LISTING``: path, size, sniff), sorted by path, never millions of
Python objects: 10 M paths cost about as many bytes as the paths themselves (see README, "Scale").
Folders are listed by a pool of threads, one folder per task: on object storage each task is one
LIST request (or one paginated listing of a whole prefix, see ``_StoreLister``); on a local or NFS
disk, one ``scandir``.

Rules: extensions are matched case-insensitively; hidden files and folders (a name starting with
".") are skipped; a file with no extension is listed with ``sniff=True`` and the decode stage reads
its first bytes to decide whether it is DICOM (listing never reads a file). Symlinks stay inside the
archive: a link whose target resolves outside the archive root is not followed (counted in
``Listing.outside_links``) unless ``follow_symlinks``; a folder reached twice (a loop, or a second
link to it) is listed once, under its real path when it has one. Paths come back relative to the
archive root, POSIX style. A local name that is not UTF-8 (a Latin-1 zip unpacked on Linux) comes
back with its odd bytes as ``\\xNN`` escapes, since Parquet strings must be UTF-8; ``local_path``
finds the file again.

``read_manifest`` replaces the listing with a CSV, text or Parquet list of paths.
"""

from __future__ import annotations

import functools
import errno
import os
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from .. import CLASSES
from ..errors import DecodeError, InputError, one_line
from . import storage

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".dcm", ".dicom", ".bmp", ".tif", ".tiff", ".gif", ".webp"})
LISTING = pa.schema([
    ("path", pa.string()),  # relative to the archive root, POSIX separators
    ("size", pa.int64()),  # bytes from the listing; -1 where unknown (a manifest without sizes)
    ("sniff", pa.bool_()),  # no extension: the decode stage scores it only if its bytes say DICOM
])
# Folder listings in flight. On object storage LIST latency (20-100 ms a request), not CPU, bounds
# a listing. On a local disk with a warm cache each file costs ~5 us of Python under the GIL, so
# more threads only help where scandir waits (NFS, a cold disk); 8 was the fastest measured here.
THREADS = 32
LOCAL_THREADS = 8
_CHUNK_ROWS = 1 << 16  # rows held as Python objects before they become one Arrow batch
# A folder that cannot be listed whole (EACCES, EIO, a stale NFS handle, an S3 LIST that failed
# after pyarrow's own retries) is listed again after a short wait: a remount or a throttle passes.
# What still fails is named in the listing and makes the run incomplete (exit 3), never a silent gap.
LIST_ATTEMPTS = 3
LIST_BACKOFF_S = 0.2  # wait before attempt k + 1: LIST_BACKOFF_S * 2**(k-1)
NAMED = 20  # unlisted folders and entries named in ``Listing.unlisted``; the rest are counted


@dataclass(frozen=True)
class Listing:
    files: pa.Table  # LISTING, sorted by path, each path once
    source: str = "listing"  # "listing" or "manifest FILE"
    outside_links: int = 0  # symlinks to outside the archive, not followed (--follow-symlinks follows them)
    unreadable_folders: int = 0  # folders that could not be listed, after LIST_ATTEMPTS tries (permissions, I/O errors)
    unreadable_entries: int = 0  # entries of a listed folder whose type or size could not be read (stat failed)
    unlisted: tuple = ()  # the first NAMED of both, "path: reason", sorted
    requests: int = 0  # folder listings made (scandir calls, or S3 LIST calls/paginations)
    max_in_flight: int = 0  # most folder listings running at the same moment
    seconds: float = 0.0

    def first(self, n: int | None) -> "Listing":
        """The first ``n`` files by path (--limit); the whole listing when ``n`` is None."""
        if n is None or n >= self.files.num_rows:
            return self
        return replace(self, files=self.files.slice(0, n))

    @property
    def incomplete(self) -> int:
        """Folders and entries that could not be listed: their files (if any) have no row this run."""
        return self.unreadable_folders + self.unreadable_entries

    def stats(self) -> dict:
        return {"source": self.source, "files": self.files.num_rows, "outside_links": self.outside_links,
                "unreadable_folders": self.unreadable_folders, "unreadable_entries": self.unreadable_entries,
                "unlisted": list(self.unlisted), "requests": self.requests,
                "max_in_flight": self.max_in_flight, "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the archive root, POSIX separators
    size: int  # bytes, -1 where it could not be read (the decode step then reports why)


def label_from_path(rel: str) -> str | None:
    """NORMAL or PNEUMONIA when a folder on the path is named so (any case), else None."""
    for part in reversed(rel.split("/")[:-1]):
        if part.upper() in CLASSES:
            return part.upper()
    return None


# ---------------------------------------------------------------- the listing

def list_archive(archive: str, *, follow_symlinks: bool = False, threads: int | None = None) -> Listing:
    """Every candidate file under ``archive``, as a sorted ``LISTING`` table (see the module doc)."""
    fs, root = check_archive(archive)
    if isinstance(fs, pafs.LocalFileSystem):
        lister, threads = _LocalLister(root, follow_symlinks), threads or LOCAL_THREADS
    else:
        lister, threads = _StoreLister(fs, root, threads or THREADS), threads or THREADS
    t0 = time.perf_counter()
    files, stats = _crawl(lister, threads)
    # Sorting one chunk: 150 chunks of 10 M paths took 2.4x as long and 900 MB of Arrow memory at
    # the peak instead of 730 MB (the table is 330 MB; a sort needs it twice plus the indices).
    files = files.sort_by("path")
    pa.default_memory_pool().release_unused()  # what Arrow keeps for reuse: the run's later stages need it more
    return Listing(files, seconds=time.perf_counter() - t0, **stats)


def check_archive(archive: str) -> tuple[pafs.FileSystem, str]:
    """-> (filesystem, root) of an archive folder that exists; a one-line InputError otherwise."""
    fs, root = storage.resolve(archive)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"Archive not found: {archive}")
    if info.type == pafs.FileType.File:
        raise InputError(f"{archive} is a file; pass the folder that holds the images.")
    return fs, root


def discover(archive: str, *, follow_symlinks: bool = False) -> list[FileEntry]:
    """The listing as Python objects with extensionless files already sniffed (non-DICOM ones left
    out): for small trees (training sets, tests, the benchmark). Scoring uses ``list_archive``."""
    files = list_archive(archive, follow_symlinks=follow_symlinks).files
    sniff = files.filter(files["sniff"])["path"].to_pylist()
    with ThreadPoolExecutor(16) as pool:
        not_dicom = {rel for rel, ok in zip(sniff, pool.map(lambda r: _is_dicom_file(archive, r), sniff)) if not ok}
    return [FileEntry(p, s) for p, s in zip(files["path"].to_pylist(), files["size"].to_pylist()) if p not in not_dicom]


def _is_dicom_file(archive: str, rel: str) -> bool:
    from ..pixels.dicom import is_dicom

    try:
        with storage.open_file(archive, rel) as f:
            return is_dicom(f.read(132))
    except (OSError, DecodeError):  # unreadable, or not a regular file
        return False


@dataclass
class _Found:
    """What listing one folder gave: files, and more folders to list."""
    paths: list = field(default_factory=list)
    sizes: list = field(default_factory=list)
    sniff: list = field(default_factory=list)
    folders: list = field(default_factory=list)  # tasks for the same lister
    links: list = field(default_factory=list)  # (rel, path) of symlinked folders, decided after the real tree
    folder_id: tuple | None = None  # (st_dev, st_ino) of a local folder
    outside_links: int = 0
    unlisted: list = field(default_factory=list)  # (path, reason, is_folder) of what could not be listed

    def add(self, rel: str, name: str, size: int | None) -> None:
        kind = _kind(name)
        if kind:
            self.paths.append(rel)
            self.sizes.append(-1 if size is None else size)
            self.sniff.append(kind == "sniff")


def _kind(name: str) -> str | None:
    """'image', 'sniff' (no extension: DICOM by content?) or None (not a candidate)."""
    if name.startswith("."):
        return None
    ext = os.path.splitext(name)[1].lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    return "sniff" if ext == "" else None


class _Counter:
    """Folder listings running now, and the most seen at once (reported in ``Listing``)."""

    def __init__(self):
        self.lock, self.now, self.peak, self.total = threading.Lock(), 0, 0, 0

    def __enter__(self):
        with self.lock:
            self.now += 1
            self.total += 1
            self.peak = max(self.peak, self.now)

    def __exit__(self, *exc):
        with self.lock:
            self.now -= 1


def _crawl(lister, threads: int) -> tuple[pa.Table, dict]:
    """List folders in a thread pool until none is left. At most 2 x threads folders are in flight
    or waiting to be merged, so the Python objects alive at once stay bounded whatever the archive's
    size. Symlinked folders wait until the real tree is done and are then taken in path order, so
    the path a twice-reachable folder is listed under does not depend on thread timing."""
    batches, buf = [], _Found()
    seen: set = set()
    outside, unlisted = 0, _Unlisted()
    queue, links = deque([lister.root_task()]), []
    with ThreadPoolExecutor(threads) as pool:
        running: set = set()
        while queue or running or links:
            if not queue and not running:  # the real tree is done: follow the links that reach something new
                queue.extend(lister.follow(sorted(links), seen))
                links = []
            while queue and len(running) < 2 * threads:
                running.add(pool.submit(lister.folder, queue.popleft()))
            if not running:
                continue
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                found = fut.result()
                if found.folder_id is not None:
                    if found.folder_id in seen:
                        continue  # reached twice (a bind mount): listed once
                    seen.add(found.folder_id)
                outside += found.outside_links
                unlisted.add(found.unlisted)
                links += found.links
                buf.paths += found.paths
                buf.sizes += found.sizes
                buf.sniff += found.sniff
                queue.extend(lister.plan(found.folders, len(running) + len(queue)))
                if len(buf.paths) >= _CHUNK_ROWS:
                    batches.append(_batch(buf))
                    buf = _Found()
    batches.append(_batch(buf))
    c = lister.counter
    return pa.Table.from_batches(batches, LISTING).combine_chunks(), dict(
        outside_links=outside, requests=c.total, max_in_flight=c.peak, **unlisted.stats())


class _Unlisted:
    """What could not be listed: counted, and the first NAMED named."""

    def __init__(self):
        self.folders = self.entries = 0
        self.named: list = []

    def add(self, items: list) -> None:
        for path, reason, is_folder in items:
            self.folders += is_folder
            self.entries += not is_folder
            if len(self.named) < NAMED:
                self.named.append(f"{path}{'/' if is_folder and path != '.' else ''}: {reason}")

    def stats(self) -> dict:
        return dict(unreadable_folders=self.folders, unreadable_entries=self.entries, unlisted=tuple(sorted(self.named)))


def _with_retries(list_once):
    """``folder(task)`` made to list a folder again, after a backoff, while anything in it failed."""
    @functools.wraps(list_once)
    def folder(self, task) -> _Found:
        for attempt in range(LIST_ATTEMPTS):
            if attempt:
                time.sleep(LIST_BACKOFF_S * 2 ** (attempt - 1))
            found = list_once(self, task)
            if not found.unlisted:
                break
        return found
    return folder


def _reason(e: OSError) -> str:
    """An OSError as the few words a user needs ("permission denied", "stale file handle")."""
    return one_line(e.strerror.lower() if e.strerror else e, 120)


def _batch(found: _Found) -> pa.RecordBatch:
    return pa.record_batch([pa.array(found.paths, pa.string()), pa.array(found.sizes, pa.int64()),
                            pa.array(found.sniff, pa.bool_())], schema=LISTING)


class _LocalLister:
    """One ``os.scandir`` per task. A task is (folder path, its path relative to the root, whether
    ``follow`` already counted it as seen)."""

    def __init__(self, root: str, follow_symlinks: bool):
        self.root, self.follow_symlinks = root, follow_symlinks
        self.real_root = os.path.realpath(root)
        self.counter = _Counter()

    def root_task(self):
        return (self.root, "", False)

    def plan(self, folders: list, pending: int) -> list:
        return folders

    def follow(self, links: list, seen: set) -> list:
        tasks = []
        for rel, path in links:
            try:
                st = os.stat(path)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))  # two links to one new folder: the first by path wins
                tasks.append((path, rel, True))
        return tasks

    @_with_retries
    def folder(self, task) -> _Found:
        folder, rel, counted = task
        found = _Found()
        try:
            with self.counter:
                if not counted:
                    st = os.stat(folder)
                    found.folder_id = (st.st_dev, st.st_ino)
                with os.scandir(folder) as it:
                    entries = list(it)
        except OSError as e:  # its files cannot be scored this run; its siblings still are
            found.unlisted.append((rel or ".", _reason(e), True))
            return found
        prefix = f"{rel}/" if rel else ""
        paths, sizes, sniff = found.paths, found.sizes, found.sniff
        for e in entries:  # the hot loop of a local listing: ~5 us per file, so no helper calls here
            name = e.name
            if name[0] == ".":
                continue
            try:
                if e.is_symlink():
                    self._link(e, prefix, found)
                elif e.is_dir(follow_symlinks=False):
                    found.folders.append((e.path, prefix + storage.text_name(name), False))
                else:
                    dot = name.rfind(".")
                    ext = name[dot:].lower() if dot > 0 else ""
                    if (ext in IMAGE_EXTENSIONS or not ext) and e.is_file(follow_symlinks=False):
                        size = e.stat(follow_symlinks=False).st_size  # first: a failing stat adds no half row
                        paths.append(prefix + storage.text_name(name))
                        sizes.append(size)
                        sniff.append(not ext)
            except OSError as e:  # a folder without search permission, an entry that vanished: counted, never dropped
                found.unlisted.append((prefix + storage.text_name(name), _reason(e), False))
        return found

    def _link(self, e: os.DirEntry, prefix: str, found: _Found) -> None:
        if not self.follow_symlinks and not _inside(os.path.realpath(e.path), self.real_root):
            found.outside_links += 1
            return
        name = storage.text_name(e.name)
        try:
            is_dir = e.is_dir()  # follows the link
        except OSError as err:
            if err.errno == errno.ELOOP:  # a link loop is the entry's own fault, as a broken link is: no file
                return
            raise
        if is_dir:
            found.links.append((prefix + name, e.path))
        elif e.is_file():
            found.add(prefix + name, name, e.stat().st_size)
        # else: a broken link, or a link to a socket or fifo


def _inside(real: str, real_root: str) -> bool:
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


class _StoreLister:
    """Object storage. A task is (key prefix, relative path, flat). Not flat: one LIST with a
    delimiter, giving the prefix's own files and its sub-prefixes. Flat: one paginated listing of
    everything below (1,000 keys per request). The first levels are listed with the delimiter until
    there are enough prefixes to keep every thread busy; below that, flat listings cost one request
    per 1,000 keys whatever the tree's depth (a PACS export with one image per series folder would
    otherwise cost one request per image). Limit: pyarrow returns one task's listing as one list
    (~250 B per key), so a prefix holding millions of keys directly is one sequential listing and
    that much memory at once; split it, or pass a --manifest."""

    def __init__(self, fs: pafs.FileSystem, root: str, threads: int):
        self.fs, self.root, self.target = fs, root, 4 * threads
        self.counter = _Counter()

    def root_task(self):
        return (self.root, "", False)

    def plan(self, folders: list, pending: int) -> list:
        flat = pending + len(folders) >= self.target
        return [(path, rel, flat) for path, rel in folders]

    def follow(self, links: list, seen: set) -> list:
        return []

    @_with_retries
    def folder(self, task) -> _Found:
        prefix, rel, flat = task
        found = _Found()
        try:
            with self.counter:
                infos = self.fs.get_file_info(pafs.FileSelector(prefix, recursive=flat))
        except OSError as e:
            found.unlisted.append((rel or ".", _reason(e), True))
            return found
        cut = len(prefix) + 1
        for info in infos:
            sub = info.path[cut:]
            child = f"{rel}/{sub}" if rel else sub
            if info.type == pafs.FileType.Directory:
                if not flat and not info.base_name.startswith("."):
                    found.folders.append((info.path, child))
            elif info.type == pafs.FileType.File and not (flat and "/." in "/" + sub):
                found.add(child, info.base_name, info.size)
        return found


# ``local_path`` is part of this module's interface (outdir, tests); the one definition is storage's.
local_path = storage.local_path


@functools.lru_cache(maxsize=8)
def _real(root: str) -> str:
    return os.path.realpath(root)


def outside_archive(root: str, rel: str) -> bool:
    """True when a local archive's ``rel`` resolves (through symlinks) to outside the archive."""
    return not _inside(os.path.realpath(local_path(root, rel)), _real(root))


def opened_outside(root: str, f) -> bool:
    """True when the opened local file ``f`` lies outside the archive ``root``, judged on its descriptor
    (Linux's /proc/self/fd): a link swapped in between a path check and the open is caught here,
    where a check of the path before the open would read it. False where the OS does not tell."""
    try:
        real = os.readlink(f"/proc/self/fd/{f.fileno()}")
    except (OSError, AttributeError, ValueError):
        return False
    return not _inside(real.removesuffix(" (deleted)"), _real(root))


# ---------------------------------------------------------------- a manifest instead of a listing

MANIFEST_FORMATS = ".csv, .csv.gz, .txt (one path per line) or .parquet"


def read_manifest(manifest: str, archive: str) -> Listing:
    """A list of files from ``manifest`` (PACS exports and data lakes provide one), in place of
    listing the archive. CSV and Parquet need a ``path`` column and may have ``size`` (bytes); a
    .txt file is one path per line. Paths are relative to the archive (absolute ones under the
    archive are accepted and made relative); one that leaves the archive is refused; duplicates
    count once; extensionless paths are sniffed by the decode stage, as in a listing."""
    t0 = time.perf_counter()
    _, root = check_archive(archive)  # the folder the paths are relative to
    table = _read_manifest_table(manifest)
    paths = _relative(table.column("path"), manifest, archive, root)
    size = table.column("size").cast(pa.int64()) if "size" in table.column_names else pa.nulls(len(paths), pa.int64())
    size = pc.if_else(pc.greater_equal(pc.fill_null(size, -1), 0), pc.fill_null(size, -1), -1)
    files = pa.table({"path": paths, "size": size}).group_by("path", use_threads=False).aggregate([("size", "max")])
    sniff = pc.match_substring_regex(files["path"], r"(^|/)\.*[^./]*$")  # os.path.splitext's "no extension"
    files = pa.table([files["path"], files["size_max"], sniff], schema=LISTING).combine_chunks().sort_by("path")
    return Listing(files, source=f"manifest {manifest}", seconds=time.perf_counter() - t0)


def _read_manifest_table(manifest: str) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fs, path = storage.resolve(manifest)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise InputError(f"Manifest not found: {manifest}")
    name = path.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            with fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                cols = [c for c in ("path", "size") if c in pf.schema_arrow.names]
                table = pf.read(columns=cols)
        elif name.endswith((".csv", ".csv.gz", ".txt", ".txt.gz")):
            plain = name.endswith((".txt", ".txt.gz"))
            read = pacsv.ReadOptions(column_names=["path"] if plain else None, block_size=1 << 22)
            parse = pacsv.ParseOptions(delimiter="\x1f" if plain else ",", quote_char=False if plain else '"')
            convert = pacsv.ConvertOptions(column_types={"path": pa.string(), "size": pa.int64()},
                                           strings_can_be_null=False, quoted_strings_can_be_null=False)
            with fs.open_input_stream(path, compression="detect") as f:
                table = pacsv.read_csv(f, read_options=read, parse_options=parse, convert_options=convert)
        else:
            raise InputError(f"Manifest {manifest}: unknown format; use {MANIFEST_FORMATS}.")
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"Manifest {manifest} is not readable as {MANIFEST_FORMATS}: {one_line(e)}") from None
    if "path" not in table.column_names:
        raise InputError(f"Manifest {manifest} has no `path` column (columns: {', '.join(table.column_names)[:200]}).")
    if not pa.types.is_string(table.schema.field("path").type) and not pa.types.is_large_string(table.schema.field("path").type):
        raise InputError(f"Manifest {manifest}: the `path` column must hold strings.")
    return table


def _relative(paths: pa.ChunkedArray, manifest: str, archive: str, root: str) -> pa.ChunkedArray:
    """Manifest paths made relative to the archive and normalised ("./a//b" -> "a/b"); the first
    path that is empty or leaves the archive is refused in one line."""
    paths = given = paths.cast(pa.string())
    for prefix in {storage.absolute(archive).rstrip("/") + "/", root.rstrip("/") + "/"}:
        paths = pc.if_else(pc.starts_with(paths, prefix), pc.utf8_slice_codeunits(paths, len(prefix)), paths)
    uri = pc.match_substring(paths, "://")  # a URI that is not under the archive
    paths = pc.replace_substring_regex(paths, r"(^|/)(\./)+", r"\1")  # ./a and a/./b
    paths = pc.replace_substring_regex(paths, r"//+", "/")
    bad = pc.or_kleene(pc.or_kleene(pc.is_null(paths), uri), pc.or_kleene(_leaves(paths), _leaves(_unescaped(paths))))
    if pc.any(bad).as_py():
        i = pc.index(bad, True).as_py()
        raise InputError(
            f"Manifest {manifest}, entry {i + 1}: {given[i].as_py()!r} is not a file inside the archive {archive}."
            " Manifest paths must be relative to the archive, e.g. study1/series1/IM0001.")
    return paths


def _leaves(paths: pa.ChunkedArray) -> pa.ChunkedArray:
    """True where a normalised relative path is empty, absolute, or climbs out with "..". """
    return pc.match_substring_regex(paths, r"^$|^/|^\.$|/\.?$|(^|/)\.\.(/|$)|\x00")


def _unescaped(paths: pa.ChunkedArray) -> pa.ChunkedArray:
    """Paths with the ``\\xNN`` escapes that spell ".", "/" or NUL decoded: "\\x2e\\x2e\\x2f" must be
    judged as the "../" it could become, whatever a reader later decodes (storage.local_path)."""
    for escape, char in ((r"\\x2[eE]", "."), (r"\\x2[fF]", "/"), (r"\\x00", "\x00")):
        paths = pc.replace_substring_regex(paths, escape, char)
    return pc.replace_substring_regex(paths, r"//+", "/")
