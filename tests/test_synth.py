"""The example archive: phantoms carry the signal only where truth.csv says, and the archive
has exactly the files truth.csv lists."""

import csv

import numpy as np
import pytest
from PIL import Image

from cxr_batch import CLASSES
from cxr_batch.errors import InputError
from cxr_batch.synth.archive import make_archive
from cxr_batch.synth.phantom import _anatomy, _canonical_grid, phantom


def _pair(seed, size=128):
    """The same phantom without and with its opacity (same generator state both ways)."""
    normal, none = phantom(np.random.default_rng(seed), size, opacity=False)
    sick, truth = phantom(np.random.default_rng(seed), size, opacity=True)
    return normal, none, sick, truth


def _disc(size, truth, scale=1.0):
    yy, xx = np.mgrid[:size, :size]
    d = np.hypot((xx + 0.5) / size - truth["x"], (yy + 0.5) / size - truth["y"])
    return d <= truth["r"] * scale, d


@pytest.mark.parametrize("size", [64, 256, 700])
def test_shape_dtype_and_truth_keys(size):
    img, none = phantom(np.random.default_rng(0), size, opacity=False)
    assert img.shape == (size, size) and img.dtype == np.uint8 and none is None
    img, truth = phantom(np.random.default_rng(0), size, opacity=True)
    assert img.shape == (size, size) and img.dtype == np.uint8
    assert set(truth) == {"x", "y", "r"}
    assert 0 < truth["x"] < 1 and 0 < truth["y"] < 1 and 0.06 <= truth["r"] <= 0.12
    # Not a blank or saturated frame: dark air at the sides, a bright mediastinum, midtones.
    assert img[:, :2].mean() < 60 and img.max() > 150 and 60 < np.median(img) < 200


def test_deterministic_for_a_seed():
    a = phantom(np.random.default_rng(7), 128, opacity=True)
    b = phantom(np.random.default_rng(7), 128, opacity=True)
    c = phantom(np.random.default_rng(8), 128, opacity=True)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("seed", range(6))
def test_opacity_is_the_only_difference_and_is_brighter(seed):
    normal, _, sick, truth = _pair(seed)
    inside, d = _disc(128, truth, 1.0)
    diff = sick.astype(float) - normal.astype(float)
    # Everything else identical (up to rounding/clipping): the only signal is the opacity.
    assert np.abs(diff[d > 2 * truth["r"]]).max() <= 1
    assert diff[inside].mean() > 8  # uint8 levels: clearly brighter where it was planted
    # ...but textured and soft, not a saturated disc.
    assert sick[inside].max() < 255 and diff[inside].std() > 2


def test_opacity_lifts_disc_against_its_ring():
    """Local contrast, as a reader sees it: the lesion lifts the disc against the ring around
    it by well over the grain, in every phantom. (The disc alone need not beat the ring: the
    ring may lie over heart or chest wall, brighter than any lung.)"""
    for seed in range(10):
        normal, _, sick, truth = _pair(seed)
        inside, d = _disc(128, truth, 0.7)
        ring = (d > truth["r"] * 1.3) & (d < truth["r"] * 2.0)
        lift = (sick[inside].mean() - sick[ring].mean()) - (normal[inside].mean() - normal[ring].mean())
        assert lift > 15, f"seed {seed}: the opacity adds only {lift:.1f} grey levels of local contrast"


@pytest.mark.parametrize("seed", range(8))
def test_truth_centre_lies_in_a_lung_field(seed):
    size = 128
    _, truth = phantom(np.random.default_rng(seed), size, opacity=True)
    # Redraw the same anatomy from the same stream to get the lung mask.
    rng = np.random.default_rng(seed)
    u, v = _canonical_grid(rng, size)
    _, lung, _ = _anatomy(rng, u, v)
    iy, ix = int(truth["y"] * size), int(truth["x"] * size)
    assert lung[iy, ix] > 0.5


def test_both_lungs_get_lesions():
    xs = [phantom(np.random.default_rng(s), 64, opacity=True)[1]["x"] for s in range(40)]
    right = np.mean(np.array(xs) > 0.5)
    assert 0.25 < right < 0.75


def test_refuses_too_small_size():
    with pytest.raises(InputError, match="at least 32"):
        phantom(np.random.default_rng(0), 16, opacity=False)


def _read_truth(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_make_archive_layout_counts_and_truth(tmp_path):
    out = tmp_path / "arch"
    truth_path = make_archive(out, n_train=6, n_val=3, n_test=4, size=64, seed=1, pos_fraction=0.5)
    assert truth_path == out / "truth.csv"
    rows = _read_truth(truth_path)
    assert list(rows[0]) == ["path", "label", "x", "y", "r"]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpeg"))
    assert sorted(r["path"] for r in rows) == files  # every file listed once, nothing else
    for split, n in (("train", 6), ("val", 3), ("test", 4)):
        pos = len(list((out / split / "PNEUMONIA").glob("*.jpeg")))
        neg = len(list((out / split / "NORMAL").glob("*.jpeg")))
        assert pos + neg == n and pos == round(n * 0.5)
    for r in rows:
        assert r["label"] in CLASSES and r["path"].split("/")[1] == r["label"]
        with Image.open(out / r["path"]) as im:
            assert im.format == "JPEG" and im.size == (64, 64) and im.mode == "L"
        if r["label"] == "PNEUMONIA":
            assert 0 < float(r["x"]) < 1 and 0 < float(r["y"]) < 1 and 0 < float(r["r"]) < 0.2
        else:
            assert r["x"] == r["y"] == r["r"] == ""


def test_make_archive_deterministic(tmp_path):
    a = make_archive(tmp_path / "a", n_train=3, n_val=1, n_test=2, size=48, seed=5)
    b = make_archive(tmp_path / "b", n_train=3, n_val=1, n_test=2, size=48, seed=5)
    assert a.read_text() == b.read_text()
    for r in _read_truth(a):
        assert (a.parent / r["path"]).read_bytes() == (b.parent / r["path"]).read_bytes()


def test_make_archive_pos_fraction_and_empty_dir(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()  # an existing empty directory is fine
    rows = _read_truth(make_archive(out, n_train=4, n_val=0, n_test=0, size=48, pos_fraction=0.0))
    assert [r["label"] for r in rows] == ["NORMAL"] * 4


def test_make_archive_refuses_non_empty_dir(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(InputError, match="not empty"):
        make_archive(tmp_path, n_train=2, n_val=0, n_test=0, size=48)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_make_archive_rejects_bad_arguments(tmp_path):
    with pytest.raises(InputError, match="pos_fraction"):
        make_archive(tmp_path / "x", n_train=2, pos_fraction=1.5)
    with pytest.raises(InputError, match="counts"):
        make_archive(tmp_path / "y", n_train=-1)
    with pytest.raises(InputError, match="at least 32"):
        make_archive(tmp_path / "z", size=8)
    assert not any(tmp_path.iterdir())  # nothing written before the arguments were checked
