"""storage.read_file: the one way every job reads an archive file (local here; s3:// in test_s3)."""

import os

import pytest

from cxr_batch.archive import storage
from cxr_batch.archive.discover import discover
from cxr_batch.errors import DecodeError


def test_a_name_that_is_not_utf8_is_listed_as_text_and_read_back(tmp_path):
    name = os.fsdecode(b"r\xe9sum\xe9.png")  # a Latin-1 archive unzipped on Linux
    (tmp_path / name).write_bytes(b"latin-1 bytes")
    [entry] = discover(str(tmp_path))
    assert entry.path == "r\\xe9sum\\xe9.png"  # Parquet strings must be UTF-8
    assert storage.read_file(str(tmp_path), entry.path) == b"latin-1 bytes"


def test_read_failures_are_one_line_decode_errors(tmp_path):
    with pytest.raises(DecodeError, match="^file vanished after it was listed$"):
        storage.read_file(str(tmp_path), "gone.png")
    os.symlink("/proc/self/mem", tmp_path / "io_error.png")  # reading it fails with EIO, even as root
    with pytest.raises(DecodeError, match="^unreadable file: ") as e:
        storage.read_file(str(tmp_path), "io_error.png")
    assert "\n" not in str(e.value)
