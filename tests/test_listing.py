"""Listing an archive (local and loopback S3), manifests, symlinks and the resume anti-join, on real
files and a real S3 server; no Ray."""

from __future__ import annotations

import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxr_batch.archive.discover import LISTING, list_archive, read_manifest
from cxr_batch.errors import InputError
from cxr_batch.archive.results import pending

import s3server

DICOM_HEAD = b"\0" * 128 + b"DICM"


def touch(p, data=b"x"):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def reference_walk(root) -> list[tuple[str, int, bool]]:
    """What the listing must find, by the plainest code there is (no symlinks in the tree)."""
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            ext = os.path.splitext(name)[1].lower()
            if name.startswith(".") or (ext and ext not in (".png", ".jpeg", ".dcm")):
                continue
            path = os.path.join(folder, name)
            out.append((os.path.relpath(path, root), os.path.getsize(path), ext == ""))
    return sorted(out)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """400 folders two levels deep, a few files each: images, extensionless, hidden, other types."""
    root = tmp_path_factory.mktemp("tree") / "archive"
    rng = random.Random(0)
    for i in range(400):
        folder = root / f"p{i % 40:02d}" / f"study{i}"
        for j in range(rng.randint(0, 6)):
            name = rng.choice([f"im{j}.png", f"IM{j}", f"x{j}.JPEG", f"s{j}.dcm", f".hidden{j}.png", f"notes{j}.txt"])
            touch(folder / name, b"y" * rng.randint(0, 50))
    touch(root / ".git" / "objects" / "a.png")
    touch(root / "top.png")
    return root


def rows(listing) -> list[tuple]:
    t = listing.files
    return list(zip(t["path"].to_pylist(), t["size"].to_pylist(), t["sniff"].to_pylist()))


def test_local_listing_finds_what_a_plain_walk_finds_in_parallel(tree):
    listing = list_archive(str(tree), threads=8)
    assert listing.files.schema == LISTING
    assert rows(listing) == reference_walk(tree)
    folders = sum(1 for f, _, _ in os.walk(tree) if "/." not in f)
    assert listing.requests == folders and listing.max_in_flight > 1  # one scandir per folder, several at once
    assert rows(list_archive(str(tree), threads=1)) == rows(listing)


def test_listing_never_reads_a_file(tmp_path):
    # An extensionless file that cannot be opened is still listed: the decode stage sniffs it.
    touch(tmp_path / "a" / "IM0001", DICOM_HEAD)
    os.chmod(tmp_path / "a" / "IM0001", 0)
    try:
        assert rows(list_archive(str(tmp_path / "a"))) == [("IM0001", 132, True)]
    finally:
        os.chmod(tmp_path / "a" / "IM0001", 0o644)


@pytest.fixture()
def linked(tmp_path):
    """An archive whose symlinks point inside it, outside it, to its parent and to /."""
    outside = tmp_path / "elsewhere"
    touch(outside / "secret.png")
    touch(outside / "deep" / "IM9")
    a = tmp_path / "archive"
    touch(a / "real" / "x.png")
    touch(a / ".store" / "kept.png")
    os.symlink(outside, a / "out_dir")  # a folder outside
    os.symlink(outside / "secret.png", a / "out_file.png")  # a file outside
    os.symlink("..", a / "real" / "up")  # the archive itself: a loop, listed once
    os.symlink(tmp_path, a / "parent")  # the archive's parent (holds the archive: a loop too)
    os.symlink("/", a / "root")
    os.symlink("real/x.png", a / "alias.png")  # a file inside: listed under both names
    os.symlink(".store", a / "store")  # a hidden folder inside, reached by a visible link
    return a


def test_symlinks_to_outside_are_not_followed_by_default(linked):
    listing = list_archive(str(linked))
    assert listing.files["path"].to_pylist() == ["alias.png", "real/x.png", "store/kept.png"]
    assert listing.outside_links == 4  # out_dir, out_file.png, parent, root


