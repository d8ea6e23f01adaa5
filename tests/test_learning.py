"""The default training recipe learns, on more than one kind of task.

A recipe tuned on one phantom can stop learning on real films while every test of that phantom stays
green. So the default recipe (every TrainSettings default but the ones this machine forces: ResNet-18,
random weights, small images) is trained on task families that share nothing but the question (is
there an opacity?): an additive textured opacity on a generated textured background, and the same on
a flattened phantom film (synth/texture.py). The phantom's own modelled lesions are test_train.py's
fixture, trained with the same defaults. Held-out accuracy must clear a bar far above chance by the
default epoch count. docs/decisions/001-full-network.md has the full-size runs behind the default.
"""

import pytest

from cxr_batch.jobs.evaluate import EvaluateSettings, run_evaluate
from cxr_batch.jobs.train import run_train
from cxr_batch.jobs.train_config import TrainSettings
from cxr_batch.synth.archive import make_archive

pytestmark = pytest.mark.slow

# Chance is 0.5. The bars say "learned": well above chance, below what the default reached here.
MIN_TEST_ACCURACY = 0.75
MIN_TEST_AUC = 0.8


@pytest.mark.parametrize("family", ["texture", "film"])
def test_the_default_recipe_learns_each_task_family(family, ray_session, tmp_path):
    data = tmp_path / "data"
    make_archive(data, n_train=320, n_val=40, n_test=80, size=96, seed=5, family=family)
    # One worker: the default batch per worker then makes as many optimizer steps as the full-size runs' do
    # per image seen; two workers would halve them on this small set.
    s = TrainSettings(data=str(data), out=str(tmp_path / "run"), arch="resnet18", weights="none", image_size=80,
                      workers=1)
    summary = run_train(s, register=False, echo=lambda *a: None)
    assert summary["epochs"] == TrainSettings.__dataclass_fields__["epochs"].default
    report = run_evaluate(EvaluateSettings(checkpoint=summary["best_checkpoint"], folder=str(data / "test"),
                                           out=str(tmp_path / "report"), n_boot=100, deletion_images=0))
    m = report["metrics"]
    assert report["n_scored"] == 80
    assert m["accuracy"] >= MIN_TEST_ACCURACY and m["roc_auc"] >= MIN_TEST_AUC, (family, s.cam_layer, m)
