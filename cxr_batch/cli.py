"""The command line: each command turns its options into a settings object and calls the library."""

from __future__ import annotations

import functools
import sys

import click

from .errors import CxrError


def _friendly(fn):
    """Domain errors become one line ("Error: ...") and exit code 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CxrError as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def _ray_options(fn):
    fn = click.option("--address", envvar="RAY_ADDRESS", default=None, metavar="ADDR",
                      help="Ray cluster to join (also RAY_ADDRESS). Default: start Ray in this process.")(fn)
    return fn


def _progress(summary, total):
    done = summary.scored + summary.errors
    stream = sys.stderr
    end = "\r" if stream.isatty() and done < total else "\n"
    stream.write(f"scored {done:,}/{total:,} files  {summary.images_per_s:.1f} img/s  {summary.errors:,} errors{end}")
    stream.flush()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="cxr-batch")
def main():
    """Chest X-ray pneumonia classifier at archive scale: fine-tune a ResNet with Ray Train, score
    folders of images with Ray Data into Parquet plus a Class Activation Map PNG per image.

    Start with `cxr-batch demo`, or `cxr-batch synth ARCHIVE` for an example archive.
    """


@main.command()
@click.argument("archive")
@click.option("--out", "-o", required=True, help="Parquet output: a folder of part files (local path or s3://).")
@click.option("--model", "-m", default=None, metavar="CKPT|ARCH:WEIGHTS",
              help="A checkpoint from `cxr-batch train`, or e.g. resnet101:imagenet / resnet18:none (untrained head)."
                   " Default: $CXR_BATCH_MODEL, else the model the last training registered.")
@click.option("--cam-dir", default=None, help="Where CAM overlay PNGs go. Default: <out>-cams beside the output.")
@click.option("--cams/--no-cams", default=True, show_default=True, help="Write a CAM overlay PNG per image.")
@click.option("--cam-size", type=click.IntRange(min=0), default=None,
              help="Overlay side in px. Default: the model's input size; 0 = the image's own resolution (slow).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Images per forward pass.")
@click.option("--actors", type=click.IntRange(min=1), default=None, help="Model replicas. Default: one per GPU, else fit to CPUs.")
@click.option("--cpus-per-actor", type=click.FloatRange(min=0.5), default=None, help="CPUs per model actor (torch threads).")
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="auto: bf16 autocast on GPU, fp32 on CPU.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model in each actor.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=None, help="Refuse images above this many pixels (decompression bombs). Default 100M.")
@click.option("--overwrite", is_flag=True, help="Delete the output and CAMs first. Default: resume, scoring only files with no row yet.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Score only the first N files (sorted by path).")
@_ray_options
@_friendly
def score(archive, out, model, cam_dir, cams, cam_size, batch_size, actors, cpus_per_actor, device, precision,
          compile_, max_pixels, overwrite, limit, address):
    """Score every chest X-ray under ARCHIVE (JPEG, PNG, DICOM; any nesting) into a Parquet table.

    One row per file: path, label (from a NORMAL/PNEUMONIA folder), pred, prob_pneumonia, cam_path,
    cam_peak_x/y, width, height, sha256, model, error. A re-run with the same --out scores only
    what is missing.

    Example: cxr-batch score /data/chest_xray/test --out results.parquet
    """
    from .decode import DEFAULT_MAX_PIXELS
    from .raycluster import ensure_ray
    from .score import ScoreSettings, run_score

    s = ScoreSettings(archive=archive, out=out, model=model, cam_dir=cam_dir, cams=cams, cam_size=cam_size,
                      batch_size=batch_size, actors=actors, cpus_per_actor=cpus_per_actor, device=device,
                      precision=precision, compile=compile_, max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
                      overwrite=overwrite, limit=limit)
    from .registry import describe

    info = describe(model)  # fail on a bad model before starting Ray
    if not info.trained:
        click.secho(f"WARNING: {info.spec} has an UNTRAINED 2-class head: predictions and CAMs are meaningless"
                    " except as a smoke test. Pass a checkpoint from `cxr-batch train`.", fg="yellow", err=True)
    started = ensure_ray(address)
    try:
        summary = run_score(s, progress=_progress)
    finally:
        if started:
            import ray

            ray.shutdown()
    click.echo(format_summary(summary))


def format_summary(sm) -> str:
    m = sm.model
    lines = [
        "",
        f"cxr-batch score: {sm.seen:,} files seen, {sm.scored:,} scored, {sm.errors:,} errors"
        + (f", {sm.already_done:,} already in the output (resumed)" if sm.already_done else ""),
        f"  time          {sm.seconds:.1f} s  ({sm.images_per_s:.1f} images/s)",
        f"  model         {m['spec']}  (id {m['model_id']}, {m['arch']}, {m['image_size']} px, threshold {m['threshold']:.3f})"
        + ("" if m["trained"] else "  UNTRAINED HEAD"),
        f"  model actors  {sm.plan['actors']} x {sm.plan['cpus_per_actor']:g} CPU" + (
            f" + {sm.plan['gpus_per_actor']:g} GPU" if sm.plan.get("gpus_per_actor") else ""),
        f"  predictions   {sm.out}",
        f"  CAM PNGs      {sm.cam_dir or '(not written: --no-cams)'}",
    ]
    if sm.errors:
        lines.append(f"  errors        rows with a non-null `error` column, e.g. "
                     f"pandas.read_parquet('{sm.out}').query('error.notna()')")
    return "\n".join(lines)


@main.command()
@click.argument("out")
@click.option("--train", "n_train", type=click.IntRange(min=2), default=160, show_default=True, help="Images in train/.")
@click.option("--val", "n_val", type=click.IntRange(min=0), default=40, show_default=True, help="Images in val/.")
@click.option("--test", "n_test", type=click.IntRange(min=0), default=80, show_default=True, help="Images in test/.")
@click.option("--size", type=click.IntRange(min=64, max=4096), default=256, show_default=True, help="Image side in px.")
@click.option("--seed", type=int, default=0, show_default=True)
@_friendly
def synth(out, n_train, n_val, n_test, size, seed):
    """Write an example archive of procedural chest phantoms to OUT.

    Layout as the public pediatric pneumonia set: OUT/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg.
    PNEUMONIA images carry a planted opacity; OUT/truth.csv gives its centre and radius.

    Example: cxr-batch synth example-archive --train 200 --test 100
    """
    from .synth import make_archive

    try:
        truth = make_archive(out, n_train=n_train, n_val=n_val, n_test=n_test, size=size, seed=seed)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"Wrote {n_train + n_val + n_test} phantoms to {out} (truth: {truth}).")


if __name__ == "__main__":
    main()
