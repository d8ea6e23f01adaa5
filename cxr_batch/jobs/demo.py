"""``cxr-batch demo``: the whole flow on the built-in phantom archive, minutes on a laptop CPU.

synth -> train (ResNet-18 from scratch, 2 Ray Train workers) -> score the test split -> report.
Small model and image size because a CPU has to do it quickly; the same code path trains a
ResNet-101 at 224 px on real data.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..archive import storage
from ..fields import OUTPUT, TRAINING, setting


@dataclass(frozen=True, kw_only=True)
class DemoSettings:
    out: str = setting("demo", "Folder for the archive, the run and the report.", group=OUTPUT)
    n_train: int = setting(400, "Training phantoms.", group=TRAINING)
    n_val: int = 80
    n_test: int = 120
    phantom_size: int = 160
    image_size: int = 128
    # The overlays a first-time user opens: the model sees 128 px, a person wants a bigger picture
    # (upsampled from the phantom itself, so the anatomy stays sharp under the heat).
    cam_size: int = 320
    arch: str = "resnet18"
    epochs: int = setting(8, "Training epochs.", group=TRAINING)
    batch_size: int = 16
    lr: float = 5e-4
    workers: int = 2
    seed: int = 0


def run_demo(d: DemoSettings, *, echo=print, epoch_progress=None, score_progress=None) -> dict:
    from ..synth.archive import make_archive
    from .evaluate import EvaluateSettings, run_evaluate
    from .train import run_train
    from .train_config import TrainSettings

    archive = storage.join(d.out, "archive")
    if storage.exists(storage.join(archive, "truth.csv")):
        echo(f"[1/3] phantom archive already at {archive}")
    else:
        make_archive(archive, n_train=d.n_train, n_val=d.n_val, n_test=d.n_test, size=d.phantom_size, seed=d.seed)
        echo(f"[1/3] wrote {d.n_train + d.n_val + d.n_test} phantom X-rays to {archive}")
    echo(f"[2/3] training {d.arch} from scratch for {d.epochs} epochs ({d.workers} Ray Train workers)")
    run = storage.join(d.out, "run")
    t = run_train(TrainSettings(data=archive, out=run, arch=d.arch, weights="none", epochs=d.epochs,
                                batch_size=d.batch_size, lr=d.lr, image_size=d.image_size, workers=d.workers,
                                seed=d.seed), echo=echo, progress=epoch_progress, register=False)
    auc = "n/a" if t["val_auc"] is None else f"{t['val_auc']:.3f}"
    echo(f"      best epoch {t['best_epoch']}: val AUC {auc}")
    echo(f"[3/3] scoring {storage.join(archive, 'test')} and writing the report")
    report = storage.join(d.out, "report")
    m = run_evaluate(EvaluateSettings(checkpoint=t["best_checkpoint"], folder=storage.join(archive, "test"), out=report,
                                      cam_size=d.cam_size),
                     progress=score_progress)
    return {"train": t, "metrics": m, "report": storage.join(report, "report.md"), "report_dir": storage.absolute(report),
            "checkpoint": t["best_checkpoint"], "out": storage.absolute(d.out)}
