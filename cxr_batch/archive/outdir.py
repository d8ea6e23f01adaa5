"""Where results may go, and what ``--overwrite`` may delete.

An ``--out`` or CAM folder that is the archive or lies inside it is refused: results would mix with
the images, and the next listing would take the CAM PNGs for X-rays. With ``--overwrite``, one
that holds the archive is refused too. Paths are compared after resolving symlinks (local) or as
URI prefixes (``s3://bucket/a`` holds ``s3://bucket/a/b``, not ``s3://bucket/ab``).

``clear_output`` deletes only what cxr-batch wrote: its part files and their temporary names, its
lease and other ``_cxr_batch*`` files (except the lease this run holds), the CAM PNGs of its tables'
rows inside the CAM folder, and then the folders that this emptied (an empty folder that was
empty before, a user's, stays). Anything else stays, and the run says what was left.
"""

from __future__ import annotations

import os
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs

from . import storage
from ..errors import InputError
from .lease import LEASE_FILE, LOCK_FILE
from .results import cam_uri, damaged_note, part_files, read_part

# Temporary names of storage.write_bytes_atomic (".<name>.<8 hex>.tmp") and our bookkeeping files.
_OURS_IN_OUT = re.compile(r"^(\.part-.*\.parquet\.[0-9a-f]{8}\.tmp|_cxr_batch.*)$")
_TMP_PNG = re.compile(r"^\..*\.png\.[0-9a-f]{8}\.tmp$")


def check_placement(archive: str, out: str, cam_dir: str | None, *, overwrite: bool) -> None:
    """Refuse an --out / CAM folder that is, lies inside, or (with --overwrite) holds the archive."""
    a = _key(archive)
    for option, where in (("--out", out), ("--cam-dir", cam_dir)):
        if where is None:
            continue
        w = _key(where)
        if _within(w, a):
            same = "is" if w == a else "lies inside"
            raise InputError(f"{option} {where} {same} the archive {archive}: results would mix with the images"
                             " (and the next run would list the CAM PNGs as X-rays). Choose a folder outside the archive.")
        if overwrite and _within(a, w):
            raise InputError(f"--overwrite would clear {option} {where}, which holds the archive {archive}. Choose an"
                             f" {option} that does not contain the archive.")


def same_folder(a: str, b: str) -> bool:
    """Whether two paths or URIs name one folder (symlinks resolved)."""
    return _key(a) == _key(b)


def _key(path: str) -> tuple[str, tuple[str, ...]]:
    if storage.is_uri(path):
        scheme, _, rest = str(path).partition("://")
        return scheme, tuple(p for p in rest.split("/") if p)
    real = os.path.realpath(os.path.expanduser(str(path)))
    return "file", tuple(p for p in real.split(os.sep) if p)


def _within(inner: tuple, outer: tuple) -> bool:
    return inner[0] == outer[0] and inner[1][: len(outer[1])] == outer[1]


@dataclass
class Cleared:
    parts: int = 0
    pngs: int = 0
    other: int = 0  # temporary files, old leases, parts set aside as damaged, empty folders
    damaged: list = field(default_factory=list)  # names of damaged parts, deleted unread
    left: dict = field(default_factory=dict)  # folder -> [count, first few names] of files cxr-batch did not write

    def keep(self, folder: str, name: str) -> None:
        entry = self.left.setdefault(folder, [0, []])
        entry[0] += 1
        if len(entry[1]) < 5:
            entry[1].append(name)

    def notes(self) -> list[str]:
        out = [f"--overwrite deleted {self.parts:,} part files and {self.pngs:,} CAM PNGs of earlier runs"]
        if self.damaged:
            out.append("--overwrite: " + damaged_note(self.damaged, "deleted unread (the CAM PNGs they named are left)"))
        for folder, (count, names) in self.left.items():
            more = f", ... ({count:,} in all)" if count > len(names) else ""
            out.append(f"--overwrite left {count:,} files in {folder} that no cxr-batch table points to: "
                       f"{', '.join(sorted(names))}{more}")
        return out


