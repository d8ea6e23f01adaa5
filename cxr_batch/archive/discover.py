"""Find the images in an archive: any nesting, local folder or ``s3://`` prefix.

Rules: extensions are matched case-insensitively; hidden files and folders (a name starting with
".") are skipped; a file with no extension is taken when its bytes say DICOM (the "DICM" preamble);
symlinked folders are followed once (a loop is visited once, not forever). Paths come back
relative to the archive root, POSIX style, sorted, so two runs list the same files the same way.
A local name that is not UTF-8 (a Latin-1 zip unpacked on Linux) comes back with its odd bytes
as ``\\xNN`` escapes, since Parquet strings must be UTF-8; ``storage.local_path`` finds the file again.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

import pyarrow.fs as pafs

from .. import CLASSES
from . import storage
from ..errors import InputError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".dcm", ".dicom", ".bmp", ".tif", ".tiff", ".gif", ".webp"})


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


def discover(archive: str) -> list[FileEntry]:
    fs, root = storage.resolve(archive)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"Archive not found: {archive}")
    if info.type == pafs.FileType.File:
        raise InputError(f"{archive} is a file; pass the folder that holds the images.")
    if isinstance(fs, pafs.LocalFileSystem):
        entries = list(_walk_local(root))
    else:
        entries = list(_walk_fs(fs, root))
    return sorted(entries, key=lambda e: e.path)


def _wanted(name: str) -> str:
    """'yes', 'no', or 'sniff' (no extension: DICOM by content?)."""
    if name.startswith("."):
        return "no"
    ext = os.path.splitext(name)[1].lower()
    if ext in IMAGE_EXTENSIONS:
        return "yes"
    return "sniff" if ext == "" else "no"


def _sniff_dicom(read_head) -> bool:
    from ..pixels.dicom import is_dicom

    try:
        return is_dicom(read_head())
    except OSError:
        return False


def _walk_local(root: str):
    seen_dirs: set[tuple[int, int]] = set()
    stack = [(root, "")]
    while stack:
        folder, rel = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen_dirs:
                continue  # a symlink loop, or a second link to a folder already listed
            seen_dirs.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                items = list(it)
        except OSError:
            continue  # an unreadable folder has no files we could score; its siblings still are
        for e in items:
            name = storage.text_name(e.name)
            child = f"{rel}/{name}" if rel else name
            try:
                if e.is_dir(follow_symlinks=True):
                    if not e.name.startswith("."):
                        stack.append((e.path, child))
                    continue
                if not e.is_file(follow_symlinks=True):
                    continue  # broken links, sockets, fifos
            except OSError:
                continue
            kind = _wanted(e.name)
            if kind == "no" or (kind == "sniff" and not _sniff_dicom(lambda: _head_local(e.path))):
                continue
            try:
                size = e.stat(follow_symlinks=True).st_size
            except OSError:
                size = -1
            yield FileEntry(child, size)


def _head_local(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(132)


def _walk_fs(fs: pafs.FileSystem, root: str):
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(info.path, root)
        if any(p.startswith(".") for p in rel.split("/")):
            continue
        kind = _wanted(posixpath.basename(rel))

        def head(p=info.path):
            with fs.open_input_file(p) as f:
                return f.read(132)

        if kind == "no" or (kind == "sniff" and not _sniff_dicom(head)):
            continue
        yield FileEntry(rel, info.size if info.size is not None else -1)
