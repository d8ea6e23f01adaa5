"""Finding the images of an archive: which files, listed how, labelled from which folder."""

import os

import pytest

from cxr_batch.archive.discover import discover, label_from_path
from cxr_batch.errors import InputError


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
