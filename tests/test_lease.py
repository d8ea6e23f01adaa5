"""One writer per output: the lease on --out, locally and on a real loopback S3 server, with real
processes (a holder killed with SIGKILL) and real races (threads released by one barrier); no Ray."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pytest

from cxr_batch.archive.lease import LEASE_FILE, LOCK_FILE, Lease, LeaseHeld, LeaseLost, read_holder
from cxr_batch.archive.results import SCHEMA, PartWriter, part_files

import s3proxy
import s3server
from s3server import BUCKET

HOLDER = """
import sys, time
real_time = time.time
time.time = lambda: real_time() + float(sys.argv[3])  # this host's wall clock, set wrong by that much
from cxr_batch.archive.lease import Lease
Lease(sys.argv[1], run_id="deadbeef", timeout_s=float(sys.argv[2])).acquire()
print("holding", flush=True)
time.sleep(600)
"""


def hold_in_process(out: str, timeout_s: float, clock_off_s: float = 0) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, out, str(timeout_s), str(clock_off_s)], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "holding"
    return p


@pytest.fixture(scope="module")
def s3():
    with s3server.s3_server() as env, pytest.MonkeyPatch.context() as mp:
        mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        for k, v in env.items():
            mp.setenv(k, v)
        yield env


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "results")
    request.getfixturevalue("s3")
    return f"s3://{BUCKET}/lease-{request.node.name.split('[')[0]}-{time.monotonic_ns()}"


def test_a_second_run_is_refused_with_the_holder_and_since_when(out):
    with Lease(out, run_id="run1", settle_s=0.2):
        with pytest.raises(LeaseHeld) as e:
            Lease(out, run_id="run2", settle_s=0.2).acquire()
        message = str(e.value)
        assert f"--out {out} is in use by another cxr-batch run: run run1 (pid {os.getpid()} on host" in message
        assert re.search(r"started 20\d\d-\d\d-\d\dT[0-9:]+Z, last heartbeat [0-9] s ago\.", message), message
        assert "\n" not in message
    Lease(out, run_id="run3", settle_s=0.2).acquire().release()  # released at the end: free again
    assert read_holder(out) is None
    if "://" not in out:
        assert os.listdir(out) == []  # nothing left behind beside the parts


def killed_holder(out: str, timeout_s: float, clock_off_s: float = 0) -> None:
    holder = hold_in_process(out, timeout_s, clock_off_s)
    holder.send_signal(signal.SIGKILL)  # dies without releasing
    holder.wait()


def as_if_elsewhere(out: str) -> None:
    """Make the lease look like another node's: its process cannot be looked at from here."""
    record = read_holder(out)
    record["holder"].update(host="node-7", boot_id="another-kernel")
    with open(os.path.join(out, LEASE_FILE), "w") as f:
        json.dump(record, f)


def test_a_dead_holder_on_this_machine_is_taken_over_at_once(tmp_path):
    out = str(tmp_path / "results")
    killed_holder(out, timeout_s=120)
    with Lease(out, run_id="next"):  # its process is gone: no need to wait 120 s
        assert read_holder(out)["holder"]["run_id"] == "next"


def test_a_dead_holder_elsewhere_is_taken_over_after_its_timeout(tmp_path):
    out = str(tmp_path / "results")
    killed_holder(out, timeout_s=3)
    as_if_elsewhere(out)
    with pytest.raises(LeaseHeld, match="run deadbeef .* on host node-7.* taken over 3 s after its last heartbeat"):
        Lease(out, run_id="next").acquire()
    time.sleep(3.5)
    with Lease(out, run_id="next"):
        assert read_holder(out)["holder"]["run_id"] == "next"


def test_a_live_holder_keeps_its_lease_past_the_timeout(tmp_path):
    out = str(tmp_path / "results")
    holder = hold_in_process(out, timeout_s=1)  # heartbeat every 0.2 s
    try:
        time.sleep(2.5)
        with pytest.raises(LeaseHeld, match="run deadbeef"):
            Lease(out, run_id="next").acquire()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("server", ["conditional", "ignore-conditions", "refuse-conditions"])
