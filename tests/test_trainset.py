"""Training data: the split, and each worker's shard decoded the way scoring decodes it."""

import os

import numpy as np

from cxr_batch.jobs.trainset import labelled_files, load_pixels, make_split
from cxr_batch.synth.archive import make_archive

from images import broken


def test_a_training_image_whose_name_is_not_utf8_is_read(tmp_path):
    make_archive(tmp_path / "data", n_train=4, n_val=0, n_test=0, size=64, seed=1)
    normal = tmp_path / "data" / "train" / "NORMAL"
    first = sorted(normal.iterdir())[0]
    first.rename(normal / os.fsdecode(b"caf\xe9.jpeg"))
    items = labelled_files(str(tmp_path / "data"), "train")
    assert ("train/NORMAL/caf\\xe9.jpeg", 0) in items
    x, y, skipped = load_pixels(str(tmp_path / "data"), items, 32, 10**6)
    assert skipped == [] and x.shape == (4, 32, 32) and sorted(y.tolist()) == [0, 0, 1, 1]


def test_unreadable_training_images_are_skipped_with_their_reason(tmp_path):
    make_archive(tmp_path / "data", n_train=4, n_val=0, n_test=0, size=64, seed=1)
    for name, data in broken().items():
        (tmp_path / "data" / "train" / "NORMAL" / name).write_bytes(data)
    items = labelled_files(str(tmp_path / "data"), "train")
    x, y, skipped = load_pixels(str(tmp_path / "data"), items, 32, 10**6)
    assert len(x) == len(y) == 4
    assert sorted(dict(skipped)) == sorted(f"train/NORMAL/{n}" for n in broken())
    assert "empty file (0 bytes)" in dict(skipped)["train/NORMAL/empty.jpeg"]


def test_a_tiny_val_folder_is_replaced_by_a_stratified_share_of_train(tmp_path):
    make_archive(tmp_path / "data", n_train=40, n_val=4, n_test=0, size=48, seed=2)
    split = make_split(str(tmp_path / "data"), val_fraction=0.25, seed=0)
    assert len(split.val) == 10 and len(split.train) == 30 and "about 25%" in split.val_note
    assert "stratified by class" in split.val_note and "because val/ has only 4 images" in split.val_note
    assert np.bincount([y for _, y in split.val]).tolist() == [5, 5]
    assert not {p for p, _ in split.val} & {p for p, _ in split.train}


def test_training_shifts_move_the_image_by_up_to_the_asked_share_of_its_side():
    """`--translate 0.1`: each image moves by its own uniform shift of up to 0.1 of the side in x and y on top of
    the crop's. Followed on a bright dot in 400 copies: its spread grows as a uniform +-0.1 adds to the crop's,
    and no copy moves further than the crop's largest move plus 0.1 of the side."""
    import torch

    from cxr_batch.jobs.trainset import augment

    size = 64
    x = torch.zeros(400, size, size, dtype=torch.uint8)
    x[:, 31:34, 31:34] = 255

    def dot_moves(translate):
        out = augment(x, torch.Generator().manual_seed(0), translate=translate)
        at = out.flatten(1).argmax(1)
        return torch.stack([at // size, at % size], 1).double() / size - 32 / size  # (dy, dx), share of the side

    crop, shifted = dot_moves(0.0), dot_moves(0.1)
    expected = (crop.std(0) ** 2 + 0.1 ** 2 / 3).sqrt()  # independent uniform shift: variances add
    assert torch.allclose(shifted.std(0), expected, rtol=0.15), (shifted.std(0), expected)
    assert (shifted.abs().amax(0) <= crop.abs().amax(0) + 0.1 + 1.5 / size).all(), (shifted.abs().amax(0), crop.abs().amax(0))
