"""`cxr-batch train` (also `python jobs/train.py`) and `cxr-batch evaluate`."""

from __future__ import annotations

import click

from .console import Console
from .options import GroupedCommand, GroupedOption, cluster_options, friendly, option_from_field, output_options
from .score import sigterm_stops_the_run
from .summaries import format_eval_summary, format_train_summary
from ..fields import OUTPUT
from ..jobs.evaluate import EvaluateSettings
from ..jobs.train_config import WEAK_VAL_AUC, TrainSettings


def _train(name: str, *decls: str, **extra):
    return option_from_field(TrainSettings, name, *decls, **extra)


@click.command(cls=GroupedCommand)
@click.argument("data")
@_train("out", "--out", "-o")
@_train("arch", "--arch")
@_train("weights", "--weights", metavar="imagenet|none|FILE")
@_train("image_size", "--image-size", type=click.IntRange(min=64), metavar="PX")
@_train("cam_layer", "--cam-layer")
@_train("cam_stride", "--cam-stride")
@_train("epochs", "--epochs", type=click.IntRange(min=1))
@_train("warmup_epochs", "--warmup-epochs", type=click.IntRange(min=0))
@_train("batch_size", "--batch-size", type=click.IntRange(min=1))
@_train("lr", "--lr", type=click.FloatRange(min=0, min_open=True))
@_train("target_sensitivity", "--target-sensitivity", type=click.FloatRange(0, 1, min_open=True, max_open=True))
@_train("val_fraction", "--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True))
@_train("cam_consistency", "--cam-consistency", type=click.FloatRange(min=0))
@_train("cam_quiet", "--cam-quiet", type=click.FloatRange(min=0))
@_train("translate", "--translate", type=click.FloatRange(0, 0.5, max_open=True))
@_train("seed", "--seed", type=int)
@_train("workers", "--workers", type=click.IntRange(min=1))
@_train("device", "--device")
@_train("gpu", "--gpu/--no-gpu", hidden=True)
@_train("cpus_per_worker", "--cpus-per-worker", type=click.FloatRange(min=0.5))
@_train("placement", "--placement")
@_train("max_failures", "--max-failures", type=click.IntRange(min=0))
@click.option("--register/--no-register", default=None, cls=GroupedOption, group=OUTPUT,
              help="Make best.ckpt the default model of `cxr-batch score` on this machine when the run finishes."
                   " Default: when Ray runs in this process and the model is not weak (best val AUC below"
                   f" {WEAK_VAL_AUC:g}, or still learning); never when joining a cluster (--address or RAY_ADDRESS, as"
                   " in `ray job submit`), whose driver may be on another machine.")
@cluster_options
@output_options
@friendly
def train(register, address, wait_for_gpus, wait_timeout, as_json, verbose, **settings):
    """Fine-tune a ResNet on DATA/train (NORMAL/ and PNEUMONIA/ folders), validate on DATA/val.

    Data-parallel over --workers with Ray Train. Each epoch writes OUT/last.ckpt; the best epoch
    (highest val AUC) is OUT/best.ckpt with its decision threshold. The test split is never used.

    Example: cxr-batch train /data/chest_xray --out runs/r101 --epochs 10
    """
    from ..jobs.ray_env import joining_a_cluster, ray_for_job
    from ..jobs.train import run_train

    s = TrainSettings(**settings)
    console = Console(as_json=as_json, verbose=verbose)
    console.settings(s)
    if register is None and joining_a_cluster(address):
        register = False
    with ray_for_job(address, wait_for_gpus=wait_for_gpus, wait_timeout=wait_timeout, verbose=verbose,
                     echo=console.note), sigterm_stops_the_run():
        summary = run_train(s, echo=console.note, progress=console.epoch_progress(), register=register)
    console.summary(format_train_summary(summary), summary)


def _evaluate(name: str, *decls: str, **extra):
    return option_from_field(EvaluateSettings, name, *decls, **extra)


@click.command(cls=GroupedCommand)
@click.argument("folder")
@_evaluate("checkpoint", "--model", "-m", metavar="CKPT")
@_evaluate("out", "--out", "-o")
@_evaluate("truth", "--truth", metavar="CSV")
@_evaluate("ood_check", "--ood-check", metavar="DIR")
@_evaluate("limit", "--limit", type=click.IntRange(min=1), metavar="N")
@_evaluate("cams", "--cams/--no-cams")
@_evaluate("cam_size", "--cam-size", type=click.IntRange(min=0), metavar="PX")
@_evaluate("cam_scale", "--cam-scale")
@_evaluate("cam_point", "--cam-point")
@_evaluate("n_boot", "--bootstrap", type=click.IntRange(min=100))
@_evaluate("deletion_images", "--deletion-images", type=click.IntRange(min=0))
@_evaluate("deletion_steps", "--deletion-steps", type=click.IntRange(min=1))
@_evaluate("batch_size", "--batch-size", type=click.IntRange(min=1))
@_evaluate("device", "--device")
@_evaluate("precision", "--precision")
@cluster_options
@output_options
@friendly
def evaluate(address, wait_for_gpus, wait_timeout, as_json, verbose, **settings):
    """Score a labelled FOLDER with the --model checkpoint and write a metrics report with plots: accuracy, AUC and
    the rest with CIs, calibration (ECE before/after temperature scaling, reliability diagram), CAM
    deletion curves against random ones, and CAM pointing when a truth.csv is found.

    Example: cxr-batch evaluate -m runs/r101/best.ckpt /data/chest_xray/test --out runs/r101/test-report
    """
    from ..jobs.evaluate import run_evaluate
    from ..jobs.ray_env import ray_for_job

    s = EvaluateSettings(**settings)
    console = Console(as_json=as_json, verbose=verbose)
    console.settings(s)
    with ray_for_job(address, wait_for_gpus=wait_for_gpus, wait_timeout=wait_timeout, verbose=verbose,
                     echo=console.note):
        m = run_evaluate(s, progress=console.score_progress(), echo=console.note)
    console.summary(format_eval_summary(m, s.out), m)
