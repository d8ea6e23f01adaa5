"""One writer per output: a run holds a lease on ``--out`` while it writes there (and scoring one on
its CAM folder too, which two outputs can share); so does training on its ``--out``.

The lease is a small JSON file, ``<out>/_cxr_batch_lease.json`` (the leading "_" keeps Parquet
readers from taking it for data): holder host, pid, run id, when it started, its last heartbeat,
and the timeout it promises to keep. The holder rewrites the heartbeat every ``timeout_s / 6``
seconds from a thread and checks each time that the file is still its own. A second run is refused
(``LeaseHeld``, one line naming the holder). On the holder's own machine a dead holder is
recognised at once (its process is gone), so a re-run right after a crash or kill -9 proceeds
without waiting.

Staleness is judged on the reader's own monotonic clock, never by comparing two hosts' wall clocks:
a lease is taken over only after its token and heartbeat stayed unchanged for the holder's full
timeout while this run watched. The written wall-clock heartbeat serves one purpose: a lease that
looks fresh by it is refused at once instead of watched (a live holder would change it within
``timeout_s / 6``). One that looks old, or lies in this host's future, is watched for a timeout. So
a host whose clock is ahead cannot keep a dead lease alive, nor one behind take a live one; a dead
holder on another machine is taken over one to two timeouts after its last heartbeat.

Fencing: a holder publishes (``check()`` before each part, rewrite and summary) only while its last
confirmed refresh, on its monotonic clock, is younger than half the timeout; past that, ``check``
refreshes first and raises ``LeaseLost`` if the lease is no longer its own. A holder that was paused
(SIGSTOP, a VM pause, a refresh blocked on a hung mount) past its timeout therefore stops before
publishing anything more, while a taker waits a full timeout: the half left over covers the
publish itself.

Writes (lease_store.py): locally ``O_EXCL`` and an ``flock``; on S3 conditional writes
(``If-None-Match: *`` to create, ``If-Match: <ETag>`` to renew or take over). Where an S3 server
refuses or ignores them, a run writes its lease, waits ``settle_s`` and reads it back (the one whose
write landed last wins); two runs then both win only if one paused for longer than ``settle_s``
between finding the lease free and writing it, and the loser stops at its next refresh. ``note``
says when that older protocol is in use.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid

from . import storage
from .lease_store import DEFAULT_TIMEOUT_S, LocalStore, S3Store
from ..errors import EXIT_INCOMPLETE, CxrError, InputError, one_line

LEASE_FILE = "_cxr_batch_lease.json"
LOCK_FILE = "_cxr_batch_lease.lock"
SETTLE_S = 2.0  # object storage without conditional writes: wait before reading our write back


class LeaseHeld(InputError):
    """Another run holds the lease on this --out."""


class LeaseLost(CxrError):
    """This run's lease was taken over (it stalled past the timeout, or a racing run won). What it
    published stays, so a re-run resumes."""

    exit_code = EXIT_INCOMPLETE


class Lease:
    """``with Lease(out, run_id=...) as lease:`` this run is the only writer of ``out`` inside;
    call ``lease.check()`` right before publishing anything."""

    def __init__(self, out: str, *, run_id: str, timeout_s: float = DEFAULT_TIMEOUT_S, settle_s: float = SETTLE_S,
                 details: dict | None = None, option: str = "--out"):
        self.out, self.run_id, self.timeout_s = out, run_id, float(timeout_s)
        self.where = f"{option} {out}"  # what the messages name: the option the user gave this folder with
        self.store = _store(out, settle_s)
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self.details = details or {}
        self.holder = {**_process_identity(), "run_id": run_id}  # this process's: the same at every heartbeat
        self.lost: str | None = None
        self.beat = 0  # changes at every write, whatever the wall clock does
        self.confirmed = float("-inf")  # monotonic time before the last refresh that found the lease ours
        self._refreshing = threading.Lock()  # the heartbeat and check() never race each other's If-Match
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def note(self) -> str | None:
        """Why this lease uses the older write-wait-read protocol (None when it does not)."""
        return self.store.note and f"lease on {self.where}: {self.store.note}; used write, wait, read back instead"

    def _record(self) -> bytes:
        import json

        now = time.time()
        self.beat += 1
        return json.dumps({
            "holder": self.holder,
            "started": _iso(self.started), "heartbeat": _iso(now), "started_s": self.started, "heartbeat_s": now,
            "beat": self.beat, "timeout_s": self.timeout_s, "token": self.token, **self.details}, indent=1).encode()

    def acquire(self) -> "Lease":
        self._made_dir = not storage.is_uri(self.out) and not os.path.isdir(self.out)
        storage.makedirs(self.out)
        if isinstance(self.store, S3Store):
            self.store.probe()
        for _ in range(5):  # a lease that changed hands or vanished between two steps: look again
            seen = self.store.read()
            if seen is not None:
                self._wait_until_stale(seen)
            sent = time.monotonic()
            with self.store.mutex(self.timeout_s):
                current = self.store.read()
                if current is not None and (seen is None or not _same(current, seen)):
                    continue  # someone else wrote meanwhile: judge the new record
                written = self.store.create(self._record()) if current is None else self.store.replace(self._record())
            if not written:
                continue
            winner = self.store.settle_and_read()
            if winner is not None and winner.get("token") != self.token:
                raise LeaseHeld(_held_message(self.where, winner))
            self.confirmed = sent
            self._thread = threading.Thread(target=self._heartbeat, name="cxr-batch-lease", daemon=True)
            self._thread.start()
            return self
        raise LeaseHeld(f"{self.where}: could not take the lease (it changed hands 5 times); try again.")

    def _wait_until_stale(self, record: dict) -> None:
        """Return once ``record`` may be taken over (its holder died here, or it stayed unchanged for its
        timeout on this process's monotonic clock, or it was released); ``LeaseHeld`` when it is live."""
        if _dead_here(record.get("holder") or {}):
            return
        timeout = float(record.get("timeout_s", DEFAULT_TIMEOUT_S))
        age = time.time() - float(record.get("heartbeat_s", 0))
        if 0 <= age <= timeout:  # fresh by the wall clock: a live holder, or one just dead; either way not ours
            raise LeaseHeld(_held_message(self.where, record))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, max(0.1, timeout / 12)))  # twice per heartbeat of a live holder
            now = self.store.read()
            if now is None:
                return
            if not _same(now, record):
                raise LeaseHeld(_held_message(self.where, now))

    def refresh(self) -> None:
        """Rewrite the heartbeat; ``LeaseLost`` if the lease is no longer ours."""
        with self._refreshing:
            sent = time.monotonic()
            with self.store.mutex(self.timeout_s):
                current = self.store.read()
                if current is None or current.get("token") != self.token or not self.store.replace(self._record()):
                    raise LeaseLost(_lost_message(self.where, current if current is None else self.store.read()))
            self.confirmed = max(self.confirmed, sent)

    def check(self) -> None:
        """Raise ``LeaseLost`` unless this run may publish now: its last confirmed refresh is younger
        than half the timeout (after one refresh here, if it was not)."""
        if self.lost:
            raise LeaseLost(self.lost)
        if time.monotonic() - self.confirmed < self.timeout_s / 2:
            return
        try:
            self.refresh()
        except LeaseLost as e:
            self.lost = str(e)
            raise
        except OSError as e:
            raise LeaseLost(f"{self.where}: could not confirm this run's lease ({one_line(e, 120)}), so it stopped"
                            " before publishing more. Re-run to resume.") from None
        if time.monotonic() - self.confirmed >= self.timeout_s / 2:  # the refresh itself took that long
            raise LeaseLost(f"{self.where}: confirming this run's lease took longer than half its timeout, so it"
                            " stopped before publishing more (storage too slow?). Re-run to resume.")

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self.lost:
            return
        with contextlib.suppress(OSError), self.store.mutex(self.timeout_s):
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
        while not self._stop.wait(interval):
            try:
                self.refresh()
            except LeaseLost as e:
                self.lost = str(e)
                return
            except OSError as e:  # storage briefly unreachable: try again, but not past the timeout
                if time.monotonic() - self.confirmed > 0.75 * self.timeout_s:
                    self.lost = (f"{self.where}: could not refresh the lease for {time.monotonic() - self.confirmed:.0f}"
                                 f" s ({one_line(e, 120)}); another run may take it over, so this one stops.")
                    return


def read_holder(out: str) -> dict | None:
    """The current lease record of ``out`` (None when free): for messages and tests."""
    return _store(out, 0).read()


def _store(out: str, settle_s: float):
    return LocalStore(out, LEASE_FILE, LOCK_FILE) if not storage.is_uri(out) else S3Store(out, LEASE_FILE, settle_s)


def _same(a: dict, b: dict) -> bool:
    """The same version of a lease: a holder's every write changes its beat and heartbeat."""
    return all(a.get(k) == b.get(k) for k in ("token", "beat", "heartbeat_s"))


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
