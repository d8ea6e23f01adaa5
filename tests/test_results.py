"""Where results land: Parquet parts published whole, resume bookkeeping, CAM paths that stay inside
their folder, and the schema the scoring stages carry."""

import os

import pyarrow as pa
import pytest

from cxr_batch.archive.results import (SCHEMA, TEXT_COLUMNS, PartWriter, cam_uri, done_path_batches, read_metadata,
                                       read_table, safe_relpath)
from cxr_batch.errors import InputError


@pytest.mark.parametrize("rel", ["../../etc/passwd", "/etc/passwd", "a/../../b.png", "C:/x/y.png", "..\\..\\w.png",
                                 "..", "", "a/\x00b.png", "ok/ünï cödé.jpeg"])
def test_cam_paths_stay_inside_the_cam_folder(tmp_path, rel):
    root = tmp_path / "cams"
    out = os.path.realpath(cam_uri(str(root), rel))
    assert out.startswith(str(root) + os.sep)
    assert ".." not in safe_relpath(rel).split("/")


def test_part_writer_publishes_whole_parts_and_resume_reads_them(tmp_path):
    out = str(tmp_path / "res.parquet")
    w = PartWriter(out, {"model_id": "m1"}, rows_per_part=3)
    rows = [{"path": f"f{i}.png", "model": "m1"} for i in range(7)]
    for r in rows:
        w.add(pa.Table.from_pylist([r], schema=SCHEMA))
    w.flush()
    names = sorted(os.listdir(out))
    assert len(names) == 3 and all(n.startswith("part-") and n.endswith(".parquet") for n in names)
    assert sorted(p for a in done_path_batches(out, "m1") for p in a.to_pylist()) == sorted(r["path"] for r in rows)
    assert [len(a) for a in done_path_batches(out, "m1", batch_rows=4)] == [6, 1]  # whole parts of 3, 3 | 1
    assert read_table(out).num_rows == 7
    with pytest.raises(InputError, match="--overwrite"):
        list(done_path_batches(out, "another-model"))


def test_metadata_of_the_parts_reads_back(tmp_path):
    out = str(tmp_path / "res.parquet")
    assert read_metadata(out) == {}
    w = PartWriter(out, {"model_id": "m1", "settings": {"batch_size": 8}})
    w.add(pa.Table.from_pylist([{"path": "a.png", "model": "m1"}], schema=SCHEMA))
    w.flush()
    assert read_metadata(out) == {"model_id": "m1", "settings": {"batch_size": 8}}


def test_text_columns_are_the_schema_s_string_columns():
    assert set(TEXT_COLUMNS) == {f.name for f in SCHEMA if f.type == pa.string()}
    assert {"path", "label", "pred", "error", "sop_instance_uid"} <= set(TEXT_COLUMNS)
    assert "prob_pneumonia" not in TEXT_COLUMNS


def write_part(out, rows, *, run, archive="/a", model_id="m1"):
    w = PartWriter(out, {"model_id": model_id, "settings": {"archive": archive}}, rows_per_part=len(rows), run=run)
    w.add(pa.Table.from_pylist(rows, schema=SCHEMA))
    w.flush()


def test_retry_rows_are_not_done_and_are_dropped_before_their_files_are_scored_again(tmp_path):
    from cxr_batch.archive.results import drop_retry_rows

    out = str(tmp_path / "res")
    write_part(out, [{"path": "a.png", "status": "scored"}, {"path": "b.png", "status": "retry", "error": "file vanished"},
                     {"path": "c.png", "status": "error"}, {"path": "old.png"}], run="0000000a")  # old: no status
    write_part(out, [{"path": "d.png", "status": "retry"}, {"path": "e.png", "status": "skipped"}], run="0000000b")
    retry_parts = []
    done = sorted(p for a in done_path_batches(out, "m1", archive="/a", retry_parts=retry_parts) for p in a.to_pylist())
    assert done == ["a.png", "c.png", "e.png", "old.png"]
    assert len(retry_parts) == 2  # both parts hold a retry row
    # Only b is scored again now (d is, say, beyond --limit): b's retry row goes, d's stays.
    assert drop_retry_rows(out, pa.array(["b.png", "a.png"]), parts=retry_parts) == 1
    assert drop_retry_rows(out, pa.array(["d.png"]), parts=[]) == 0  # parts named: no others are opened
    table = read_table(out)
    assert sorted(table["path"].to_pylist()) == ["a.png", "c.png", "d.png", "e.png", "old.png"]
    assert read_metadata(out)["model_id"] == "m1"  # the rewritten part keeps its metadata
    assert len(os.listdir(out)) == 2  # rewritten in place, no temp files left


def test_resume_is_bound_to_the_archive(tmp_path):
    out = str(tmp_path / "res")
    write_part(out, [{"path": "a.png", "status": "scored"}], run="0000000a", archive="/data/site-a")
    assert [a.to_pylist() for a in done_path_batches(out, "m1", archive="/data/site-a/")] == [["a.png"]]
    with pytest.raises(InputError, match=r"already holds results of archive /data/site-a, not /data/site-b: pass --overwrite"):
        list(done_path_batches(out, "m1", archive="/data/site-b"))


def test_part_names_past_99999_are_still_parts(tmp_path):
    from cxr_batch.archive.results import part_files

    out = str(tmp_path / "res")
    w = PartWriter(out, {"model_id": "m1"}, rows_per_part=1, run="0000000a")
    w.seq = 99_999
    for p in ("a.png", "b.png"):
        w.add(pa.Table.from_pylist([{"path": p}], schema=SCHEMA))
    assert [os.path.basename(p) for p in part_files(out)] == ["part-0000000a-100000.parquet", "part-0000000a-99999.parquet"]
    assert sorted(read_table(out)["path"].to_pylist()) == ["a.png", "b.png"]


def test_a_part_is_fsynced_before_its_rename_and_its_folder_after(tmp_path, monkeypatch):
    """A power loss must leave the old part or the new one whole, never a renamed empty file: the
    data reaches the disk before the rename, and the rename before the run goes on."""
    import stat

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(a, b):
        events.append("rename")
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    w = PartWriter(str(tmp_path / "out"), {"model_id": "m1"}, rows_per_part=2)
    w.add(pa.Table.from_pylist([{"path": p, "model": "m1"} for p in ("a.png", "b.png")], schema=SCHEMA))
    assert events == ["fsync file", "rename", "fsync folder"]
