"""`cxr-batch train` (also `python jobs/train.py`) and `cxr-batch evaluate`."""

from __future__ import annotations

import click

from .console import Console
from .options import cam_point_option, cam_scale_option, cam_size_option, cluster_options, friendly, output_options
from .summaries import format_eval_summary, format_train_summary


@click.command()
@click.argument("data")
@click.option("--out", "-o", required=True, help="Run folder (local or s3://): last.ckpt, best.ckpt, history.json. Re-run to resume.")
@click.option("--arch", type=click.Choice(["resnet18", "resnet50", "resnet101"]), default="resnet101", show_default=True)
@click.option("--weights", default="imagenet", show_default=True, metavar="imagenet|none|FILE",
              help="Start from torchvision's ImageNet weights, random weights, or a local state-dict file.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True, help="Total epochs, warm-up included.")
@click.option("--warmup-epochs", type=click.IntRange(min=0), default=1, show_default=True,
              help="Epochs training only the new head with the backbone frozen (pretrained weights only).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Per worker.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Fine-tuning learning rate (AdamW, cosine decay). Default 1e-4 pretrained, 5e-4 from scratch.")
@click.option("--image-size", type=click.IntRange(min=64), default=224, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Data-parallel Ray Train workers (one per GPU with --gpu).")
@click.option("--gpu/--no-gpu", default=None, help="Train on GPUs. Default: when the cluster has them.")
@click.option("--cpus-per-worker", type=click.FloatRange(min=0.5), default=None,
              help="CPUs (and torch threads) per worker. Default: on CPU workers the most each that still places"
                   " every worker (one worker on a node uses all its cores); 1 on GPU workers.")
@click.option("--placement", type=click.Choice(["PACK", "SPREAD", "STRICT_SPREAD"]), default="PACK", show_default=True,
              help="PACK fills one node first (fast all-reduce); SPREAD prefers one worker per node; STRICT_SPREAD requires it.")
@click.option("--max-failures", type=click.IntRange(min=0), default=1, show_default=True,
              help="Worker-group restarts (from the last checkpoint) before the run fails.")
@click.option("--target-sensitivity", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Choose the threshold reaching this sensitivity on val (default: Youden's J).")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1, show_default=True,
              help="Share of train/ used for validation when val/ is missing or tiny: whole patients, stratified by class.")
@click.option("--cam-consistency", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Weight of the CAM flip-consistency loss: each image trains beside its mirror image and their"
                   " CAMs must mirror too, so the network cannot learn its evidence off the lesion. 0 = off.")
@click.option("--cam-quiet", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Weight of the quiet-NORMAL loss: no cell of a NORMAL training image's CAM may vote PNEUMONIA, so"
                   " the map carries no pattern common to both classes that could outshine a faint lesion. 0 = off.")
@click.option("--cam-layer", type=click.Choice(["4", "3", "2"]), default="4", show_default=True,
              help="Where the network ends and its CAM is read: 4 is the whole ResNet; 3 and 2 cut it after layer3 or"
                   " layer2 for a finer map, and learn more slowly.")
@click.option("--cam-stride", type=click.Choice(["32", "16"]), default=None,
              help="With --cam-layer 4: 32 keeps layer4 as built; 16 drops its last stride (dilated in ResNet-50/101)"
                   " for a finer map. Default: the layer's own.")
@click.option("--translate", type=click.FloatRange(0, 0.5, max_open=True), default=0.0, show_default=True,
              help="Random shift of each training image, up to this share of its side. 0 = off.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--register/--no-register", default=None,
              help="Make best.ckpt the default model of `cxr-batch score` on this machine when the run finishes."
                   " Default: when Ray runs in this process and the model is not weak (best val AUC below"
                   " 0.8, or still learning); never when joining a cluster (--address or RAY_ADDRESS, as in"
                   " `ray job submit`), whose driver may be on another machine.")
@cluster_options
@output_options
@friendly
def train(data, out, arch, weights, epochs, warmup_epochs, batch_size, lr, image_size, workers, gpu, cpus_per_worker,
          placement, max_failures, target_sensitivity, val_fraction, cam_consistency, cam_quiet, cam_layer, cam_stride, translate, seed, register,
          address, wait_for_gpus, wait_timeout, as_json, verbose):
    """Fine-tune a ResNet on DATA/train (NORMAL/ and PNEUMONIA/ folders), validate on DATA/val.

    Data-parallel over --workers with Ray Train. Each epoch writes OUT/last.ckpt; the best epoch
    (highest val AUC) is OUT/best.ckpt with its decision threshold. The test split is never used.

    Example: cxr-batch train /data/chest_xray --out runs/r101 --epochs 10
    """
    from ..jobs.ray_env import joining_a_cluster, ray_for_job
    from ..jobs.train import run_train
    from ..jobs.train_config import TrainSettings

    s = TrainSettings(data=data, out=out, arch=arch, weights=weights, epochs=epochs, warmup_epochs=warmup_epochs,
                      batch_size=batch_size, lr=lr, image_size=image_size, workers=workers, gpu=gpu,
                      cpus_per_worker=cpus_per_worker, placement=placement, max_failures=max_failures,
                      target_sensitivity=target_sensitivity, val_fraction=val_fraction,
                      cam_consistency=cam_consistency, cam_quiet=cam_quiet, cam_layer=int(cam_layer),
                      cam_stride=None if cam_stride is None else int(cam_stride),
                      translate=translate, seed=seed)
    console = Console(as_json=as_json, verbose=verbose)
    console.settings(s)
    if register is None and joining_a_cluster(address):
        register = False
    with ray_for_job(address, wait_for_gpus=wait_for_gpus, wait_timeout=wait_timeout, verbose=verbose,
                     echo=console.note):
        summary = run_train(s, echo=console.note, progress=console.epoch_progress(), register=register)
    console.summary(format_train_summary(summary), summary)


@click.command()
@click.argument("checkpoint")
@click.argument("folder")
@click.option("--out", "-o", required=True, help="Report folder: report.html, report.md, metrics.json, PNG plots, predictions.")
@click.option("--truth", default=None, help="truth.csv of lesion positions (default: looked up in FOLDER and its parents).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--bootstrap", "n_boot", type=click.IntRange(min=100), default=1000, show_default=True, help="Resamples for the 95% CIs.")
@click.option("--deletion-images", type=click.IntRange(min=0), default=32, show_default=True,
              help="PNEUMONIA images (a seeded sample) for the CAM deletion curves; 0 = skip them.")
@click.option("--deletion-steps", type=click.IntRange(min=1), default=10, show_default=True,
              help="Steps from nothing to everything greyed out (2 x steps + 1 forward passes per image).")
@cam_size_option
@cam_scale_option
@cam_point_option("evidence")
@click.option("--ood-check", default=None, metavar="DIR",
              help="Also score DIR, images the model must not score (other views, modalities, photographs), and report"
                   " the share put out of scope, the share of FOLDER wrongly put out of scope and their AUROC.")
@cluster_options
@output_options
@friendly
def evaluate(checkpoint, folder, out, truth, batch_size, n_boot, deletion_images, deletion_steps, cam_size, cam_scale, cam_point,
             ood_check, address, wait_for_gpus, wait_timeout, as_json, verbose):
    """Score a labelled FOLDER with CHECKPOINT and write a metrics report with plots: accuracy, AUC and
    the rest with CIs, calibration (ECE before/after temperature scaling, reliability diagram), CAM
    deletion curves against random ones, and CAM pointing when a truth.csv is found.

    Example: cxr-batch evaluate runs/r101/best.ckpt /data/chest_xray/test --out runs/r101/test-report
    """
    from ..jobs.evaluate import EvaluateSettings, run_evaluate
    from ..jobs.ray_env import ray_for_job

    s = EvaluateSettings(checkpoint=checkpoint, folder=folder, out=out, truth=truth, batch_size=batch_size, n_boot=n_boot,
                         deletion_images=deletion_images, deletion_steps=deletion_steps, cam_size=cam_size,
                         cam_scale=cam_scale, cam_point=cam_point, ood_check=ood_check)
    console = Console(as_json=as_json, verbose=verbose)
    console.settings(s)
    with ray_for_job(address, wait_for_gpus=wait_for_gpus, wait_timeout=wait_timeout, verbose=verbose,
                     echo=console.note):
        m = run_evaluate(s, progress=console.score_progress(), echo=console.note, phase=console.phase)
    console.summary(format_eval_summary(m, out), m)
