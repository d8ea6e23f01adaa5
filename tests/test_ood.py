"""The out-of-distribution check: its statistics on tiny arrays (model/ood.py), their trip through a
checkpoint, and what scoring does with them on a folder of phantoms mixed with foreign images
(other views and body parts, pages of text, photographs, pydicom's CT/MR/US files)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from cxr_batch.archive.results import OUT_OF_SCOPE, SCORED, SKIPPED, read_table
from cxr_batch.jobs.score import ScoreSettings, run_score
from cxr_batch.model.ood import OodStats, auroc, fit_gaussian, from_entries, mahalanobis, threshold_at


def _t(a):
    return torch.from_numpy(np.asarray(a, np.float32))


# ---------------------------------------------------------------- the statistics

def test_a_point_far_from_both_classes_scores_higher_than_points_like_the_training_ones():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 100)
    x = rng.normal(size=(200, 6)) + np.where(y[:, None] == 1, 3.0, 0.0)
    means, precision = fit_gaussian(x, y)
    near = np.concatenate([rng.normal(size=(20, 6)), rng.normal(size=(20, 6)) + 3.0])
    far = np.full((1, 6), -8.0)
    scores = mahalanobis(_t(np.concatenate([near, far])), _t(means), _t(precision)).numpy()
    assert scores[-1] > 3 * scores[:-1].max()
    # Each class has its own mean: a point at class 1's mean is as near as one at class 0's.
    at_means = mahalanobis(_t(means), _t(means), _t(precision)).numpy()
    assert np.allclose(at_means, 0, atol=1e-3)


def test_fewer_images_than_channels_still_give_a_finite_distance():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(8, 64)), np.array([0, 1] * 4)
    means, precision = fit_gaussian(x, y)  # the sample covariance alone is singular here
    scores = mahalanobis(_t(rng.normal(size=(5, 64))), _t(means), _t(precision)).numpy()
    assert np.isfinite(scores).all() and (scores > 0).all()


def test_the_threshold_is_the_percentile_of_the_validation_scores_and_ignores_nan():
    scores = np.append(np.arange(101, dtype=float), np.nan)
    assert threshold_at(scores, 99.0) == pytest.approx(99.0)
    assert threshold_at(scores, 50.0) == pytest.approx(50.0)
    with pytest.raises(ValueError):
        threshold_at([np.nan])


def test_auroc_counts_how_often_foreign_scores_lie_above_in_distribution_ones():
    assert auroc([1, 2, 3], [4, 5]) == 1.0
    assert auroc([4, 5], [1, 2, 3]) == 0.0
    assert auroc([1, 2], [1, 2]) == 0.5
    assert auroc([1, 2, 3], [2.5, np.nan]) == pytest.approx(2 / 3)
    assert auroc([], [1]) is None


def test_statistics_survive_a_checkpoint_that_loads_with_weights_only(tmp_path):
    from cxr_batch.model.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
    from cxr_batch.model.network import build_model
    from cxr_batch.model.registry import describe

    rng = np.random.default_rng(2)
    stats = OodStats(means=rng.normal(size=(2, 512)), precision=np.eye(512) * 2, threshold=12.5, n_train=30, n_val=9)
    ck = make_checkpoint(build_model("resnet18", "none"), arch="resnet18", image_size=64, threshold=0.5, settings={})
    save_checkpoint({**ck, "ood": stats.to_entries()}, str(tmp_path / "new.ckpt"))
    save_checkpoint(ck, str(tmp_path / "old.ckpt"))
    back = from_entries(load_checkpoint(str(tmp_path / "new.ckpt")).ckpt["ood"])  # torch.load(weights_only=True)
    assert back.threshold == 12.5 and (back.n_train, back.n_val) == (30, 9)
    assert np.allclose(back.means, stats.means, atol=1e-6) and np.allclose(back.precision, stats.precision)
    for check in (False, True):  # from the small entries alone (no torch) and from the loaded file
        assert describe(str(tmp_path / "new.ckpt"), check=check).ood_threshold == 12.5
        assert describe(str(tmp_path / "old.ckpt"), check=check).ood_threshold is None
    assert from_entries(None) is None


# ---------------------------------------------------------------- scoring a mixed folder

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A ResNet-18 trained in this process on 96 phantoms at 64 px, with its OOD statistics fitted by
    the training job's own task function (jobs/ood_fit.py), and a folder of test phantoms + foreign images."""
    from tinytrain import train_here

    from cxr_batch.jobs.ood_fit import _fit_task
    from cxr_batch.synth.archive import make_archive
    from cxr_batch.synth.foreign import make_foreign

    root = tmp_path_factory.mktemp("ood")
    make_archive(root / "data", n_train=96, n_val=50, n_test=24, size=96, seed=5)
    torch.set_num_threads(2)
    s, split = train_here(root / "data", root / "run", image_size=64, epochs=4, batch_size=16)
    fitted = _fit_task({**s.__dict__}, split.train, split.val)
    mixed = root / "mixed"
    shutil.copytree(root / "data" / "test", mixed / "chest")
    make_foreign(mixed / "foreign", n=4, size=96, kinds=("lateral", "abdomen", "limb", "text", "photo"))
    dicom = mixed / "foreign" / "dicom"
    dicom.mkdir()
    from pydicom.data import get_testdata_file

    for name in ("CT_small.dcm", "MR_small.dcm", "examples_rgb_color.dcm", "SC_rgb_jpeg_dcmd.dcm"):
        shutil.copy(get_testdata_file(name), dicom / name)
    return {"ckpt": str(root / "run" / "best.ckpt"), "mixed": mixed, "root": root, "fitted": fitted}


