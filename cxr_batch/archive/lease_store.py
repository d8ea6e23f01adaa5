"""Where a lease record lives: a local (or NFS) folder, or an object store (S3). lease.py decides
who holds a lease; these classes only read, create, replace and delete its file, each saying whether
a write landed. Storage errors are OSErrors, whichever client met them.

Local: ``create`` is an ``O_EXCL`` create, and ``mutex`` an ``flock`` of a lock file beside the
lease, held for milliseconds around each read-modify-write; ``replace`` renames a new file over the
old, so a reader never sees half a file.

S3: through boto3, with conditional writes where the server honours them: ``create`` sends
``If-None-Match: *`` (only one creator wins) and ``replace`` sends ``If-Match`` with the ETag of the
version last read (a write that raced ours is refused, not overwritten). Whether the server honours
them is probed once, on a scratch object beside the lease: a server may refuse the headers or
ignore them. Where it does not, every write lands and lease.py falls back to writing, waiting
``settle_s`` and reading back.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid

from . import storage

DEFAULT_TIMEOUT_S = 120.0


def parse(data: bytes, mtime: float) -> dict:
    """A lease record; a file that is not one (damaged, foreign) counts as a holder last seen at the
    file's modification time, so it blocks for one timeout and is then taken over."""
    try:
        record = json.loads(data)
        if isinstance(record, dict) and "token" in record:
            return record
    except ValueError:
        pass
    return {"holder": {"run_id": "unknown (unreadable lease file)"}, "heartbeat_s": mtime, "started": "?",
            "timeout_s": DEFAULT_TIMEOUT_S, "token": None}


class LocalStore:
    conditional = True  # O_EXCL and the flock make every write conditional
    note = None

    def __init__(self, out: str, lease_file: str, lock_file: str):
        self.path, self.lock = os.path.join(out, lease_file), os.path.join(out, lock_file)

    @contextlib.contextmanager
    def mutex(self, wait_s: float = DEFAULT_TIMEOUT_S):
        """The flock, waited for at most ``wait_s``: a holder paused while it held the flock (SIGSTOP, a
        VM pause) must not block every other run for good. Past that, go on without it, as on a
        filesystem without locks: O_EXCL and rename still hold."""
        import fcntl

        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.02)
                except OSError:
                    break
            yield
        finally:
            os.close(fd)  # releases the flock

    def read(self) -> dict | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
            mtime = os.stat(self.path).st_mtime
        except FileNotFoundError:
            return None
        return parse(data, mtime)

    def create(self, data: bytes) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    def replace(self, data: bytes) -> bool:
        storage.write_bytes_atomic(self.path, data)
        return True

    def delete(self) -> None:
        """Remove the lease, then the lock file (still holding its flock). A run blocked on the old
        lock file's flock then finds no lease and creates one with O_EXCL, as does a run that opens
        a new lock file meanwhile: O_EXCL lets only one of them win."""
        for path in (self.path, self.lock):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def settle_and_read(self) -> dict | None:
        return self.read()


class S3Store:
    def __init__(self, out: str, lease_file: str, settle_s: float):
        self.uri, self.settle_s = storage.join(out, lease_file), settle_s
        self.bucket, _, self.key = self.uri.removeprefix("s3://").partition("/")
        self.etag: str | None = None  # of the version last read or written: what If-Match names
        self.conditional: bool | None = None  # unknown until probe()
        self.note: str | None = None  # why the old protocol is used, for the run's summary

    def mutex(self, wait_s: float = 0):
        return contextlib.nullcontext()

    def _call(self, op: str, **kwargs):
        """One S3 request -> its response, or None when a condition refused it (412, or 409 for a
        conditional write that raced another). Every other failure is an OSError."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(storage.s3_client(), op)(Bucket=self.bucket, **kwargs)
        except ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in (412, 409):
                return None
            code = e.response.get("Error", {}).get("Code", "?")
            if code in ("NoSuchKey", "404"):
                raise FileNotFoundError(self.uri) from None
            raise OSError(f"S3 {op} of {self.uri}: HTTP {status} {code}: {e.response.get('Error', {}).get('Message', '')}"
                          ) from None
        except BotoCoreError as e:
            raise OSError(f"S3 {op} of {self.uri}: {e}") from None

    def probe(self) -> None:
        """Learn whether the server honours If-None-Match and If-Match on PUT (sets ``conditional``
        and, when not, ``note``), on a scratch object named like our other hidden files."""
        if self.conditional is not None:
            return
        scratch = f"{self.key}.probe-{uuid.uuid4().hex[:8]}"
        try:
            self.note = self._probe(scratch)
        finally:
            with contextlib.suppress(OSError):
                self._call("delete_object", Key=scratch)
        self.conditional = self.note is None

    def _probe(self, scratch: str) -> str | None:
        try:
            if self._call("put_object", Key=scratch, Body=b"{}", IfNoneMatch="*") is None:
                return "it refused a first If-None-Match write"
        except OSError as e:
            if not _refused(e):
                raise
            return f"it refused If-None-Match: {e}"
        try:
            if self._call("put_object", Key=scratch, Body=b"{}", IfNoneMatch="*") is not None:
                return "it ignored If-None-Match"
            if self._call("put_object", Key=scratch, Body=b"{}", IfMatch='"0"') is not None:
                return "it ignored If-Match"
        except OSError as e:
            if not _refused(e):
                raise
            return f"it refused If-Match: {e}"
        return None

    def read(self) -> dict | None:
        for attempt in range(3):
            try:
                r = self._call("get_object", Key=self.key)
                data = r["Body"].read()
            except FileNotFoundError:
                self.etag = None
                return None
            record = parse(data, r["LastModified"].timestamp())
            if record.get("token") or attempt == 2:
                self.etag = r["ETag"]
                return record
            # An S3-compatible server that is not atomic under a concurrent PUT (moto was seen to
            # return a damaged body) must not make a holder think its lease is gone: read again.
            time.sleep(0.2)

    def create(self, data: bytes) -> bool:
        extra = {"IfNoneMatch": "*"} if self.conditional else {}
        return self._put(data, extra)

    def replace(self, data: bytes) -> bool:
        extra = {"IfMatch": self.etag} if self.conditional and self.etag else {}
        return self._put(data, extra)

    def _put(self, data: bytes, extra: dict) -> bool:
        try:
            r = self._call("put_object", Key=self.key, Body=data, **extra)
        except FileNotFoundError:  # If-Match on a lease deleted meanwhile
            return False
        if r is None:
            return False
        self.etag = r.get("ETag")
        return True

    def delete(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._call("delete_object", Key=self.key)

    def settle_and_read(self) -> dict | None:
        if not self.conditional:
            time.sleep(self.settle_s)
        return self.read()


def _refused(e: OSError) -> bool:
    """A server's answer that it does not implement a conditional write (as opposed to a fault)."""
    text = str(e)
    return any(k in text for k in ("HTTP 501", "NotImplemented", "InvalidArgument", "InvalidRequest", "HTTP 400"))
