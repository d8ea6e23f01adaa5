"""Paths and URIs: local folders now, ``s3://`` through the same calls, via pyarrow's filesystem layer.

S3-compatible servers (MinIO, Ceph, a test server on loopback) are reached by setting
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), as for the AWS CLI; credentials come from the
usual ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` variables or the instance profile.

Every input file of an archive is read by ``read_file(root, rel)``, whichever job reads it (or, for a
header alone, opened by ``open_file``).
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import stat
import threading
import uuid
from functools import lru_cache

import pyarrow.fs as pafs

from ..errors import DecodeError, NotRegularFile, TransientError, one_line


def is_uri(path: str) -> bool:
    return "://" in str(path)


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """-> (filesystem, path inside it). Local paths become absolute."""
    path = str(path)
    if path.startswith("s3://"):
        return _s3(_endpoint()), path[5:].rstrip("/")
    if is_uri(path):
        fs, inner = pafs.FileSystem.from_uri(path)
        return fs, inner
    return pafs.LocalFileSystem(), absolute(path)


@lru_cache(maxsize=4)
def _s3(endpoint: str) -> pafs.S3FileSystem:
    kwargs = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs = {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""


@lru_cache(maxsize=4)
def _boto3_client(endpoint: str, region: str):
    import boto3
    from botocore.config import Config

    # Few retries and short timeouts: the lease's heartbeat must notice a dead endpoint well within its timeout.
    config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=20)
    return boto3.client("s3", endpoint_url=endpoint or None, region_name=region or None, config=config)


def s3_client():
    """A boto3 S3 client for the same endpoint, region and credentials as ``resolve`` gives pyarrow:
    for what pyarrow cannot do (the lease's conditional writes)."""
    with _CLIENT_LOCK:  # boto3's client creation is not thread-safe (racing leases make their first one at once)
        return _boto3_client(_endpoint(), os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "")


_CLIENT_LOCK = threading.Lock()


def absolute(path: str) -> str:
    """A local path made absolute (``~`` expanded); a URI unchanged. Paths go to Ray workers whose
    working directory is not the user's (Ray Train moves its workers into the run's folder), so
    every job makes its paths absolute on the driver before they travel."""
    return str(path) if is_uri(path) else os.path.abspath(os.path.expanduser(str(path)))


def join(base: str, *parts: str) -> str:
    if is_uri(base):
        return posixpath.join(str(base).rstrip("/"), *parts)
    return os.path.join(base, *parts)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(uri)
    if info.type == pafs.FileType.Directory:
        raise IsADirectoryError(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_file(root: str, rel: str, *, check_head=None, check_opened=None, max_bytes: int | None = None) -> bytes:
    """The bytes of archive file ``rel`` (a path as ``discover`` returns it) under ``root``: the one
    way scoring, training and the benchmark read an input. A failure is a ``TransientError`` whose
    one-line message goes into that file's row (or the list of skipped training images).
    ``check_head(first 132 bytes)`` may raise a DecodeError before the rest is read: a 2 GB
    extensionless file that is not DICOM costs one small read, not 2 GB. ``max_bytes``: a file that
    grew past the cap after it was listed (or whose size the manifest did not give) is refused
    after reading one byte more than the cap, never read whole. ``check_opened(file)`` runs on the
    opened file before any byte is read (discover.opened_outside judges where it really is)."""
    limit = -1 if max_bytes is None else max_bytes + 1
    # Every OSError here is the environment's, not the file's (a decoder's own OSError, such as
    # Pillow's "image file is truncated", comes later and is a DecodeError): a permission can be
    # fixed, a remounted share comes back, S3 throttling passes. So all of them are transient.
    try:
        with open_file(root, rel) as f:
            if check_opened:
                check_opened(f)
            head = f.read(132) if check_head else b""
            if check_head:
                check_head(head)
            data = head + f.read(limit - len(head) if limit >= 0 else None)
    except PermissionError:
        raise TransientError("unreadable file: permission denied") from None
    except FileNotFoundError:
        raise TransientError("file vanished after it was listed") from None
    except OSError as e:
        raise TransientError(f"unreadable file: {one_line(e, 160)}") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise DecodeError(too_big(max_bytes))
    return data


def too_big(max_bytes: int) -> str:
    return f"file larger than --max-bytes {max_bytes:,}: not read (raise --max-bytes to score it)"


def open_file(root: str, rel: str, *, random_access: bool = False):
    """Archive file ``rel`` under ``root``, opened for reading (``read_file`` reads it whole;
    ``random_access`` for a header read that seeks past what it does not need). Errors are OSErrors,
    and ``NotRegularFile`` for a local path that is a FIFO, socket, device or folder."""
    fs, base = resolve(root)
    if isinstance(fs, pafs.LocalFileSystem):  # Python's open takes the non-UTF-8 names that pyarrow refuses
        return open_regular(local_path(base, rel))
    path = f"{base}/{rel}"
    return fs.open_input_file(path) if random_access else fs.open_input_stream(path)


_KINDS = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISDIR, "folder"), (stat.S_ISSOCK, "socket"),
          (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))


