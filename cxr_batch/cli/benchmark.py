"""`cxr-batch benchmark` (also `python jobs/benchmark.py`)."""

from __future__ import annotations

import click

from ..fields import DEVICES
from .options import friendly


@click.command()
@click.argument("workdir")
@click.option("--archive", default=None, help="Images to score. Default: generate phantoms into WORKDIR/archive (kept).")
@click.option("--images", type=click.IntRange(min=1), default=600, show_default=True, help="Images to generate / use.")
@click.option("--min-side", type=click.IntRange(min=32), default=1000, show_default=True, help="Smallest generated side, px.")
@click.option("--max-side", type=click.IntRange(min=32), default=2000, show_default=True, help="Largest generated side, px.")
@click.option("--model", "-m", default="resnet101:none", show_default=True, metavar="CKPT|ARCH:WEIGHTS",
              help="The model to time: a checkpoint from `cxr-batch train` or ARCH:WEIGHTS.")
@click.option("--calibrate/--no-calibrate", default=True, show_default=True,
              help="Untrained head: score a derived checkpoint whose P(PNEUMONIA) spreads around 0.5, so that"
                   " agreement with fp32 means something (same compute per image).")
@click.option("--cam-layer", type=click.Choice(["2", "3", "4"]), default=None, show_default="the model's own",
              help="For an ARCH:WEIGHTS model: 3 ends the network at layer3 (CAM stride 16), 2 at layer2 (stride 8), as"
                   " `train --cam-layer` does.")
@click.option("--cam-stride", type=click.Choice(["16", "32"]), default=None, show_default="the model's own",
              help="For an ARCH:WEIGHTS model with layer4: 16 dilates layer4 (more compute).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Images per forward pass.")
@click.option("--modes", default="fp32,bf16", show_default=True,
              help="Comma-separated modes: fp32 or bf16, optionally +compile, +nocams (no CAM PNGs) and/or"
                   " +cpudecode (JPEGs decoded by the CPUs where the model runs on a GPU), e.g."
                   " fp32,bf16,bf16+compile,bf16+nocams. fp32 is required: it is the reference.")
@click.option("--engines", default="local,ray", show_default=True,
              help="(d): run `cxr-batch score --engine E` (fp32) in a fresh process for each, start-up included"
                   " and broken down. Empty: skip (d).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="Where (a), (b), (c) and (d) run. auto: the GPU when there is one.")
@click.option("--baseline-images", type=click.IntRange(min=1), default=None,
              help="Run (a) on the first N images only (it is the slow one). Default: all.")
@click.option("--decode-check", is_flag=True, help="Also time JPEG decoding: PIL on one CPU core vs nvJPEG on the GPU.")
@click.option("--memory-check", is_flag=True, help="Also score N and 10N small images and compare peak memory.")
@click.option("--memory-images", type=click.IntRange(min=1), default=100, show_default=True, help="N for --memory-check.")
@click.option("--train-check", is_flag=True,
              help="Also time training: one `cxr-batch train` worker against a plain PyTorch loop of the same"
                   " model, precision, batch and threads (ResNet-18, 128 px, 96 phantoms).")
@click.option("--train-images", type=click.IntRange(min=2), default=96, show_default=True,
              help="Training phantoms for --train-check.")
@click.option("--num-cpus", type=click.IntRange(min=2), default=None, help="CPUs of the local Ray it starts. Default: all.")
@click.option("--out-json", default=None, show_default="no file", help="Write every number to this JSON file.")
@click.option("--verbose", "-v", is_flag=True, help="Show Ray's own output too. Default: it goes to Ray's log files.")
@friendly
def benchmark(workdir, archive, images, min_side, max_side, model, calibrate, cam_layer, cam_stride, batch_size, modes,
              engines, device, baseline_images, decode_check, memory_check, memory_images, train_check, train_images,
              num_cpus, out_json, verbose):
    """Measure `cxr-batch score` against plain PyTorch and the bare model, in one run on one archive.

    Prints images/s of (a) a tutorial-style PyTorch loop, (b) `cxr-batch score` per precision mode,
    (c) the model's forward alone and (d) the `cxr-batch score` command per engine in a fresh process
    (start-up included, and its breakdown), the ratios b/a, b/c and d/a, peak memory, and each run's
    agreement with the fp32 run (the reference); with --train-check also (e) one `cxr-batch train`
    worker against a plain training loop of the same model, precision and threads.

    Example: cxr-batch benchmark /tmp/bench --out-json benchmark.json
    """
    import json

    from ..bench.run import run_benchmark
    from ..bench.settings import BenchSettings
    from ..bench.table import format_table

    s = BenchSettings(workdir=workdir, archive=archive, images=images, min_side=min_side, max_side=max_side,
                      model=model, calibrate=calibrate,
                      cam_stride=int(cam_stride) if cam_stride else None,
                      cam_layer=int(cam_layer) if cam_layer else None, batch_size=batch_size,
                      modes=_names(modes), engines=_names(engines), device=device,
                      baseline_images=baseline_images, decode_check=decode_check, memory_check=memory_check,
                      memory_images=memory_images, train_check=train_check,
                      train_images=train_images, num_cpus=num_cpus)
    result = run_benchmark(s, log=lambda m: click.echo(m, err=True), verbose=verbose)
    click.echo(format_table(result))
    if out_json:
        with open(out_json, "w") as f:
            json.dump(result, f, indent=2)
        click.echo(f"wrote {out_json}")


def _names(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())
