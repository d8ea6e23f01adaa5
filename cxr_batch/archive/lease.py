"""One writer per output: a run holds a lease on ``--out`` while it writes there (and scoring one on
its CAM folder too, which two outputs can share).

The lease is a small JSON file, ``<out>/_cxr_batch_lease.json`` (the leading "_" keeps Parquet
readers from taking it for data): holder host, pid, run id, when it started, its last heartbeat,
and the timeout it promises to keep. The holder rewrites the heartbeat every ``timeout_s / 6``
seconds from a thread and checks each time that the file is still its own. A second run is refused
(``LeaseHeld``, one line naming the holder); a lease whose heartbeat is older than the timeout the
holder declared (default 120 s) belonged to a run that died, and the next run takes it over. On the
holder's own machine a dead holder is recognised at once (its process is gone), so a re-run right
after a crash or kill -9 proceeds without waiting.

Local and NFS folders: the file is created with ``O_EXCL`` (one creator wins), and every
read-modify-write (refresh, takeover, release) happens under an ``flock`` of
``_cxr_batch_lease.lock``, held for milliseconds; the new content replaces the old by rename, so
a reader never sees half a file. A process that dies holding the flock loses it with its file
descriptors. Release removes both files.

Object storage (S3) has no exclusive create through pyarrow and no locks. A run writes its lease,
waits ``settle_s`` (2 s), and reads it back: of two runs that both found the lease free or stale,
the one whose write landed last wins, and the other sees that and is refused. Every refresh reads
first and gives up when the lease is no longer its own. Two runs both win only if one of them
paused for longer than ``settle_s`` between finding the lease free and writing it; the loser then
notices on its next refresh (at most ``timeout_s / 6`` later) and stops before publishing anything
more (``check`` raises ``LeaseLost``).

Clocks: the heartbeat is the holder's wall clock, compared with the reader's. Hosts whose clocks
differ by more than a fraction of the timeout (NTP keeps them within milliseconds) would misjudge
staleness.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid

from . import storage
from ..errors import CxrError, InputError, one_line

LEASE_FILE = "_cxr_batch_lease.json"
LOCK_FILE = "_cxr_batch_lease.lock"
DEFAULT_TIMEOUT_S = 120.0  # a holder silent this long is taken for dead; it refreshes 6 times as often
SETTLE_S = 2.0  # object storage: wait before reading our write back (see the module doc)


class LeaseHeld(InputError):
    """Another run holds the lease on this --out."""


class LeaseLost(CxrError):
    """This run's lease was taken over (it stalled past the timeout, or a racing run won)."""


class Lease:
    """``with Lease(out, run_id=...) as lease:`` this run is the only writer of ``out`` inside;
    call ``lease.check()`` before publishing anything."""

    def __init__(self, out: str, *, run_id: str, timeout_s: float = DEFAULT_TIMEOUT_S, settle_s: float = SETTLE_S,
                 details: dict | None = None, option: str = "--out"):
        self.out, self.run_id, self.timeout_s = out, run_id, float(timeout_s)
        self.where = f"{option} {out}"  # what the messages name: the option the user gave this folder with
        self.store = _LocalStore(out) if not storage.is_uri(out) else _ObjectStore(out, settle_s)
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self.details = details or {}
        self.holder = {**_process_identity(), "run_id": run_id}  # this process's: the same at every heartbeat
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the holder's record

    def _record(self) -> bytes:
        now = time.time()
        return json.dumps({
            "holder": self.holder,
            "started": _iso(self.started), "heartbeat": _iso(now), "started_s": self.started, "heartbeat_s": now,
            "timeout_s": self.timeout_s, "token": self.token, **self.details}, indent=1).encode()

    def acquire(self) -> "Lease":
        self._made_dir = not storage.is_uri(self.out) and not os.path.isdir(self.out)
        storage.makedirs(self.out)
        for _ in range(5):  # a lease that vanished (released) between two steps: look again
            with self.store.mutex():
                current = self.store.read()
                if current is not None and not _stale(current):
                    raise LeaseHeld(_held_message(self.where, current))
                written = self.store.create(self._record()) if current is None else self.store.replace(self._record())
            if not written:
                continue
            winner = self.store.settle_and_read()
            if winner is not None and winner.get("token") != self.token:
                raise LeaseHeld(_held_message(self.where, winner))
            self._thread = threading.Thread(target=self._heartbeat, name="cxr-batch-lease", daemon=True)
            self._thread.start()
            return self
        raise LeaseHeld(f"{self.where}: could not take the lease (it changed hands 5 times); try again.")

    def refresh(self) -> None:
        """Rewrite the heartbeat; ``LeaseLost`` if the lease is no longer ours."""
        with self.store.mutex():
            current = self.store.read()
            if current is None or current.get("token") != self.token:
                raise LeaseLost(_lost_message(self.where, current))
            self.store.replace(self._record())

    def check(self) -> None:
        """Raise ``LeaseLost`` if the heartbeat thread found the lease taken over."""
        if self.lost:
            raise LeaseLost(self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self.lost:
            return
        with contextlib.suppress(OSError), self.store.mutex():
            current = self.store.read()
            if current is not None and current.get("token") == self.token:
                self.store.delete()  # and the lock file: a finished run leaves only its parts

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, exc_type, *exc) -> None:
        self.release()
        if exc_type is not None and getattr(self, "_made_dir", False):
            with contextlib.suppress(OSError):  # a run refused after the lease (a bad model) leaves no empty --out
                os.rmdir(self.out)  # only if empty: whatever was written stays

    def _heartbeat(self) -> None:
        interval = max(0.2, self.timeout_s / 6)
        last_ok = time.monotonic()
        while not self._stop.wait(interval):
            try:
                self.refresh()
                last_ok = time.monotonic()
            except LeaseLost as e:
                self.lost = str(e)
                return
            except OSError as e:  # storage briefly unreachable: try again, but not past the timeout
                if time.monotonic() - last_ok > 0.75 * self.timeout_s:
                    self.lost = (f"{self.where}: could not refresh the lease for {time.monotonic() - last_ok:.0f} s"
                                 f" ({one_line(e, 120)}); another run may take it over, so this one stops.")
                    return