def test_racing_runs_on_s3_never_both_win(s3, server, monkeypatch):
    """With conditional writes (moto honours If-None-Match and If-Match) the race is settled by the
    server, with no wait at all; a server that ignores or refuses them (a proxy in front of moto)
    gets the older write-wait-read protocol, and the lease says so."""
    proxy = contextlib.nullcontext(s3) if server == "conditional" else s3proxy.s3_proxy(s3, server)
    with proxy as env:
        monkeypatch.setenv("AWS_ENDPOINT_URL", env["AWS_ENDPOINT_URL"])
        for round_ in range(3):
            out = f"s3://{BUCKET}/race-{server}-{round_}"
            barrier, results = threading.Barrier(4), {}

            def run(i):
                barrier.wait()
                try:
                    results[i] = Lease(out, run_id=f"r{i}", settle_s=0 if server == "conditional" else 2.0).acquire()
                except LeaseHeld as e:
                    results[i] = e

            threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            winners = [r for r in results.values() if isinstance(r, Lease)]
            assert len(winners) == 1, results
            assert read_holder(out)["holder"]["run_id"] == winners[0].run_id
            note = winners[0].note
            if server == "conditional":
                assert note is None
            else:
                assert note.startswith(f"lease on --out {out}: it {server.split('-')[0]}") and "read back" in note, note
            winners[0].release()
            assert read_holder(out) is None and not [k for k in s3server.keys(s3, out[len(f"s3://{BUCKET}/"):])
                                                     if ".probe-" in k]  # no scratch object left


def test_an_s3_endpoint_answering_500_at_start_up_is_one_line_and_says_run_again(s3, tmp_path):
    from cxr_batch.errors import EXIT_INCOMPLETE

    with s3proxy.s3_proxy(s3, "500") as env:
        cmd = [sys.executable, "-m", "cxr_batch.cli", "score", f"s3://{BUCKET}/archive", "--out", str(tmp_path / "out"),
               "--model", "resnet18:none", "--engine", "local"]
        p = subprocess.run(cmd, env=s3server.subprocess_env(env), capture_output=True, text=True, timeout=300)
    assert p.returncode == EXIT_INCOMPLETE, p.stderr[-3000:]
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: storage error: "), p.stderr[-3000:]
    assert "500" in lines[0] and lines[0].endswith("run the same command again (it resumes).")


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_racing_local_runs_never_both_win(tmp_path, stale):
    for round_ in range(10):  # a race is lost only now and then: run it often
        out, barrier, results = str(tmp_path / f"results{round_}"), threading.Barrier(8), []
        if stale:  # all eight find a dead holder's lease and try to take it over at once
            os.makedirs(out)
            with open(os.path.join(out, LEASE_FILE), "w") as f:
                json.dump({"holder": {"run_id": "dead"}, "heartbeat_s": time.time() - 600, "timeout_s": 0.5,
                           "token": "old"}, f)

        def run(i):
            barrier.wait()
            try:
                results.append(Lease(out, run_id=f"r{i}").acquire())
            except LeaseHeld:
                pass

        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 1, f"round {round_}: {len(results)} winners"
        assert read_holder(out)["holder"]["run_id"] == results[0].run_id
        results[0].release()


def test_a_holder_that_lost_its_lease_publishes_nothing_more(out):
    lease = Lease(out, run_id="mine", timeout_s=1.2, settle_s=0.2).acquire()
    writer = PartWriter(out, {"model_id": "m"}, rows_per_part=1, run="0000beef", before_publish=lease.check)
    writer.add(pa.Table.from_pylist([{"path": "a.png", "model": "m"}], schema=SCHEMA))
    assert len(part_files(out)) == 1
    # Another run takes the lease over (as after this one stalled past its timeout). On S3 a heartbeat
    # racing with the thief's write can overwrite it; a real thief then re-reads and gives up, so
    # here the thief keeps writing until the holder has noticed.
    from cxr_batch.archive import storage

    record = read_holder(out)
    record.update(token="someone-else", holder={"run_id": "thief", "pid": 1, "host": "h"})
    deadline = time.monotonic() + 15
    while not lease.lost and time.monotonic() < deadline:  # a heartbeat (every timeout/6 s) notices
        storage.write_bytes_atomic(storage.join(out, LEASE_FILE), json.dumps(record).encode())
        time.sleep(0.1)
    with pytest.raises(LeaseLost, match="lost its lease on --out .* now held by run thief"):
        writer.add(pa.Table.from_pylist([{"path": "b.png", "model": "m"}], schema=SCHEMA))
    assert len(part_files(out)) == 1
    lease.release()
    assert read_holder(out)["holder"]["run_id"] == "thief"  # the loser does not delete the winner's lease