def _score(trained, out, **kw):
    s = ScoreSettings(archive=str(trained["mixed"]), out=str(out), model=kw.pop("model", trained["ckpt"]),
                      batch_size=8, engine="local", **kw)
    summary = run_score(s)
    return summary, read_table(str(out)).to_pandas().set_index("path")


@pytest.fixture(scope="module")
def skipped(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("skip") / "out"
    return (out,) + _score(trained, out)


def test_foreign_images_are_out_of_scope_without_a_prediction_and_phantoms_are_scored(trained, skipped):
    out, summary, df = skipped
    chest = df[df.index.str.startswith("chest/")]
    foreign = df[df.index.str.startswith("foreign/")]
    assert trained["fitted"]["n_val"] == 50  # the threshold is set on val/
    assert (chest.status == SCORED).mean() >= 0.95
    # the DICOM gate skips the foreign DICOMs by their headers before the OOD check sees them
    assert foreign.status.isin([OUT_OF_SCOPE, SKIPPED]).mean() >= 0.9, foreign[["status", "ood_score"]]
    assert foreign.pred.isna().all() and (foreign[foreign.index.str.contains("dicom/")].status == SKIPPED).all()
    oos = df[df.status == OUT_OF_SCOPE]
    assert oos.pred.isna().all() and oos.cam_path.isna().all() and oos.prob_pneumonia.isna().all()
    assert oos.out_of_scope.all() and oos.error.str.startswith("out of scope").all()
    cams = out.parent / "out-cams"
    assert not any((cams / (p + ".png")).exists() for p in oos.index) and cams.is_dir()
    assert df[df.status != SKIPPED].ood_score.notna().all() and summary.out_of_scope == len(oos)
    assert not any("out-of-distribution" in n for n in summary.notes)


def test_a_rerun_treats_out_of_scope_rows_as_done(trained, skipped):
    out, first, df = skipped
    again, df2 = _score(trained, out)
    assert again.already_done == len(df) and again.scored == again.out_of_scope == 0
    assert df2.index.is_unique and len(df2) == len(df)


def test_flag_keeps_the_prediction_and_marks_the_row(trained, skipped, tmp_path):
    _, _, skip_df = skipped
    summary, df = _score(trained, tmp_path / "flag", ood="flag")
    marked = df[df.out_of_scope]
    assert list(marked.index) == list(skip_df[skip_df.status == OUT_OF_SCOPE].index)
    assert (marked.status == SCORED).all() and marked.pred.notna().all() and marked.error.isna().all()
    assert summary.flagged_out_of_scope == len(marked) and summary.out_of_scope == 0


def test_off_scores_everything_and_says_so_once(trained, tmp_path):
    summary, df = _score(trained, tmp_path / "off", ood="off")
    assert (df.status != OUT_OF_SCOPE).all() and df.ood_score.isna().all() and not df.out_of_scope.any()
    assert sum("--ood off" in n for n in summary.notes) == 1


def test_a_checkpoint_without_statistics_scores_everything_with_one_note(trained, tmp_path):
    from cxr_batch.model.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(trained["ckpt"]).ckpt
    old = tmp_path / "old.ckpt"
    save_checkpoint({k: v for k, v in ck.items() if k != "ood"}, str(old))
    summary, df = _score(trained, tmp_path / "old", model=str(old))
    assert (df.status == SCORED).sum() == summary.scored and summary.out_of_scope == 0
    assert df.ood_score.isna().all()
    notes = [n for n in summary.notes if "no out-of-distribution statistics" in n]
    assert len(notes) == 1


def test_the_report_says_why_each_file_was_not_scored_with_counts(trained, skipped, tmp_path):
    """The page's "Not scored: out of scope" section: a row per gate reason (tag and value) and one for the
    OOD check, each with its count, beside the thumbnails of the out-of-scope images."""
    import html
    import re

    from cxr_batch.reports.html.score import ReportSettings, write_score_report

    out, summary, df = skipped
    page = open(write_score_report(ReportSettings(results=str(out), out=str(tmp_path / "r.html"))).path).read()
    table = re.search(r'<table id="out_of_scope-reasons">(.*?)</table>', page, re.S).group(1)
    shown = {html.unescape(m): int(n.replace(",", ""))
             for m, n in re.findall(r'<tr><td>(.*?)</td><td class="num">([\d,]+)</td>', table)}
    gated = df[df.status == SKIPPED].error.value_counts()
    assert sum(v for k, v in shown.items() if k.startswith("not a chest radiograph")) == gated.sum() >= 4
    assert any(k.startswith("not a chest radiograph: Modality") for k in shown), shown
    assert sum(v for k, v in shown.items() if k.startswith("out of scope")) == summary.out_of_scope > 0
