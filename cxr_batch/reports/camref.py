"""How a table row names its CAM PNG: ``cam_path`` relative to the CAM folder, whose root is in the
table's metadata (``cam_dir``), so that moving or copying the table and its CAMs together keeps
every link. Tables written before held an absolute path (or URI): it is read as it stands.

Pure string functions, shared by the scoring job (which writes the name) and every reader.
"""

from __future__ import annotations

import os
import posixpath

from ..archive import storage

META_KEY = "cam_dir"  # the key of the CAM folder's root in the table's ``cxr_batch`` metadata


def relative_cam(cam_dir: str, uri: str) -> str:
    """``uri`` (a PNG under ``cam_dir``) -> its name relative to ``cam_dir``, with ``/`` separators."""
    if storage.is_uri(cam_dir):
        return posixpath.relpath(uri, str(cam_dir).rstrip("/"))
    return os.path.relpath(uri, cam_dir).replace(os.sep, "/")


def is_relative(cam_path: str) -> bool:
    return not (storage.is_uri(cam_path) or os.path.isabs(cam_path))


def resolve_cam(cam_path: str | None, *roots: str | None) -> str | None:
    """A row's ``cam_path`` -> where the PNG is: an old absolute path as it stands; a relative one under
    the first of ``roots`` (the metadata's root, then where the CAM folder is now) that holds it, else
    under the first root given."""
    if not cam_path or not is_relative(cam_path):
        return cam_path
    roots = [r for r in roots if r]
    if not roots:
        return None
    candidates = [storage.join(r, *cam_path.split("/")) for r in roots]
    return next((c for c in candidates[1:] if not storage.exists(candidates[0]) and storage.exists(c)), candidates[0])
