"""`cxr-batch score` end to end on the archive I/O layer: two runs racing for one --out (real
processes on the session's Ray), --overwrite that keeps other people's files, outputs placed inside
the archive, symlinks to outside, extensionless files and a manifest."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from cxr_batch.cli import main
from cxr_batch.archive.lease import LEASE_FILE
from cxr_batch.archive.results import read_table
from test_dicom import make_ds, to_bytes

pytestmark = pytest.mark.slow
N = 160  # small phantoms: a run holds --out for tens of seconds on 2 CPUs, long enough to race


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    from cxr_batch.synth.archive import make_archive

    folder = tmp_path_factory.mktemp("onewriter")
    make_archive(folder / "archive", n_train=0, n_val=0, n_test=N, size=96, seed=11)
    return folder / "archive"


def expected(archive) -> list[str]:
    return sorted(p.relative_to(archive).as_posix() for p in archive.rglob("*.jpeg"))


def score(*args: str):
    return CliRunner().invoke(main, ["score", *map(str, args), "--model", "resnet18:none", "--batch-size", "8"])


def test_two_runs_on_one_out_one_is_refused_and_the_other_completes(archive, ray_address, tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "cxr_batch.cli", "score", str(archive), "--out", str(out), "--model", "resnet18:none",
           "--batch-size", "8", "--address", ray_address]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], logs
    winner, loser = (0, 1) if procs[0].returncode == 0 else (1, 0)
    held = re.search(r"Error: --out \S+ is in use by another cxr-batch run: run ([0-9a-f]{8}) \(pid (\d+) on host", logs[loser])
    assert held, logs[loser]
    assert int(held[2]) == procs[winner].pid
    assert "Wait for it to finish or choose another --out" in logs[loser]
    table = pq.read_table(out)
    assert sorted(table.column("path").to_pylist()) == expected(archive)  # every file once: no second writer
    assert {re.match(r"part-([0-9a-f]{8})-", n)[1] for n in os.listdir(out) if n.endswith(".parquet")} == {held[1]}
    assert not (out / LEASE_FILE).exists()  # released at the end
    assert len(list((tmp_path / "results-cams").rglob("*.png"))) == N


def test_overwrite_replaces_our_files_and_keeps_everyone_else_s(archive, ray_session, tmp_path):
    out, cams = tmp_path / "results", tmp_path / "results-cams"
    first = score(archive, "--out", out, "--limit", 16)
    assert first.exit_code == 0, first.output
    old_parts = {n for n in os.listdir(out) if n.endswith(".parquet")}
    (out / "README.txt").write_text("kept")
    (cams / "NORMAL-annotations.csv").write_text("kept too")
    result = score(archive, "--out", out, "--limit", 8, "--overwrite")
    assert result.exit_code == 0, result.output
    assert (out / "README.txt").read_text() == "kept" and (cams / "NORMAL-annotations.csv").exists()
    assert not old_parts & set(os.listdir(out))
    assert sorted(read_table(str(out)).column("path").to_pylist()) == expected(archive)[:8]
    assert len(list(cams.rglob("*.png"))) == 8  # the first run's 16 went, 8 new ones came
    assert "--overwrite deleted 1 part files and 16 CAM PNGs" in result.output
    assert "--overwrite left 1 files in" in result.output and "README.txt" in result.output


@pytest.mark.parametrize("out,overwrite,message", [
    ("{a}", False, "is the archive"),
    ("{a}/test/results", False, "lies inside the archive"),
    ("{p}", True, "--overwrite would clear --out {p}, which holds the archive"),
])
def test_an_out_in_or_around_the_archive_is_refused_before_anything_runs(archive, out, overwrite, message):
    before = sorted(str(p) for p in archive.parent.rglob("*"))
    o = out.format(a=archive, p=archive.parent)
    result = score(archive, "--out", o, *(["--overwrite"] if overwrite else []))
    assert result.exit_code == 1
    assert message.format(p=archive.parent) in result.output and len(result.output.strip().splitlines()) == 1
    assert sorted(str(p) for p in archive.parent.rglob("*")) == before  # nothing written, nothing deleted


@pytest.fixture(scope="module")
def linked(tmp_path_factory):
    """Two X-rays inside, an extensionless DICOM and an extensionless text file, and links to a file
    and a folder outside the archive."""
    root = tmp_path_factory.mktemp("linked")
    a, outside = root / "archive", root / "outside"
    for i, rel in enumerate(("NORMAL/a.jpeg", "PNEUMONIA/b.jpeg")):
        (a / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((64, 64), 40 + 60 * i, np.uint8)).save(a / rel)
    (a / "dcm").mkdir()
    (a / "dcm" / "IM0001").write_bytes(to_bytes(make_ds(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))))
    (a / "dcm" / "LICENSE").write_text("not an image\n")
    outside.mkdir()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(outside / "secret.jpeg")
    os.symlink(outside / "secret.jpeg", a / "out_file.jpeg")
    os.symlink(outside, a / "out_dir")
    return a


def rows(out) -> dict:
    return {r["path"]: r for r in pq.read_table(out).to_pylist()}


def test_symlinks_to_outside_are_not_read_by_default(linked, ray_session, tmp_path):
    result = score(linked, "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    got = rows(tmp_path / "r")
    assert sorted(got) == ["NORMAL/a.jpeg", "PNEUMONIA/b.jpeg", "dcm/IM0001", "dcm/LICENSE"]
    assert got["dcm/IM0001"]["error"] is None and got["dcm/IM0001"]["format"] == "DICOM"
    assert got["dcm/LICENSE"]["error"].startswith("skipped: no file extension and not DICOM")
    assert "3 scored, 0 errors, 1 skipped" in result.output
    assert "symlinks to outside the archive, not followed: 2 (--follow-symlinks reads them)" in result.output


def test_a_link_swapped_in_after_the_path_check_is_refused_at_the_open(linked):
    """The decode stage checks the path, then opens: a link made between the two is caught on the
    opened descriptor (the path check is skipped here, as a swap between the two would skip it)."""
    from functools import partial

    from cxr_batch.archive import storage
    from cxr_batch.errors import DecodeError
    from cxr_batch.jobs.score_stages import OUTSIDE, _refuse_outside

    check = partial(_refuse_outside, str(linked))
    assert storage.read_file(str(linked), "NORMAL/a.jpeg", check_opened=check)[:2] == b"\xff\xd8"
    for rel in ("out_file.jpeg", "out_dir/secret.jpeg"):
        with pytest.raises(DecodeError, match="symlink to outside the archive"):
            storage.read_file(str(linked), rel, check_opened=check)
    assert OUTSIDE.startswith("symlink to outside")


def test_follow_symlinks_reads_them(linked, ray_session, tmp_path):
    result = score(linked, "--out", tmp_path / "r", "--follow-symlinks")
    assert result.exit_code == 0, result.output
    got = rows(tmp_path / "r")
    assert {"out_file.jpeg", "out_dir/secret.jpeg"} <= set(got) and len(got) == 6
    assert got["out_dir/secret.jpeg"]["error"] is None


def test_a_manifest_replaces_the_listing(linked, ray_session, tmp_path):
    (tmp_path / "m.csv").write_text("path,size\nNORMAL/a.jpeg,1\n./dcm/IM0001,\nout_file.jpeg,\nNORMAL//a.jpeg,\n")
    result = score(linked, "--out", tmp_path / "r", "--manifest", tmp_path / "m.csv")
    assert result.exit_code == 0, result.output
    got = rows(tmp_path / "r")
    assert sorted(got) == ["NORMAL/a.jpeg", "dcm/IM0001", "out_file.jpeg"]  # duplicates once, nothing else listed
    assert got["out_file.jpeg"]["error"].startswith("symlink to outside the archive: not read")
    assert f"3 files from the manifest {tmp_path / 'm.csv'}" in result.output