def clear_output(out: str, cam_dir: str | None) -> Cleared:
    """Delete what earlier runs wrote to ``out`` and ``cam_dir`` (see the module doc). PNGs first:
    an interrupted clear leaves the parts that still point to the rest, and a re-run finishes it."""
    c = Cleared()
    emptied: set = set()  # folders (filesystem paths) this deleted something from: the only ones pruned
    with ThreadPoolExecutor(16) as pool:
        for part in part_files(out):
            pngs = _cam_paths(part, cam_dir)
            if pngs is None:  # damaged: it names no PNG we can read, but it is ours
                c.damaged.append(posixpath.basename(part))
            else:
                pngs = sorted(pngs)
                gone = [png for png, n in zip(pngs, pool.map(_delete, pngs)) if n]
                c.pngs += len(gone)
                emptied.update(storage.resolve(posixpath.dirname(png))[1] for png in gone)
            c.parts += _delete(part)
    for name in storage.list_dir(out):
        if _OURS_IN_OUT.match(name) and name not in (LEASE_FILE, LOCK_FILE):
            c.other += _delete(storage.join(out, name))
    if cam_dir:
        prune = _prune_local if not storage.is_uri(cam_dir) else _prune_store
        c.other += prune(cam_dir, c, emptied)
    for name in storage.list_dir(out):
        if name not in (LEASE_FILE, LOCK_FILE):
            c.keep(out, name)
    return c


def _cam_paths(part: str, cam_dir: str | None) -> set[str] | None:
    """The CAM PNGs of a part's scored rows inside ``cam_dir``: where its ``cam_path`` points, and
    where this CAM folder keeps a row's PNG (``cam_uri``), which still holds when the folders were
    copied or moved. Nothing outside ``cam_dir`` is returned, whatever a (foreign, edited) table says.
    None for a damaged part (judged even without a CAM folder, so that it is reported)."""
    t = read_part(part, lambda pf: pf.read(columns=["path", "cam_path"]) if cam_dir and "cam_path" in pf.schema_arrow.names
                  else pa.table({"path": pa.array([], pa.string()), "cam_path": pa.array([], pa.string())}))
    if t is None:
        return None
    root = _key(cam_dir)
    out = set()
    for rel, png in zip(t.column("path").to_pylist(), t.column("cam_path").to_pylist()):
        if png is None:
            continue
        out.add(cam_uri(cam_dir, rel))
        if png.endswith(".png") and _within(_key(png), root) and _key(png) != root:
            out.add(png)
    return out


def _delete(uri: str) -> int:
    fs, path = storage.resolve(uri)
    try:
        fs.delete_file(path)
        return 1
    except FileNotFoundError:
        return 0


def _prune_local(cam_dir: str, c: Cleared, emptied: set) -> int:
    """Our temporary PNGs go, then the folders this emptied, deepest first (a folder whose last
    entry went counts its parent in). rmdir refuses a folder that holds anything, so nothing of
    anyone else's can go with it. Streams: 10 M names never sit in memory at once."""
    removed = 0
    for folder, _, names in os.walk(cam_dir, topdown=False):
        for name in names:
            if folder == cam_dir and name in (LEASE_FILE, LOCK_FILE):
                continue  # the lease this run holds on the CAM folder
            if _TMP_PNG.match(name):
                removed += _delete(os.path.join(folder, name))
                emptied.add(folder)
            else:
                c.keep(cam_dir, os.path.relpath(os.path.join(folder, name), cam_dir))
        if folder in emptied:
            try:
                os.rmdir(folder)
                removed += 1
                emptied.add(os.path.dirname(folder))
            except OSError:
                pass  # not empty
    return removed


def _prune_store(cam_dir: str, c: Cleared, emptied: set) -> int:
    """The same on object storage, where a folder is a key prefix (an empty one may have a marker)."""
    fs, root = storage.resolve(cam_dir)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return 0
    removed, dirs = 0, []
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type == pafs.FileType.Directory:
            dirs.append(info.path)
        elif info.path in (f"{root}/{LEASE_FILE}", f"{root}/{LOCK_FILE}"):
            continue
        elif _TMP_PNG.match(info.base_name):
            removed += _delete(_uri(cam_dir, root, info.path))
            emptied.add(posixpath.dirname(info.path))
        else:
            c.keep(cam_dir, info.path[len(root) + 1:])
    for d in sorted(dirs, key=lambda p: -p.count("/")) + [root]:  # deepest first
        if d in emptied and not fs.get_file_info(pafs.FileSelector(d)):
            fs.delete_dir(d)  # empty at this moment: only its marker goes
            removed += 1
            emptied.add(posixpath.dirname(d))
    return removed


def _uri(base_uri: str, base_path: str, path: str) -> str:
    return storage.join(base_uri, *posixpath.relpath(path, base_path).split("/"))
