"""Where results may go and what --overwrite deletes, on real folders; the end-to-end runs through
the CLI are in test_one_writer.py."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from cxr_batch.errors import InputError
from cxr_batch.archive.lease import Lease
from cxr_batch.archive.outdir import check_placement, clear_output
from cxr_batch.archive.results import SCHEMA, PartWriter, cam_uri, part_files
from cxr_batch.jobs.ray_env import node_local_problem


@pytest.fixture()
def archive(tmp_path):
    a = tmp_path / "data" / "archive"
    a.mkdir(parents=True)
    return a


@pytest.mark.parametrize("out,cam,overwrite,message", [
    ("{a}", None, False, "--out {a} is the archive"),
    ("{a}/results", None, False, "--out {a}/results lies inside the archive"),
    ("{link}/results", None, False, "lies inside the archive"),  # through a symlink to the archive
    ("{t}/results", "{a}/cams", False, "--cam-dir {a}/cams lies inside the archive"),
    ("{t}/data", None, True, "--overwrite would clear --out {t}/data, which holds the archive"),
    ("{t}/results", "{t}", True, "--overwrite would clear --cam-dir {t}, which holds the archive"),
    ("s3://b/x/arch/out", None, False, "lies inside the archive s3://b/x/arch"),
    ("s3://b/x", None, True, "which holds the archive s3://b/x/arch"),
])
def test_an_out_that_is_in_or_holds_the_archive_is_refused(archive, tmp_path, out, cam, overwrite, message):
    os.symlink(archive, tmp_path / "link")
    uri = "s3://" in out
    fmt = dict(a=archive, t=tmp_path, link=tmp_path / "link")
    a = "s3://b/x/arch" if uri else str(archive)
    with pytest.raises(InputError, match=message.format(**fmt).replace(".", r"\.")) as e:
        check_placement(a, out.format(**fmt), cam.format(**fmt) if cam else None, overwrite=overwrite)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("out,cam,overwrite", [
    ("{t}/results", None, True), ("{t}/data/results", "{t}/data/cams", True), ("{t}/data", None, False),
    ("{t}/data/archive-results", None, True),  # a sibling whose name starts like the archive's
])
def test_outs_beside_the_archive_are_fine(archive, tmp_path, out, cam, overwrite):
    fmt = dict(t=tmp_path)
    check_placement(str(archive), out.format(**fmt), cam.format(**fmt) if cam else None, overwrite=overwrite)
    check_placement("s3://b/x/arch", "s3://b/x/arch-results", None, overwrite=True)


def test_overwrite_deletes_only_what_cxr_batch_wrote(tmp_path):
    out, cams = tmp_path / "results", tmp_path / "results-cams"
    rows = []
    for rel in ("a/x.png", "b/c/y.jpeg"):
        png = cam_uri(str(cams), rel)
        os.makedirs(os.path.dirname(png), exist_ok=True)
        open(png, "wb").write(b"png")
        rows.append({"path": rel, "cam_path": png, "model": "m"})
    victim = tmp_path / "precious.png"  # a table that points outside the CAM folder must not delete it
    victim.write_bytes(b"mine")
    rows.append({"path": "evil.png", "cam_path": str(victim), "model": "m"})
    w = PartWriter(str(out), {"model_id": "m"}, rows_per_part=2)
    for r in rows:
        w.add(pa.Table.from_pylist([r], schema=SCHEMA))
    w.flush()
    (out / "notes.txt").write_text("someone's notes")
    (out / ".part-x.parquet.0123abcd.tmp").write_bytes(b"half")  # our temp file, from a killed run
    (out / "_cxr_batch_old.json").write_text("{}")  # bookkeeping of ours
    (cams / "a" / "theirs.png").write_bytes(b"theirs")
    (cams / "b" / "c" / ".y.jpeg.png.89abcdef.tmp").write_bytes(b"half")
    (cams / "keep" / "empty").mkdir(parents=True)  # a user's: empty before, so not ours to remove
    assert len(part_files(str(out))) == 2

    with Lease(str(out), run_id="0000beef"):  # as in a run: the lease it holds stays
        cleared = clear_output(str(out), str(cams))
        assert sorted(os.listdir(out)) == ["_cxr_batch_lease.json", "_cxr_batch_lease.lock", "notes.txt"]
    assert sorted(os.listdir(out)) == ["notes.txt"]  # released: the lease's files go
    assert victim.read_bytes() == b"mine"
    assert sorted(str(p.relative_to(cams)) for p in cams.rglob("*")) == ["a", "a/theirs.png", "keep", "keep/empty"]  # b/c pruned
    assert (cleared.parts, cleared.pngs) == (2, 2)
    notes = " ".join(cleared.notes())
    assert "left 1 files in" in notes and "notes.txt" in notes and "a/theirs.png" in notes


def test_overwrite_of_a_clean_output_leaves_nothing(tmp_path):
    out, cams = tmp_path / "results", tmp_path / "results-cams"
    w = PartWriter(str(out), {"model_id": "m"})
    png = cam_uri(str(cams), "x.png")
    os.makedirs(os.path.dirname(png))
    open(png, "wb").write(b"png")
    w.add(pa.Table.from_pylist([{"path": "x.png", "cam_path": png, "model": "m"}], schema=SCHEMA))
    w.flush()
    cleared = clear_output(str(out), str(cams))
    assert os.listdir(out) == [] and not cams.exists()
    assert cleared.notes() == ["--overwrite deleted 1 part files and 1 CAM PNGs of earlier runs"]


def test_node_local_paths_are_refused_only_on_several_nodes():
    paths = {"ARCHIVE": "s3://b/a", "--out": "/data/out", "--cam-dir": None}
    assert node_local_problem(paths, 1, shared_fs=False, job="x") is None
    assert node_local_problem(paths, 2, shared_fs=True, job="x") is None
    assert node_local_problem({"ARCHIVE": "s3://b/a", "--out": "s3://b/o"}, 3, shared_fs=False, job="x") is None
    message = node_local_problem(paths, 2, shared_fs=False, job="the decode and CAM tasks")
    assert message.startswith("--out /data/out is a node-local path, but the Ray cluster has 2 nodes")
    assert "CXR_BATCH_SHARED_FS=1" in message and "s3://" in message


def test_overwrite_finds_our_pngs_in_copied_folders(tmp_path):
    """cam_path holds where the PNG was first written; a copied output still knows its own."""
    import shutil

    out, cams = tmp_path / "a" / "results", tmp_path / "a" / "results-cams"
    png = cam_uri(str(cams), "x/y.png")
    os.makedirs(os.path.dirname(png))
    open(png, "wb").write(b"png")
    w = PartWriter(str(out), {"model_id": "m"})
    w.add(pa.Table.from_pylist([{"path": "x/y.png", "cam_path": png, "model": "m"}], schema=SCHEMA))
    w.flush()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    cleared = clear_output(str(tmp_path / "b" / "results"), str(tmp_path / "b" / "results-cams"))
    assert cleared.pngs == 1 and not (tmp_path / "b" / "results-cams").exists()
    assert os.path.exists(png)  # the original, which the table's cam_path names, is not this run's to delete


def test_two_outputs_that_share_a_cam_folder_cannot_run_at_once(tmp_path):
    """--out r and --out r.parquet both put their CAMs in r-cams: the CAM folder has a lease too."""
    from cxr_batch.archive.lease import LeaseHeld
    from cxr_batch.jobs.score import ScoreSettings, run_score

    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "x.png").write_bytes(b"x")
    with Lease(str(tmp_path / "r-cams"), run_id="0000beef", option="--cam-dir"):  # as the run on --out r holds it
        with pytest.raises(LeaseHeld, match=r"^--cam-dir .*r-cams is in use by another cxr-batch run: run 0000beef"):
            run_score(ScoreSettings(archive=str(archive), out=str(tmp_path / "r.parquet"), model="resnet18:none",
                                    engine="local"))
    assert not (tmp_path / "r.parquet").exists()  # refused before anything was written
