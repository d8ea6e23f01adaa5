"""Failures a real run meets, with real Ray workers and real files (issue 11): a folder that vanishes
in the middle of a run and comes back (an NFS remount), one that stays away until the next run, a
file that kills its decode worker, and a file over --max-bytes. After each, every listed file has
exactly one row, and the exit status tells the truth."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from cxr_batch.archive.results import read_table
from cxr_batch.cli import main
from cxr_batch.errors import EXIT_INCOMPLETE
from cxr_batch.jobs.runloop import POISON
from images import encode

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
FOLDERS, PER = ("a", "b", "c", "d"), 6


@pytest.fixture
def archive(tmp_path):
    root = tmp_path / "archive"
    for i, folder in enumerate(FOLDERS):
        (root / folder).mkdir(parents=True)
        for k in range(PER):
            im = Image.new("L", (48, 48), 40 * i + 5 * k)
            (root / folder / f"img{k}.png").write_bytes(encode(im, "PNG"))
    return root


def listed(root) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))


def rows(out) -> dict:
    table = read_table(str(out))
    paths = table["path"].to_pylist()
    assert len(paths) == len(set(paths)), "a file has two rows"
    return {r["path"]: r for r in table.to_pylist()}


def settings(archive, out, **kw):
    from cxr_batch.jobs.score import ScoreSettings

    return ScoreSettings(archive=str(archive), out=str(out), model="resnet18:none", batch_size=8, rows_per_part=4,
                         retry_backoff_s=0.2, **kw)


def test_a_folder_that_vanishes_mid_run_and_comes_back_is_scored_in_the_same_run(archive, ray_session, tmp_path):
    from cxr_batch.jobs.score import run_score

    expected, away = listed(archive), tmp_path / "c-away"

    def echo(line: str) -> None:  # the first line comes after the listing: the remount starts then
        if line.startswith("score:"):
            os.rename(archive / "c", away)
        elif line.startswith("retry pass 1/"):
            os.rename(away, archive / "c")  # the share is back before the first retry pass

    summary = run_score(settings(archive, tmp_path / "out"), echo=echo)
    got = rows(tmp_path / "out")
    assert sorted(got) == expected and {r["status"] for r in got.values()} == {"scored"}
    assert (summary.scored, summary.retried, summary.retry) == (len(expected), PER, 0)


def test_a_folder_away_for_the_whole_run_is_retried_by_the_next_run(archive, ray_session, tmp_path):
    out, expected = tmp_path / "out", listed(archive)
    manifest = tmp_path / "files.txt"
    manifest.write_text("\n".join(expected) + "\n")  # listed, then gone: an export's list, a remount
    os.rename(archive / "c", tmp_path / "c-away")
    args = ["score", str(archive), "--out", str(out), "--manifest", str(manifest), "--model", "resnet18:none",
            "--retries", "1", "--retry-backoff", "0.1", "--rows-per-part", "4"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == EXIT_INCOMPLETE, first.output
    assert f"INCOMPLETE    {PER} files failed for a transient reason" in first.output
    got = rows(out)
    assert sorted(got) == expected
    assert {p for p, r in got.items() if r["status"] == "retry"} == {p for p in expected if p.startswith("c/")}
    assert {r["error"] for r in got.values() if r["status"] == "retry"} == {"file vanished after it was listed"}

    os.rename(tmp_path / "c-away", archive / "c")
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0, second.output
    assert f"{PER} 'retry' rows of earlier runs replaced" in second.output
    got = rows(out)
    assert sorted(got) == expected and {r["status"] for r in got.values()} == {"scored"}

    third = CliRunner().invoke(main, args)  # nothing left to do, and nothing to retry
    assert third.exit_code == 0 and f"{len(expected)} already in the output" in third.output
    assert sorted(rows(out)) == expected


POISON_PLUGIN = '''
import os
from PIL import Image, ImageFile

class Poison(ImageFile.ImageFile):
    """A decoder that takes its process down, as a segfaulting codec or the OOM killer does."""
    format = "POISON"

    def _open(self):
        os._exit(1)

Image.register_open("POISON", Poison, lambda prefix: prefix[:6] == b"POISON")
'''


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_a_file_that_kills_its_worker_is_its_own_error_row_and_the_job_finishes(archive, tmp_path, engine):
    (archive / "b" / "img3.png").write_bytes(b"POISON" + bytes(200))  # listed as a PNG like its neighbours
    (archive / "d" / "huge.png").write_bytes(bytes(5000))  # over --max-bytes: refused from the listing's size
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "sitecustomize.py").write_text(POISON_PLUGIN)  # every worker Python loads it at start
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin), str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "cxr_batch.cli", "score", str(archive), "--out", str(out), "--model",
                        "resnet18:none", "--batch-size", "8", "--retry-backoff", "0.1", "--max-bytes", "4000",
                        "--no-cams", "--engine", engine], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    got = rows(out)
    assert sorted(got) == listed(archive)
    assert got["b/img3.png"]["status"] == "error" and got["b/img3.png"]["error"] == POISON.format(n=2)
    assert got["d/huge.png"]["status"] == "error" and got["d/huge.png"]["error"].startswith("file larger than --max-bytes 4,000")
    assert {r["status"] for p, r in got.items() if p not in ("b/img3.png", "d/huge.png")} == {"scored"}
    assert "poison        1 files killed their worker" in p.stdout + p.stderr


def test_kills_and_vanishing_folders_mixed_end_with_one_row_per_file(ray_address, tmp_path):
    """A run with a folder away (exit 3), a re-run SIGKILLed after its first part, a run with the
    other folder away, then a clean run: one row per file at every step, all scored at the end."""
    import signal
    import time

    from cxr_batch.synth.archive import make_archive

    root = tmp_path / "archive"
    make_archive(root, n_train=0, n_val=0, n_test=120, size=96, seed=5)
    expected = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpeg"))
    manifest, out = tmp_path / "files.txt", tmp_path / "out"
    manifest.write_text("\n".join(expected) + "\n")
    cmd = [sys.executable, "-m", "cxr_batch.cli", "score", str(root), "--out", str(out), "--manifest", str(manifest),
           "--model", "resnet18:none", "--batch-size", "8", "--rows-per-part", "8", "--retries", "0",
           "--address", ray_address]

    def away(folder: str, there: bool) -> None:
        os.rename(*((root / "test" / folder, tmp_path / folder) if not there else (tmp_path / folder, root / "test" / folder)))

    def run() -> int:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=400).returncode

    def check(rc: int) -> dict:
        got = rows(out)  # never two rows for one file
        assert set(got) <= set(expected)
        assert rc == (EXIT_INCOMPLETE if any(r["status"] == "retry" for r in got.values()) else 0)
        return got

    away("NORMAL", False)
    got = check(run())
    assert {p for p, r in got.items() if r["status"] == "retry"} == {p for p in expected if "/NORMAL/" in p}
    away("NORMAL", True)
    parts = set(os.listdir(out))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    while not {n for n in os.listdir(out) if n.endswith(".parquet")} - parts and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL  # killed mid-run, not finished
    assert set(rows(out)) <= set(expected)  # whole parts only, still one row per file
    away("PNEUMONIA", False)
    check(run())
    away("PNEUMONIA", True)
    got = check(run())
    assert sorted(got) == expected and {r["status"] for r in got.values()} == {"scored"}


def unprivileged(cmd: list) -> list:
    """``cmd`` run so that file permissions apply to it. CI runs as root, and root reads a chmod 000
    folder: as root, the command runs without the two capabilities that let root ignore permissions."""
    if os.geteuid() != 0:
        return cmd
    import shutil

    setpriv = shutil.which("setpriv")
    if not setpriv:
        pytest.skip("running as root, and setpriv (util-linux) is missing to drop root's permission override")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}", *cmd]


def test_a_folder_that_cannot_be_listed_makes_the_run_incomplete_and_a_rerun_lists_it(archive, tmp_path):
    import json

    out = tmp_path / "out"
    cmd = unprivileged([sys.executable, "-m", "cxr_batch.cli", "score", str(archive), "--out", str(out), "--model",
                        "resnet18:none", "--no-cams", "--engine", "local", "--json"])
    os.chmod(archive / "b", 0)  # cannot be listed at all
    os.chmod(archive / "c", 0o444)  # its names can be read, but not one entry's type or size
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    finally:
        os.chmod(archive / "b", 0o755)
        os.chmod(archive / "c", 0o755)
    assert p.returncode == EXIT_INCOMPLETE, p.stdout[-3000:] + p.stderr[-3000:]
    assert "INCOMPLETE    1 folders and 6 entries could not be listed" in p.stdout and "b/: permission denied" in p.stdout
    listing = json.loads(p.stdout.strip().splitlines()[-1])["summary"]["listing"]
    assert (listing["unreadable_folders"], listing["unreadable_entries"]) == (1, PER)
    assert listing["unlisted"] == ["b/: permission denied"] + [f"c/img{k}.png: permission denied" for k in range(PER)]
    assert sorted(rows(out)) == [p for p in listed(archive) if p[0] in "ad"]

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    got = rows(out)
    assert sorted(got) == listed(archive) and {r["status"] for r in got.values()} == {"scored"}


FIFO = "not a regular file (FIFO): not read"


def lease_left(out) -> bool:
    from cxr_batch.archive.lease import LEASE_FILE

    return (out / LEASE_FILE).exists()


def test_a_fifo_named_in_a_manifest_is_an_error_row_and_the_run_finishes(archive, tmp_path):
    os.mkfifo(archive / "b" / "pipe.png")  # open() of a FIFO waits for a writer that never comes
    out, manifest = tmp_path / "out", tmp_path / "files.txt"
    manifest.write_text("\n".join(listed(archive)) + "\n")
    args = ["score", str(archive), "--out", str(out), "--manifest", str(manifest), "--model", "resnet18:none",
            "--no-cams", "--engine", "local", "--stall-timeout", "60"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    got = rows(out)
    assert sorted(got) == listed(archive) and "b/pipe.png" in got
    assert (got["b/pipe.png"]["status"], got["b/pipe.png"]["error"]) == ("error", FIFO)
    assert {r["status"] for p, r in got.items() if p != "b/pipe.png"} == {"scored"}
    assert not lease_left(out)


def test_a_fifo_swapped_in_after_the_listing_is_an_error_row(archive, tmp_path):
    from cxr_batch.jobs.score import run_score

    swapped = archive / "c" / "img2.png"

    def echo(line: str) -> None:  # the listing saw a regular file; the reads meet a FIFO
        if line.startswith("score:"):
            swapped.unlink()
            os.mkfifo(swapped)

    out = tmp_path / "out"
    summary = run_score(settings(archive, out, engine="local", cams=False, stall_timeout_s=60), echo=echo)
    got = rows(out)
    assert sorted(got) == listed(archive)
    assert (got["c/img2.png"]["status"], got["c/img2.png"]["error"]) == ("error", FIFO)
    assert summary.scored == len(got) - 1 and summary.errors == 1 and not lease_left(out)


HANG_PLUGIN = '''
import time
from PIL import Image, ImageFile

class Hang(ImageFile.ImageFile):
    """A decoder that never returns, as a read from a hung hard NFS mount does not."""
    format = "HANG"

    def _open(self):
        time.sleep(3600)

Image.register_open("HANG", Hang, lambda prefix: prefix[:4] == b"HANG")
'''


def test_the_local_engine_stops_after_the_stall_timeout_and_a_rerun_resumes(archive, tmp_path):
    hung = archive / "d" / "img5.png"
    hung.write_bytes(b"HANG" + bytes(200))
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "sitecustomize.py").write_text(HANG_PLUGIN)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin), str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cxr_batch.cli", "score", str(archive), "--out", str(out), "--model", "resnet18:none",
           "--no-cams", "--engine", "local", "--stall-timeout", "5", "--rows-per-part", "8"]
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert p.returncode == EXIT_INCOMPLETE, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Error: no progress for 5 s (--stall-timeout) in the local engine" in p.stderr
    assert "Traceback" not in p.stderr and not lease_left(out)
    assert set(rows(out)) < set(listed(archive))  # whatever was published stays, one row per file
    hung.write_bytes(encode(Image.new("L", (48, 48), 9), "PNG"))  # the mount is back
    again = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    got = rows(out)
    assert sorted(got) == listed(archive) and {r["status"] for r in got.values()} == {"scored"}


def test_damaged_parts_are_set_aside_and_their_files_scored_again(archive, tmp_path):
    """A part cut to 0 bytes and one cut in half (a disk fault, a copy cut short): `report` skips
    them and says so, a re-run sets them aside and scores their files again, --overwrite deletes
    them. No ArrowInvalid traceback anywhere."""
    import pyarrow.parquet as pq

    from cxr_batch.archive.results import DAMAGED_PREFIX, part_files

    out = tmp_path / "out"
    args = ["score", str(archive), "--out", str(out), "--model", "resnet18:none", "--engine", "local",
            "--batch-size", "4", "--rows-per-part", "4"]
    assert CliRunner().invoke(main, args).exit_code == 0
    parts = part_files(str(out))
    assert len(parts) == len(listed(archive)) // 4
    os.truncate(parts[1], 0)
    os.truncate(parts[3], os.path.getsize(parts[3]) // 2)

    report = CliRunner().invoke(main, ["report", str(out)])
    assert report.exit_code == 0, report.output
    assert f"{len(listed(archive)) - 8} rows" in report.output
    assert "2 damaged part files (not Parquet: empty or truncated) skipped" in report.output

    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert "2 damaged part files (not Parquet: empty or truncated) set aside; their files are scored again" in again.output
    assert f"{len(listed(archive)) - 8} already in the output" in again.output
    assert sorted(rows(out)) == listed(archive) and {r["status"] for r in rows(out).values()} == {"scored"}
    assert sorted(n for n in os.listdir(out) if n.startswith(DAMAGED_PREFIX)) == sorted(
        DAMAGED_PREFIX + os.path.basename(p) for p in (parts[1], parts[3]))
    assert pq.read_table(out).num_rows == len(listed(archive))  # hidden from a plain Parquet reader too

    os.truncate(part_files(str(out))[0], 0)
    fresh = CliRunner().invoke(main, args + ["--overwrite", "--no-cams"])
    assert fresh.exit_code == 0, fresh.output
    assert "--overwrite: 1 damaged part files (not Parquet: empty or truncated) deleted unread" in fresh.output
    assert not [n for n in os.listdir(out) if n.startswith(DAMAGED_PREFIX)]
    assert sorted(rows(out)) == listed(archive)


def test_sigterm_stops_a_run_as_ctrl_c_does_and_a_rerun_resumes(tmp_path):
    """`ray job stop`, Kubernetes and schedulers send SIGTERM: the lease goes with the run (a re-run
    need not wait for it to go stale), and the re-run adds only the missing rows."""
    import signal
    import time

    from cxr_batch.synth.archive import make_archive

    root, out = tmp_path / "archive", tmp_path / "out"
    make_archive(root, n_train=0, n_val=0, n_test=120, size=96, seed=5)
    expected = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpeg"))
    cmd = [sys.executable, "-m", "cxr_batch.cli", "score", str(root), "--out", str(out), "--model", "resnet18:none",
           "--engine", "local", "--batch-size", "4", "--rows-per-part", "4", "--no-cams"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 900
    while not (out.is_dir() and any(n.startswith("part-") for n in os.listdir(out))) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Stopped by SIGTERM" in err and "Traceback" not in err
    assert not lease_left(out)
    first = rows(out)
    assert set(first) < set(expected)  # stopped mid-run, whole parts only

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(first)} already in the output" in again.stdout
    got = rows(out)
    assert sorted(got) == expected and {r["status"] for r in got.values()} == {"scored"}
