"""Deletion curves: a CAM that marks the evidence a model uses beats random regions; one that points
elsewhere does not. A toy model whose evidence is known exactly (one bright block)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit

from cxr_batch.model.cam import CamGrid
from cxr_batch.reports.faithfulness import deletion_curves, deletion_stack, sample_positives, summarize

SIZE, GRID = 32, 4  # 4 x 4 blocks of 8 px
CELLS = CamGrid(stride=8, offset=3.5, input_size=SIZE)  # the toy CAM's cell j is block j, centred on pixel 8j + 3.5


def _images(n, seed=0):
    """Dark noisy images, each with a bright 8 x 8 'lesion' in one block; -> (pixels, lesion block)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(20, 60, (n, SIZE, SIZE)).astype(np.uint8)
    blocks = rng.integers(0, GRID * GRID, n)
    for img, b in zip(pixels, blocks):
        i, j = divmod(int(b), GRID)
        img[8 * i:8 * i + 8, 8 * j:8 * j + 8] = 230
    return pixels, blocks


def _model(cam_sign):
    """P(PNEUMONIA) rises with the brightest 8 x 8 block. Its CAM is each block's brightness
    (cam_sign 1: it marks the evidence) or its darkness (-1: it ranks the evidence last)."""
    def score(pixels):
        x = pixels.astype(np.float64).reshape(len(pixels), GRID, 8, GRID, 8).mean((2, 4))
        brightest = x.reshape(len(pixels), -1).max(1)
        return expit((brightest - 120) / 15), (cam_sign * x).astype(np.float32)
    return score


def test_a_cam_on_the_evidence_falls_faster_than_random_regions():
    pixels, _ = _images(24)
    honest = _model(1)
    curves = deletion_curves(honest, pixels, cells=CELLS, steps=8, seed=0)
    s = summarize(curves, n_boot=200)
    assert s["cam_curve"][0] > 0.99 and s["cam_curve"][1] < 0.05  # the lesion block goes in step 1 (2 of 16 blocks)
    assert s["auc_difference"] > 0.2 and s["auc_difference_ci95"][0] > 0
    assert s["share_of_images_cam_faster"] > 0.8
    assert s["cam_curve"][-1] == pytest.approx(s["random_curve"][-1])  # both end at the all-grey image


def test_a_cam_that_points_elsewhere_does_no_better_than_random():
    pixels, _ = _images(24)
    liar = _model(-1)  # the lesion goes last
    s = summarize(deletion_curves(liar, pixels, cells=CELLS, steps=8, seed=0), n_boot=200)
    assert s["auc_difference"] < -0.2 and s["auc_difference_ci95"][1] < 0


def test_deletion_stack_greys_the_blocks_in_order_with_the_image_mean():
    pixels, _ = _images(1, seed=3)
    img = pixels[0]
    order = np.arange(GRID * GRID)[::-1]
    stack = deletion_stack(img, order, (GRID, GRID), 4)
    fill = round(float(img.mean()))
    assert stack.shape == (4, SIZE, SIZE) and (stack[-1] == fill).all()
    assert (stack[0, 24:] == fill).all() and np.array_equal(stack[0, :24], img[:24])  # the last 4 blocks: the bottom row
    assert np.array_equal(img, pixels[0])  # the input is not modified


def test_the_sample_is_bounded_seeded_and_only_scored_positives():
    rows = [{"path": f"P/{i}.png", "label": "PNEUMONIA", "error": None} for i in range(50)]
    rows += [{"path": "N/0.png", "label": "NORMAL", "error": None}, {"path": "P/bad.png", "label": "PNEUMONIA", "error": "x"}]
    a = sample_positives(rows, 10, seed=0)
    assert len(a) == 10 and a == sample_positives(rows, 10, seed=0) and a != sample_positives(rows, 10, seed=1)
    assert all(p.startswith("P/") and p != "P/bad.png" for p in a)
    assert len(sample_positives(rows, 100, seed=0)) == 50