def read_holder(out: str) -> dict | None:
    """The current lease record of ``out`` (None when free): for messages and tests."""
    store = _LocalStore(out) if not storage.is_uri(out) else _ObjectStore(out, 0)
    return store.read()


def _stale(record: dict) -> bool:
    """No heartbeat for the holder's timeout, or a holder on this machine whose process is gone."""
    if time.time() - float(record.get("heartbeat_s", 0)) > float(record.get("timeout_s", DEFAULT_TIMEOUT_S)):
        return True
    return _dead_here(record.get("holder") or {})


def _process_identity() -> dict:
    """Who holds the lease: host and pid for people; the kernel's boot id, the pid namespace and the
    process's start time let a run on the same machine tell a dead holder from a live one at once
    (a re-run right after a kill -9 need not wait for the timeout), whatever pid reuse happened."""
    ident = {"host": socket.gethostname(), "pid": os.getpid()}
    with contextlib.suppress(OSError):
        with open("/proc/sys/kernel/random/boot_id") as f:
            ident["boot_id"] = f.read().strip()
        ident["pid_ns"] = os.readlink("/proc/self/ns/pid")
        ident["start_ticks"] = _start_ticks(os.getpid())
    return ident


def _start_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime; the name in (...) may hold spaces


def _dead_here(holder: dict) -> bool:
    """True only when the holder ran in this machine's pid namespace and its process is gone (or the
    pid now belongs to a process started later). Anything else: cannot tell, so not dead."""
    me = _process_identity()
    if not holder.get("start_ticks") or any(holder.get(k) != me.get(k) for k in ("host", "boot_id", "pid_ns")):
        return False
    try:
        return _start_ticks(int(holder["pid"])) != holder["start_ticks"]
    except (OSError, ValueError, KeyError):
        return True  # no such process


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _who(record: dict) -> str:
    h = record.get("holder", {})
    ago = time.time() - float(record.get("heartbeat_s", 0))
    return (f"run {h.get('run_id', '?')} (pid {h.get('pid', '?')} on host {h.get('host', '?')}), started"
            f" {record.get('started', '?')}, last heartbeat {ago:.0f} s ago")


def _held_message(where: str, record: dict) -> str:
    return (f"{where} is in use by another cxr-batch run: {_who(record)}. Wait for it to finish or choose another"
            f" {where.split()[0]}; if that run died, its lease is taken over {float(record.get('timeout_s', DEFAULT_TIMEOUT_S)):g} s"
            " after its last heartbeat.")


def _lost_message(where: str, record: dict | None) -> str:
    now = "nobody holds it now" if record is None else f"it is now held by {_who(record)}"
    return f"This run lost its lease on {where} ({now}); it stopped writing there. Re-run to resume."


class _LocalStore:
    def __init__(self, out: str):
        self.path, self.lock = os.path.join(out, LEASE_FILE), os.path.join(out, LOCK_FILE)

    @contextlib.contextmanager
    def mutex(self):
        import fcntl

        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            with contextlib.suppress(OSError):  # a filesystem without locks: O_EXCL and rename still hold
                fcntl.flock(fd, fcntl.LOCK_EX)
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
        return _parse(data, mtime)

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


class _ObjectStore:
    def __init__(self, out: str, settle_s: float):
        self.uri, self.settle_s = storage.join(out, LEASE_FILE), settle_s

    def mutex(self):
        return contextlib.nullcontext()

    def read(self) -> dict | None:
        import pyarrow.fs as pafs

        fs, path = storage.resolve(self.uri)
        for attempt in range(3):
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                return None
            try:
                with fs.open_input_stream(path) as f:
                    record = _parse(f.read(), info.mtime.timestamp() if info.mtime else 0.0)
            except FileNotFoundError:
                return None
            if record.get("token") or attempt == 2:
                return record
            # An S3-compatible server that is not atomic under a concurrent PUT (moto was seen to
            # return a damaged body) must not make a holder think its lease is gone: read again.
            time.sleep(0.2)

    def create(self, data: bytes) -> bool:
        storage.write_bytes_atomic(self.uri, data)
        return True

    replace = create

    def delete(self) -> None:
        fs, path = storage.resolve(self.uri)
        with contextlib.suppress(FileNotFoundError):
            fs.delete_file(path)

    def settle_and_read(self) -> dict | None:
        time.sleep(self.settle_s)
        return self.read()


def _parse(data: bytes, mtime: float) -> dict:
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