def test_follow_symlinks_reads_outside_links_and_lists_loops_once(linked):
    os.unlink(linked / "root")  # followed, it would list the whole machine: that is what the flag means
    paths = list_archive(str(linked), follow_symlinks=True).files["path"].to_pylist()
    # Each folder once: the archive is not listed again through real/up or parent/archive, nor
    # elsewhere/ through parent/elsewhere (out_dir reached it first, by path order).
    assert paths == ["alias.png", "out_dir/deep/IM9", "out_dir/secret.png", "out_file.png", "real/x.png",
                     "store/kept.png"]


def test_s3_listing_matches_the_local_one(tree):
    with s3server.s3_server() as env, pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        uri = s3server.upload_tree(env, tree, "tree")
        # threads=2: after the first levels the prefixes are listed flat (paginated), not folder by folder.
        for threads in (2, 32):
            listing = list_archive(uri, threads=threads)
            assert rows(listing) == reference_walk(tree)
        assert listing.requests > 40 and listing.max_in_flight > 1
        assert list_archive(uri, threads=2).requests < listing.requests


@pytest.fixture()
def archive(tmp_path):
    a = tmp_path / "archive"
    for rel in ("a/x.png", "b/IM1", "c d/ünï.jpeg"):
        touch(a / rel)
    return a


@pytest.mark.parametrize("name,text", [
    ("m.csv", "path,size\n./a/x.png,10\nb//IM1,\na/x.png,12\n\"c d/ünï.jpeg\",3\n{root}/b/IM1,4\n"),
    ("m.txt", "a/x.png\nb/IM1\nc d/ünï.jpeg\na/x.png\n"),
])
def test_a_manifest_is_normalised_and_duplicates_count_once(archive, tmp_path, name, text):
    (tmp_path / name).write_text(text.format(root=archive))
    listing = read_manifest(str(tmp_path / name), str(archive))
    assert listing.files["path"].to_pylist() == ["a/x.png", "b/IM1", "c d/ünï.jpeg"]
    assert listing.files["sniff"].to_pylist() == [False, True, False]
    if name.endswith(".csv"):
        assert listing.files["size"].to_pylist() == [12, 4, 3]


def test_a_parquet_manifest(archive, tmp_path):
    pq.write_table(pa.table({"path": ["b/IM1", "a/x.png"], "size": [5, 6], "study": ["s", "t"]}), tmp_path / "m.parquet")
    assert rows(read_manifest(str(tmp_path / "m.parquet"), str(archive))) == [("a/x.png", 6, False), ("b/IM1", 5, True)]


@pytest.mark.parametrize("text,message", [
    ("path\nok.png\n../secret.png\n", "entry 2: '../secret.png' is not a file inside the archive"),
    ("path\n/etc/passwd\n", "'/etc/passwd' is not a file inside the archive"),
    ("path\na/../../b.png\n", "'a/../../b.png' is not a file inside"),
    ("path\ns3://other/x.png\n", "'s3://other/x.png' is not a file inside"),
    # \xNN escapes stand for the bytes of non-UTF-8 names: decoded, these would leave the archive.
    ("path\nok.png\n\\x2e\\x2e\\x2fsecret.png\n", "entry 2: "),
    ("path\na/\\x2E\\x2e/\\x2e\\x2e/b.png\n", "is not a file inside"),
    ("path\n\\x2fetc\\x2fpasswd\n", "is not a file inside"),
    ("path\n\"\"\n", "'' is not a file inside"),
    ("name\nx.png\n", "has no `path` column"),
    ("path,size\nx.png,big\n", "is not readable as .csv"),
])
def test_a_manifest_that_leaves_the_archive_is_refused_in_one_line(archive, tmp_path, text, message):
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(".", r"\.")) as e:
        read_manifest(str(tmp_path / "m.csv"), str(archive))
    assert "\n" not in str(e.value)


