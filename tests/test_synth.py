"""The example archive: phantoms with the intensity layout of a real chest film, lesions anywhere
in the lung fields and of any size, the signal only where truth.csv says, and an archive that has
exactly the files truth.csv lists."""

import csv

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from cxr_batch import CLASSES
from cxr_batch.errors import InputError
from cxr_batch.synth.archive import make_archive
from cxr_batch.synth.phantom import LESION_RADIUS, draw_chest, phantom


def _pair(seed, size=128):
    """The same phantom without and with its lesion (same generator state both ways)."""
    normal, none = phantom(np.random.default_rng(seed), size, opacity=False)
    sick, truth = phantom(np.random.default_rng(seed), size, opacity=True)
    return normal, none, sick, truth


@pytest.mark.parametrize("size", [64, 256, 700])
def test_shape_dtype_and_truth_keys(size):
    img, none = phantom(np.random.default_rng(0), size, opacity=False)
    assert img.shape == (size, size) and img.dtype == np.uint8 and none is None
    img, truth = phantom(np.random.default_rng(0), size, opacity=True)
    assert img.shape == (size, size) and img.dtype == np.uint8
    assert set(truth) == {"x", "y", "r"}
    assert 0 < truth["x"] < 1 and 0 < truth["y"] < 1 and 0.01 < truth["r"] < 0.25
    # Not a blank or saturated frame: dark air above the shoulders, bright abdomen, midtones.
    assert img[: size // 20].min() < 40 and img.max() > 150 and 60 < np.median(img) < 220


def test_deterministic_for_a_seed():
    a = phantom(np.random.default_rng(7), 128, opacity=True)
    b = phantom(np.random.default_rng(7), 128, opacity=True)
    c = phantom(np.random.default_rng(8), 128, opacity=True)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert not np.array_equal(a[0], c[0])


def _film_and_chest(seed, size=256):
    """The NORMAL film and the anatomy it was drawn from (same stream: draw_chest comes first)."""
    img, _ = phantom(np.random.default_rng(seed), size, opacity=False)
    return img.astype(float), draw_chest(np.random.default_rng(seed), size)


def test_intensity_layout_of_a_real_chest():
    """What a reader expects of any frontal film: lungs darker than the heart, the abdomen and the
    mediastinum; within the lungs, the lower zone (above the domes) brighter than the middle zone."""
    mid_vs_low, heart_vs_lung, abdomen_vs_lung = [], [], []
    for seed in range(8):
        img, c = _film_and_chest(seed)
        air = (c.lung > 0.35) & (c.heart < 0.05)
        rows = np.nonzero(air.any(1))[0]
        top, bottom = rows.min(), rows.max()
        zone = np.zeros_like(air)
        zone[top + (bottom - top) * 2 // 5: top + (bottom - top) * 3 // 5] = True
        lower = (c.lung > 0.05) & (c.heart < 0.05) & (c.below_dome < 0.5)
        lower[: top + (bottom - top) * 4 // 5] = False
        mid_vs_low.append(img[lower].mean() - img[air & zone].mean())
        heart_vs_lung.append(img[c.heart > 0.7].mean() - img[air].mean())
        abdomen_vs_lung.append(img[(c.below_dome > 0.9) & (c.lung < 0.01)].mean() - img[air].mean())
    assert min(heart_vs_lung) > 25 and min(abdomen_vs_lung) > 30, (heart_vs_lung, abdomen_vs_lung)
    assert min(mid_vs_low) > 5, mid_vs_low


@pytest.mark.parametrize("seed", range(6))
def test_lesion_is_the_only_difference_and_is_brighter(seed):
    size = 256
    normal, _, sick, truth = _pair(seed, size)
    lesion = draw_chest(np.random.default_rng(seed), size).lesion
    diff = sick.astype(float) - normal.astype(float)
    # Everything else identical up to rounding, beyond the reach of the film's unsharp masking.
    far = ~ndimage.binary_dilation(lesion > 1e-3 * lesion.max(), iterations=size // 12)
    assert np.abs(diff[far]).max() <= 1
    core = lesion >= 0.5 * lesion.max()
    assert diff[core].mean() > 3  # brighter where it was planted (faint behind the heart, never absent)
    assert np.mean(sick[core] == 255) < 0.1 and diff[core].std() > 2  # soft and mottled, not a white disc


def test_truth_is_where_the_film_shows_the_lesion():
    """Independently of how the lesion was drawn: what it adds to the film, smoothed at its own scale
    (the mottling aside), is centred on the truth and covers its area. Over the heart the film
    compresses the lesion's contrast unevenly, so its visible centre may stray up to a radius."""
    size, dist, sizes = 256, [], []
    for seed in range(12):
        normal, _, sick, truth = _pair(seed, size)
        added = ndimage.gaussian_filter(np.clip(sick.astype(float) - normal, 0, None), 0.3 * truth["r"] * size)
        m = added >= 0.5 * added.max()
        ys, xs = np.nonzero(m)
        w = added[m]
        cx, cy = (np.average(xs, weights=w) + 0.5) / size, (np.average(ys, weights=w) + 0.5) / size
        dist.append(np.hypot(cx - truth["x"], cy - truth["y"]) / truth["r"])
        sizes.append(np.sqrt(m.sum() / np.pi) / size / truth["r"])
    assert np.mean(np.array(dist) <= 0.5) >= 0.75 and max(dist) < 1.0, dist
    assert 0.6 < np.median(sizes) < 1.4, sizes


def test_lesions_lie_anywhere_in_the_lungs_and_range_from_small_to_lobar():
    """Over the heart and over the diaphragm too, in both lungs, upper and lower zones; radii from a
    small patch to a lobe."""
    over_heart = over_dome = right = upper = 0
    radii = []
    n = 160
    for seed in range(n):
        c = draw_chest(np.random.default_rng(seed), 96)
        t = c.truth
        iy, ix = min(95, int(t["y"] * 96)), min(95, int(t["x"] * 96))
        assert c.lung[iy, ix] > 0 or c.lesion[iy, ix] > 0, seed  # in a lung field (or its lesion)
        over_heart += c.heart[iy, ix] > 0.3
        over_dome += c.below_dome[iy, ix] > 0.5
        right += t["x"] > 0.5
        upper += t["y"] < 0.4
        radii.append(t["r"])
    assert over_heart >= n * 0.05 and over_dome >= n * 0.04, (over_heart, over_dome)
    assert 0.3 * n < right < 0.7 * n and upper > 0.2 * n
    radii = np.array(radii)
    assert radii.min() < 0.04 and radii.max() > 0.12 and np.mean(radii > 0.1) > 0.1, np.percentile(radii, [0, 50, 100])
    assert LESION_RADIUS[0] < np.median(radii) < LESION_RADIUS[1]


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
            assert 0 < float(r["x"]) < 1 and 0 < float(r["y"]) < 1 and 0 < float(r["r"]) < 0.25
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
