import os

import pyarrow as pa
import pytest

from cxr_batch.archive.discover import discover, label_from_path
from cxr_batch.errors import InputError
from cxr_batch.archive.results import SCHEMA, PartWriter, cam_uri, done_paths, read_table, safe_relpath


def touch(p, data=b"x"):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def test_discovery_rules(tmp_path):
    a = tmp_path / "arch"
    for rel in ["a/b/c/deep.JPEG", "x.png", "PNEUMONIA/p.Jpg", "sub/ünï cödé name.jpeg", "noext_dicom"]:
        touch(a / rel, b"\0" * 128 + b"DICM" if rel == "noext_dicom" else b"x")
    for rel in [".hidden.jpeg", ".git/obj.png", "notes.txt", "noext_text", "data.csv"]:
        touch(a / rel)
    os.symlink(a, a / "sub" / "loop")  # a symlink loop must not hang discovery
    os.symlink(tmp_path / "missing", a / "dangling.jpeg")
    paths = [e.path for e in discover(str(a))]
    assert paths == sorted(["a/b/c/deep.JPEG", "x.png", "PNEUMONIA/p.Jpg", "sub/ünï cödé name.jpeg", "noext_dicom"])


def test_discovery_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        discover(str(tmp_path / "nope"))
    touch(tmp_path / "f.jpeg")
    with pytest.raises(InputError, match="is a file"):
        discover(str(tmp_path / "f.jpeg"))


def test_labels_from_folders():
    assert label_from_path("train/NORMAL/x.jpeg") == "NORMAL"
    assert label_from_path("pneumonia/2020/x.jpeg") == "PNEUMONIA"
    assert label_from_path("misc/x.jpeg") is None
    assert label_from_path("NORMAL.jpeg") is None  # a file name is not a folder


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
    assert done_paths(out, "m1") == {r["path"] for r in rows}
    assert read_table(out).num_rows == 7
    with pytest.raises(InputError, match="--overwrite"):
        done_paths(out, "another-model")