def test_manifest_and_archive_must_exist(archive, tmp_path):
    with pytest.raises(InputError, match="Manifest not found"):
        read_manifest(str(tmp_path / "none.csv"), str(archive))
    (tmp_path / "m.csv").write_text("path\nx.png\n")
    with pytest.raises(InputError, match="Archive not found"):
        read_manifest(str(tmp_path / "m.csv"), str(tmp_path / "no-archive"))


def test_resume_is_an_anti_join_that_keeps_order():
    files = pa.table({"path": ["a", "b", "c", "d"], "size": [1, 2, 3, 4], "sniff": [False] * 4}, schema=LISTING)
    assert pending(files, [pa.array(["c", "zz"]), pa.array(["a"])])["path"].to_pylist() == ["b", "d"]
    assert pending(files, [pa.array([], pa.string())]).num_rows == 4
    assert pending(files, []).num_rows == 4


def test_limit_takes_the_first_files_by_path(tree):
    listing = list_archive(str(tree))
    assert listing.first(5).files["path"].to_pylist() == sorted(r[0] for r in reference_walk(tree))[:5]


def test_the_listing_benchmark_builds_its_hard_link_archive(tmp_path):
    """jobs/bench_listing.py builds its archive this way (without --archive): every link is listed,
    the share of extensionless DICOMs included."""
    from cxr_batch.bench.listing import ListingBenchSettings, build_local

    built = build_local(tmp_path / "a", ListingBenchSettings(workdir=str(tmp_path), files=200))
    listing = list_archive(built["path"])
    assert built["files"] == listing.files.num_rows == 200 and built["dicom_files"] == 2
    assert sum(1 for p in listing.files["path"].to_pylist() if "." not in p.rsplit("/", 1)[-1]) == 2


def test_a_folder_that_fails_to_list_is_listed_again_after_a_backoff(tree, monkeypatch):
    """A folder whose scandir fails twice (a remount, a throttled LIST) and then works is listed in
    full; one that keeps failing is named in the listing, never dropped in silence."""
    import cxr_batch.archive.discover as discover

    monkeypatch.setattr(discover, "LIST_BACKOFF_S", 0.01)
    expected = reference_walk(tree)
    real_scandir, failures = os.scandir, {"p03/study3": 2, "p07/study7": 99}

    def flaky_scandir(path):
        for rel, left in failures.items():
            if str(path).endswith(rel) and left:
                failures[rel] -= 1
                raise OSError(5, "Input/output error")
        return real_scandir(path)

    monkeypatch.setattr(discover.os, "scandir", flaky_scandir)
    listing = list_archive(str(tree), threads=4)
    assert rows(listing) == [r for r in expected if not r[0].startswith("p07/study7/")]
    assert (listing.unreadable_folders, listing.unreadable_entries, listing.incomplete) == (1, 0, 1)
    assert listing.unlisted == ("p07/study7/: input/output error",)
    assert failures["p03/study3"] == 0 and failures["p07/study7"] == 99 - discover.LIST_ATTEMPTS


def test_only_the_escapes_of_non_utf8_bytes_are_undone(tmp_path):
    """A name the listing escaped (Latin-1 bytes) is found again; an escaped "../" stays a plain name
    inside the archive, so no path can be made to leave it by escaping."""
    from cxr_batch.archive.storage import local_path

    root = tmp_path / "archive"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(b"s")
    latin = os.path.join(os.fsencode(root), b"caf\xe9.png")
    with open(latin, "wb") as f:
        f.write(b"x")
    assert rows(list_archive(str(root))) == [("caf\\xe9.png", 1, False)]
    assert os.fsencode(local_path(str(root), "caf\\xe9.png")) == latin
    escaped = local_path(str(root), "\\x2e\\x2e\\x2fsecret.png")
    assert os.path.dirname(escaped) == str(root) and not os.path.exists(escaped)