def open_regular(path: str):
    """A local file opened for reading, refused unless it is a regular file. The open is non-blocking:
    a FIFO (named in a manifest, or swapped in after the listing) would otherwise wait for a writer
    forever. The type is judged on the opened descriptor, so a swap after a check cannot slip by."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ENXIO:  # what opening a socket gives
            _refuse_irregular(os.stat(path).st_mode)
        raise
    try:
        _refuse_irregular(os.fstat(fd).st_mode)
        os.set_blocking(fd, True)  # no effect on a regular file's reads; set back so no reader meets EAGAIN
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _refuse_irregular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "special file")
        raise NotRegularFile(f"not a regular file ({kind}): not read")


def text_name(name: str) -> str:
    """A local file name as text that any UTF-8 writer takes: os.scandir gives undecodable bytes as
    lone surrogates, and those become ``\\xNN`` escapes here (``local_path`` undoes it)."""
    if name.isascii():  # nearly every name: skip the encode (listing 10 M names calls this 10 M times)
        return name
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


def local_path(root: str, rel: str) -> str:
    """The file behind a path ``discover`` returned for a local archive (undoes ``text_name``). Only
    the escapes ``text_name`` makes are undone: bytes 0x80-0xff, which no UTF-8 decoder takes alone.
    An escaped ".", "/" or NUL is left as it is, so an escape cannot spell a way out of the archive."""
    path = os.path.join(root, rel)
    if "\\x" in rel and not os.path.lexists(path):
        raw = re.sub(rb"\\x([89a-f][0-9a-f])", lambda m: bytes([int(m[1], 16)]), rel.encode("utf-8"))
        path = os.path.join(root, os.fsdecode(raw))
    return path


def write_bytes_atomic(uri: str, data: bytes, *, durable: bool = False, before_rename=None) -> None:
    """Readers never see a half-written file: local writes go to a hidden temp name in the same
    folder and are renamed over the target (atomic on POSIX); an S3 PUT is atomic by itself.
    ``durable`` (result parts): the data is fsynced before the rename and the folder after it, so a
    power loss leaves the old file or the whole new one, never a renamed empty one (a rename can
    reach the disk before the data it names). ``before_rename()`` runs right before the file takes its
    name (the rename, or the PUT): a lease's fencing check, as close to the publish as it can be."""
    fs, path = resolve(uri)
    parent = posixpath.dirname(path) if is_uri(uri) else os.path.dirname(path)
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        try:
            if before_rename:
                before_rename()
        except BaseException:
            os.unlink(tmp)
            raise
        os.replace(tmp, path)
        if durable:
            fsync_dir(parent)
    else:
        if before_rename:
            before_rename()
        with fs.open_output_stream(path) as f:
            f.write(data)


def fsync_dir(folder: str) -> None:
    """Make the names in a local folder (a rename into it) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rename(src: str, dst: str) -> None:
    """Move a file within one filesystem (on object storage: a copy, then a delete)."""
    fs, a = resolve(src)
    _, b = resolve(dst)
    if isinstance(fs, pafs.LocalFileSystem):
        os.replace(a, b)
    else:
        fs.move(a, b)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def list_dir(uri: str) -> list[str]:
    """Names (not paths) of the entries directly inside a folder; [] when it does not exist."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return [posixpath.basename(i.path) for i in fs.get_file_info(pafs.FileSelector(path))]
