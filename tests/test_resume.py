"""Crashes with real processes: `cxr-batch score` runs as its own process (a second driver on the
test session's Ray), is killed with SIGKILL mid-run, and is run again; in another run its model
actor (and, when the poll catches one, a decode task worker) is killed mid-run. What must hold: readers only ever see whole Parquet parts, a re-run finishes the job
with one row per file, every CAM PNG opens, and --overwrite starts over."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from cxr_batch.cli import main

pytestmark = pytest.mark.slow

N = 200  # phantoms of 128 px: 10-30 s of scoring on 2 CPUs, so a kill lands mid-run
PART = re.compile(r"^part-[0-9a-f]{8}-\d{5}\.parquet$")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    from cxr_batch.synth.archive import make_archive

    root = tmp_path_factory.mktemp("resume") / "archive"
    make_archive(root, n_train=0, n_val=0, n_test=N, size=128, seed=7)
    return root


@pytest.fixture(scope="module")
def address(ray_session):
    # Joining the session's Ray as a second driver: a second Ray on 2 CPUs would be slow to start.
    return ray_session.get_runtime_context().gcs_address


def command(archive, out, address) -> list[str]:
    # Parts of 20 rows: the first is published within seconds, long before the job ends.
    return [sys.executable, "-m", "cxr_batch.cli", "score", str(archive), "--out", str(out),
            "--model", "resnet18:none", "--batch-size", "8", "--rows-per-part", "20", "--address", address]


def start(cmd, log) -> subprocess.Popen:
    # Its own process group, so the kill takes the whole command, as a lost node or an OOM kill would.
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


# The first part comes within seconds on a quiet machine; one CI run on a machine slowed to a crawl (its
# package install alone took 10 minutes) waited 240 s in vain. Slowness is not a verdict: wait longer.
def wait_for_parts(out, proc, log, timeout=600, tick=lambda: None) -> None:
    deadline = time.monotonic() + timeout
    while not (out.is_dir() and any(PART.match(n) for n in os.listdir(out))):
        assert proc.poll() is None, f"exited ({proc.returncode}) before its first part:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no part file after {timeout} s:\n{log.read_text()}"
        tick()
        time.sleep(0.02)


def visible_files(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if not n.startswith((".", "_")))


def expected_paths(archive) -> set[str]:
    return {p.relative_to(archive).as_posix() for p in archive.rglob("*.jpeg")}


@pytest.fixture(scope="module")
def killed(archive, address, tmp_path_factory):
    """A run SIGKILLed, process group and all, soon after it published its first part."""
    root = tmp_path_factory.mktemp("killed")
    out, log = root / "results.parquet", root / "first-run.log"
    with log.open("wb") as f:
        proc = start(command(archive, out, address), f)
        try:
            wait_for_parts(out, proc, log)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL  # it was killed mid-run, it did not finish
    return dict(root=root, out=out, cam_dir=root / "results-cams", archive=archive, address=address)


@pytest.fixture(scope="module")
def resumed(killed):
    k = killed
    rows_before = pq.read_table(k["out"]).num_rows
    proc = subprocess.run(command(k["archive"], k["out"], k["address"]), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dict(k, rows_before=rows_before, stdout=proc.stdout)


def test_a_killed_run_leaves_only_whole_parts(killed):
    out = killed["out"]
    names = visible_files(out)
    assert names and all(PART.match(n) for n in names), names  # temp names are hidden: readers skip them
    for name in names:
        assert pq.read_table(out / name).num_rows > 0  # each one whole
    table = pq.read_table(out)  # and the folder reads as one table
    paths = table.column("path").to_pylist()
    assert 0 < len(paths) < N and len(paths) == len(set(paths))


def test_rerun_resumes_and_ends_with_one_row_per_file(resumed):
    assert f"{resumed['rows_before']:,} already in the output (resumed)" in resumed["stdout"]
    table = pq.read_table(resumed["out"])
    paths = table.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == N
    assert set(paths) == expected_paths(resumed["archive"])
    assert table.column("error").null_count == N


def test_every_cam_png_is_whole(resumed):
    rows = pq.read_table(resumed["out"]).to_pylist()
    for r in rows:
        with Image.open(r["cam_path"]) as im:
            im.load()  # a torn PNG fails here
    pngs = [os.path.join(d, f) for d, _, files in os.walk(resumed["cam_dir"]) for f in files if not f.startswith(".")]
    assert sorted(pngs) == sorted(r["cam_path"] for r in rows)


def test_overwrite_starts_over(resumed, ray_session, tmp_path):
    out, cams = tmp_path / "results.parquet", tmp_path / "results-cams"
    shutil.copytree(resumed["out"], out)
    shutil.copytree(resumed["cam_dir"], cams)
    old_parts = set(visible_files(out))
    r = CliRunner().invoke(main, ["score", str(resumed["archive"]), "--out", str(out), "--model", "resnet18:none",
                                  "--overwrite", "--limit", "40"])
    assert r.exit_code == 0, r.output
    assert "resumed" not in r.output
    assert not old_parts & set(visible_files(out))
    assert pq.read_table(out).num_rows == 40  # the old rows are gone, not kept beside the new ones
    assert sum(len(files) for _, _, files in os.walk(cams)) == 40


def ours(pid: int, title: str, address: str) -> bool:
    """Is ``pid`` a worker of this test's Ray whose process title starts with ``title``? Ray titles a
    worker "ray::<task or actor>", and the raylet of the GCS at ``address`` is among its ancestors:
    other developers' Rays on this machine, and pids reused since we looked, are left alone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if not f.read().split(b"\0")[0].startswith(title.encode()):
                return False
        while pid > 1:
            with open(f"/proc/{pid}/status") as f:
                pid = int(re.search(r"^PPid:\s+(\d+)", f.read(), re.M)[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f"--gcs-address={address}".encode() in f.read():
                    return True
    except OSError:
        pass  # the process ended while we looked
    return False


def workers(title: str, address: str) -> list[int]:
    """Pids of this Ray's workers whose title starts with ``title``, read from /proc at once (Ray's
    state API can lag by seconds on a loaded machine, and psutil is not installed)."""
    return [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if ours(pid, title, address)]


class DecodeKiller:
    """Kills the first decode task worker it sees, once. Decoding 200 small files is brief, so a
    poll can miss it: the actor kill is the part of the test that always happens."""

    def __init__(self, address: str):
        self.address, self.killed = address, None

    def __call__(self):
        # The title is "ray::MapBatches(decode_batch)" only while the worker runs that task.
        for pid in [] if self.killed else workers("ray::MapBatches(decode_batch)", self.address)[:1]:
            os.kill(pid, signal.SIGKILL)  # Ray Data tasks retry (max_retries=-1)
            self.killed = pid


def test_job_survives_the_loss_of_its_model_actor(archive, address, tmp_path):
    out, log = tmp_path / "results.parquet", tmp_path / "run.log"
    kill_decoder = DecodeKiller(address)
    with log.open("wb") as f:
        proc = start(command(archive, out, address), f)
        try:
            # Ray titles the actor "...(Scorer)).submit" while it runs a batch: kill it then.
            deadline = time.monotonic() + 240
            while not (actors := workers("ray::MapWorker(MapBatches(Scorer)).submit", address)):
                assert proc.poll() is None, f"exited ({proc.returncode}) before its model ran:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"the model actor never ran a batch:\n{log.read_text()}"
                kill_decoder()
                time.sleep(0.02)
            for pid in actors:  # (one, unless an earlier test's job is still being cleaned up)
                os.kill(pid, signal.SIGKILL)  # Ray Data restarts the actor and retries its batches
            assert proc.poll() is None  # the job was still running when its actor died
            assert proc.wait(timeout=900) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    table = pq.read_table(out)
    paths = table.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == N
    assert table.column("error").null_count == N
    assert "already in the output" not in log.read_text()  # one run did it all
    print(f"decode worker killed: {kill_decoder.killed or 'none seen'}")