def test_a_dead_holder_whose_clock_ran_ahead_cannot_keep_its_lease(tmp_path):
    """Its heartbeat lies an hour in this host's future: judged on this process's own clock (unchanged
    for a full timeout), not by comparing the two wall clocks."""
    out = str(tmp_path / "results")
    killed_holder(out, timeout_s=2, clock_off_s=3600)
    as_if_elsewhere(out)
    t0 = time.monotonic()
    with Lease(out, run_id="next"):
        assert read_holder(out)["holder"]["run_id"] == "next"
    assert time.monotonic() - t0 >= 2  # watched for the dead holder's full timeout first


def test_a_live_holder_whose_clock_runs_behind_keeps_its_lease(tmp_path):
    """Its heartbeats look an hour old on this host's clock, yet they keep changing: a live lease."""
    out = str(tmp_path / "results")
    holder = hold_in_process(out, timeout_s=2, clock_off_s=-3600)
    try:
        as_if_elsewhere(out)  # a live holder rewrites this within a heartbeat, and is still watched as one
        for _ in range(2):
            with pytest.raises(LeaseHeld, match="run deadbeef"):
                Lease(out, run_id="next").acquire()
        assert read_holder(out)["holder"]["run_id"] == "deadbeef"
    finally:
        holder.kill()
        holder.wait()


def test_a_paused_holder_publishes_nothing_after_its_lease_was_taken_over(tmp_path):
    """SIGSTOP a scoring run past its lease timeout, let a second run take over and finish, SIGCONT the
    first: it stops before publishing another part, with one line and exit 3, and the output has
    one row per listed file."""
    from cxr_batch.archive.results import read_table
    from cxr_batch.errors import EXIT_INCOMPLETE
    from cxr_batch.synth.archive import make_archive

    root, out = tmp_path / "archive", tmp_path / "out"
    make_archive(root, n_train=0, n_val=0, n_test=80, size=96, seed=5)
    expected = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpeg"))
    cmd = [sys.executable, "-m", "cxr_batch.cli", "score", str(root), "--out", str(out), "--model", "resnet18:none",
           "--engine", "local", "--batch-size", "4", "--rows-per-part", "4", "--no-cams", "--lease-timeout", "3"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    while not part_files(str(out)) and time.monotonic() < deadline:
        assert first.poll() is None, first.communicate()
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGSTOP)  # the run and its decode pool: paused, as by a VM pause
    try:
        time.sleep(3.5)  # past its timeout by the wall clock too: the second run watches, then takes over
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert second.returncode == 0, second.stderr[-3000:]
        # Its heartbeat would notice the takeover on waking; make that refresh hang (as on a hung mount)
        # by holding the lock it takes: only the check before each publish can stop the first run now.
        lock = open(out / LOCK_FILE, "w")
        fcntl.flock(lock, fcntl.LOCK_EX)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    time.sleep(3)  # time enough to publish a part or two, had it not checked
    lock.close()
    _, err = first.communicate(timeout=300)
    assert first.returncode == EXIT_INCOMPLETE, err[-3000:]
    assert "lost its lease on --out" in err and "Traceback" not in err, err[-3000:]
    paths = read_table(str(out))["path"].to_pylist()
    assert sorted(paths) == expected  # one row per file: nothing published after the takeover
    assert read_holder(str(out)) is None  # and the loser did not leave or delete a lease
    os.unlink(out / LOCK_FILE)


def test_on_s3_a_write_based_on_an_old_read_is_refused_by_the_server(s3):
    """The slow PUT of the old protocol: a rival read the lease, the holder renewed it, then the
    rival's write arrives. With If-Match the server refuses it; so does If-None-Match a second create."""
    from cxr_batch.archive.lease_store import S3Store

    out = f"s3://{BUCKET}/slow-put-{time.monotonic_ns()}"
    lease = Lease(out, run_id="holder", timeout_s=60).acquire()
    try:
        rival = S3Store(out, LEASE_FILE, 0)
        rival.probe()
        assert rival.conditional and rival.read()["token"] == lease.token
        lease.refresh()
        assert not rival.replace(b'{"token": "rival"}') and not rival.create(b'{"token": "rival"}')
        assert read_holder(out)["token"] == lease.token
    finally:
        lease.release()
