"""Each plot writes a PNG that Pillow opens, at a sensible size, headless, into new folders."""

import numpy as np
import pytest
from PIL import Image

from cxr_batch.reports import metrics
from cxr_batch.reports import plots


def _png(path, min_w=300, min_h=250):
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert min_w <= w <= 4000 and min_h <= h <= 4000, im.size
        # Not a blank canvas: a drawn figure has many distinct colours.
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 20
        return im.size


@pytest.fixture
def scored():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = 1 / (1 + np.exp(-(rng.normal(size=200) + 1.5 * (2 * y - 1))))
    return y, s


def test_plot_roc(tmp_path, scored):
    y, s = scored
    t = metrics.youden_threshold(y, s)
    out = plots.plot_roc(y, s, t, tmp_path / "new" / "dir" / "roc.png", title="Test ROC")
    assert out == tmp_path / "new" / "dir" / "roc.png"
    _png(out)


def test_plot_roc_accepts_str_path_and_one_class(tmp_path):
    out = plots.plot_roc([1, 1, 1], [0.2, 0.5, 0.9], 0.5, str(tmp_path / "roc1.png"))
    _png(out)


def test_plot_confusion(tmp_path, scored):
    y, s = scored
    c = metrics.binary_metrics(y, s, 0.5)["confusion"]
    _png(plots.plot_confusion(c, tmp_path / "cm.png"))
    # An empty true class must not divide by zero.
    _png(plots.plot_confusion({"tn": 0, "fp": 0, "fn": 3, "tp": 7}, tmp_path / "cm0.png"))
    with pytest.raises(ValueError, match="tn, fp, fn, tp"):
        plots.plot_confusion({"tp": 1}, tmp_path / "bad.png")


def test_plot_training_curves_tolerates_missing_keys(tmp_path):
    history = [
        {"epoch": e, "train_loss": 1 / e, "train_acc": 1 - 0.5 / e, "val_loss": 1.2 / e,
         "val_acc": 1 - 0.6 / e, "val_auc": 1 - 0.4 / e, "lr": 1e-3, "phase": "warmup" if e <= 2 else "finetune"}
        for e in range(1, 7)
    ]
    del history[3]["val_auc"]          # a skipped validation
    history[4]["val_loss"] = None
    del history[5]["epoch"]            # position stands in
    w, h = _png(plots.plot_training_curves(history, tmp_path / "curves.png"))
    assert w > 2 * h  # three panels side by side
    _png(plots.plot_training_curves([{"train_loss": 0.7}], tmp_path / "one.png"))
    _png(plots.plot_training_curves([], tmp_path / "none.png"))


def test_plot_montage_from_files_and_arrays(tmp_path):
    rgb = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "cam.png")
    items = [
        {"image": tmp_path / "cam.png", "caption": "a.dcm  true NORMAL  p(PNEUMONIA)=0.97"},
        {"image": str(tmp_path / "cam.png"), "caption": "b.jpg"},
        {"image": np.linspace(0, 1, 32 * 32).reshape(32, 32), "caption": "gray float"},
        {"image": rgb[:, :, 0], "caption": "gray uint8"},
        {"image": rgb, "caption": "a long caption " * 6},
    ]
    w, h = _png(plots.plot_montage(items, tmp_path / "montage.png", cols=3))
    assert w > h  # 3 columns x 2 rows


def test_plot_montage_empty_says_no_errors(tmp_path):
    _png(plots.plot_montage([], tmp_path / "empty.png"))
