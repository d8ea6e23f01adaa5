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
@click.option("--rows-per-part", type=click.IntRange(min=1), default=2000, hidden=True,
              help="Rows per published Parquet part: small values make tests see parts early.")
@click.option("--report", "report_", is_flag=True, help="Also write an HTML report beside the output (see `cxr-batch report`).")
@_ray_options
@_friendly
def score(archive, out, model, cam_dir, cams, cam_size, batch_size, actors, cpus_per_actor, device, precision,
          compile_, max_pixels, overwrite, limit, rows_per_part, report_, address):
    """Score every chest X-ray under ARCHIVE (JPEG, PNG, DICOM; any nesting) into a Parquet table.

    One row per file: path, label (from a NORMAL/PNEUMONIA folder), pred, prob_pneumonia, cam_path,
    cam_peak_x/y, width, height, sha256, model, error. A re-run with the same --out scores only
    what is missing.

    Example: cxr-batch score /data/chest_xray/test --out results.parquet
    """
    from .decode import DEFAULT_MAX_PIXELS
    from .raycluster import ray_running
    from .score import ScoreSettings, run_score

    s = ScoreSettings(archive=archive, out=out, model=model, cam_dir=cam_dir, cams=cams, cam_size=cam_size,
                      batch_size=batch_size, actors=actors, cpus_per_actor=cpus_per_actor, device=device,
                      precision=precision, compile=compile_, max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
                      overwrite=overwrite, limit=limit, rows_per_part=rows_per_part)
    from .registry import describe

    info = describe(model)  # fail on a bad model before starting Ray
    if not info.trained:
        click.secho(f"WARNING: {info.spec} has an UNTRAINED 2-class head: predictions and CAMs are meaningless"
                    " except as a smoke test. Pass a checkpoint from `cxr-batch train`.", fg="yellow", err=True)
    with ray_running(address):
        summary = run_score(s, progress=_progress)
    click.echo(format_summary(summary))
    if report_:
        from .report_html import ReportSettings, write_score_report

        click.echo(f"  report        {write_score_report(ReportSettings(results=summary.out)).path}")


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
@click.argument("results")
@click.option("--out", "-o", default=None, help="The HTML file (local or s3://). Default: <RESULTS>-report.html beside RESULTS.")
@click.option("--folder-depth", type=click.IntRange(min=1), default=None,
              help="Path components that name a folder in the per-folder table. Default: the shallowest level with 2+ folders.")
@click.option("--gallery", type=click.IntRange(min=0), default=12, show_default=True, help="Images in each gallery.")
@_friendly
def report(results, out, folder_depth, gallery):
    """Write an HTML page of what a scoring run found: counts, the model, a histogram of P(pneumonia),
    errors grouped by message, per-folder flagged rates, and the most suspicious and most uncertain
    images with their CAMs. It opens from disk in any browser, offline.

    RESULTS is the output folder of `cxr-batch score` (local or s3://). One pass over the table with
    bounded memory: a million rows take seconds.

    Example: cxr-batch report results.parquet --out results-report.html
    """
    from .report_html import ReportSettings, write_score_report

    r = write_score_report(ReportSettings(results=results, out=out, folder_depth=folder_depth, gallery=gallery))
    click.echo(f"cxr-batch report: {r.files:,} rows in {r.seconds:.1f} s -> {r.path}")


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


@main.command()
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
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Data-parallel Ray Train workers.")
@click.option("--gpu/--no-gpu", default=None, help="Train on GPUs. Default: when the cluster has them.")
@click.option("--cpus-per-worker", type=click.FloatRange(min=0.5), default=1.0, show_default=True)
@click.option("--target-sensitivity", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Choose the threshold reaching this sensitivity on val (default: Youden's J).")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.1, show_default=True,
              help="Stratified share of train/ used for validation when val/ is missing or tiny.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--register/--no-register", default=True, show_default=True,
              help="Make best.ckpt the default model of `cxr-batch score`.")
@_ray_options
@_friendly
def train(data, out, arch, weights, epochs, warmup_epochs, batch_size, lr, image_size, workers, gpu, cpus_per_worker,
          target_sensitivity, val_fraction, seed, register, address):
    """Fine-tune a ResNet on DATA/train (NORMAL/ and PNEUMONIA/ folders), validate on DATA/val.

    Data-parallel over --workers with Ray Train. Each epoch writes OUT/last.ckpt; the best by val
    AUC is OUT/best.ckpt with its decision threshold. The test split is never used.

    Example: cxr-batch train /data/chest_xray --out runs/r101 --epochs 10
    """
    from .raycluster import ray_running
    from .train import TrainSettings, run_train

    s = TrainSettings(data=data, out=out, arch=arch, weights=weights, epochs=epochs, warmup_epochs=warmup_epochs,
                      batch_size=batch_size, lr=lr, image_size=image_size, workers=workers, gpu=gpu,
                      cpus_per_worker=cpus_per_worker, target_sensitivity=target_sensitivity,
                      val_fraction=val_fraction, seed=seed)
    with ray_running(address):
        summary = run_train(s, echo=click.echo, register=register)
    click.echo(format_train_summary(summary))


def format_train_summary(t: dict) -> str:
    auc = "n/a" if t["val_auc"] is None else f"{t['val_auc']:.3f}"
    lines = ["", f"cxr-batch train: {t['epochs']} epochs in {t['seconds']:.0f} s"
             f" ({t['images_per_s_per_worker']:.1f} images/s per worker)",
             f"  best epoch    {t['best_epoch']}: val AUC {auc}, val accuracy {t['val_acc']:.3f}, threshold {t['threshold']:.3f}",
             f"  validation    {t['validation']}",
             f"  checkpoint    {t['best_checkpoint']}"]
    if t.get("registered_as_default"):
        lines.append("  registered    as the default model of `cxr-batch score` (--no-register to skip)")
    return "\n".join(lines)


@main.command()
@click.argument("checkpoint")
@click.argument("folder")
@click.option("--out", "-o", required=True, help="Report folder: report.html, report.md, metrics.json, PNG plots, predictions.")
@click.option("--truth", default=None, help="truth.csv of lesion positions (default: looked up in FOLDER and its parents).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--bootstrap", "n_boot", type=click.IntRange(min=100), default=1000, show_default=True, help="Resamples for the 95% CIs.")
@_ray_options
@_friendly
def evaluate(checkpoint, folder, out, truth, batch_size, n_boot, address):
    """Score a labelled FOLDER with CHECKPOINT and write a metrics report with plots.

    Example: cxr-batch evaluate runs/r101/best.ckpt /data/chest_xray/test --out runs/r101/test-report
    """
    from .evaluate import EvaluateSettings, run_evaluate
    from .raycluster import ray_running

    s = EvaluateSettings(checkpoint=checkpoint, folder=folder, out=out, truth=truth, batch_size=batch_size, n_boot=n_boot)
    with ray_running(address):
        m = run_evaluate(s, progress=_progress)
    click.echo(format_eval_summary(m, out))


def format_eval_summary(m: dict, out: str) -> str:
    k, ci = m["metrics"], m["ci95"]

    def f(key):
        return "n/a" if k.get(key) is None else f"{k[key]:.3f} [{ci[key][0]:.3f}, {ci[key][1]:.3f}]" if ci.get(key) else f"{k[key]:.3f}"

    lines = ["", f"cxr-batch evaluate: {m['n_scored']} labelled images, threshold {m['threshold']:.3f}",
             f"  accuracy {f('accuracy')}   AUC {f('roc_auc')}",
             f"  sensitivity {f('sensitivity')}   specificity {f('specificity')}"]
    pt = (m.get("pointing") or {}).get("true_positives")
    if pt:
        lines.append(f"  CAM pointing  {pt['hits']}/{pt['n']} ({pt['rate']:.0%}) of true positives peak on the lesion")
    lines.append(f"  report        {out}/report.html (open it in a browser; also report.md, metrics.json and the PNG plots)")
    return "\n".join(lines)


@main.command()
@click.option("--out", "-o", default="demo", show_default=True, help="Folder for the archive, the run and the report.")
@click.option("--epochs", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--train", "n_train", type=click.IntRange(min=20), default=400, show_default=True, help="Training phantoms.")
@_ray_options
@_friendly
def demo(out, epochs, n_train, address):
    """Run the whole flow on built-in phantoms: synth -> train -> score -> report (minutes on a CPU).

    Example: cxr-batch demo --out demo
    """
    from .demo import DemoSettings, run_demo
    from .raycluster import ray_running

    with ray_running(address):
        r = run_demo(DemoSettings(out=out, epochs=epochs, n_train=n_train), echo=click.echo, progress=_progress)
    click.echo(format_eval_summary(r["metrics"], r["out"] + "/report"))
    click.echo(f"  checkpoint    {r['checkpoint']}  (score more with: cxr-batch score ARCHIVE --out results.parquet --model {r['checkpoint']})")


@main.command()
@click.argument("workdir")
@click.option("--archive", default=None, help="Images to score. Default: generate phantoms into WORKDIR/archive (kept).")
@click.option("--images", type=click.IntRange(min=1), default=600, show_default=True, help="Images to generate / use.")
@click.option("--min-side", type=click.IntRange(min=32), default=1000, show_default=True, help="Smallest generated side, px.")
@click.option("--max-side", type=click.IntRange(min=32), default=2000, show_default=True, help="Largest generated side, px.")
@click.option("--model", "-m", default="resnet101:none", show_default=True, metavar="CKPT|ARCH:WEIGHTS")
@click.option("--calibrate/--no-calibrate", default=True, show_default=True,
              help="Untrained head: score a derived checkpoint whose P(PNEUMONIA) spreads around 0.5, so that"
                   " agreement with fp32 means something (same compute per image).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--modes", default="fp32,bf16", show_default=True,
              help="Comma-separated modes: fp32 or bf16, optionally +compile and/or +nocams (no CAM PNGs),"
                   " e.g. fp32,bf16,bf16+compile,bf16+nocams. fp32 is required.")
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True,
              help="Where (a), (b) and (c) run. auto: the GPU when there is one.")
@click.option("--baseline-images", type=click.IntRange(min=1), default=None,
              help="Run (a) on the first N images only (it is the slow one). Default: all.")
@click.option("--decode-check", is_flag=True, help="Also time JPEG decoding: PIL on one CPU core vs nvJPEG on the GPU.")
@click.option("--memory-check", is_flag=True, help="Also score N and 10N small images and compare peak memory.")
@click.option("--memory-images", type=click.IntRange(min=1), default=100, show_default=True, help="N for --memory-check.")
@click.option("--num-cpus", type=click.IntRange(min=2), default=None, help="CPUs of the local Ray it starts. Default: all.")
@click.option("--out-json", default=None, help="Write every number to this JSON file.")
@_friendly
def benchmark(workdir, archive, images, min_side, max_side, model, calibrate, batch_size, modes, device,
              baseline_images, decode_check, memory_check, memory_images, num_cpus, out_json):
    """Measure `cxr-batch score` against plain PyTorch and the bare model, in one run on one archive.

    Prints images/s of (a) a tutorial-style PyTorch loop, (b) `cxr-batch score` per precision mode and
    (c) the model's forward alone, the ratios b/a and b/c, peak memory, and each mode's agreement with fp32.

    Example: cxr-batch benchmark /tmp/bench --out-json benchmark.json
    """
    import json

    from .benchmark import BenchSettings, format_table, run_benchmark

    try:
        s = BenchSettings(workdir=workdir, archive=archive, images=images, min_side=min_side, max_side=max_side,
                          model=model, calibrate=calibrate, batch_size=batch_size,
                          modes=tuple(m.strip() for m in modes.split(",") if m.strip()), device=device,
                          baseline_images=baseline_images, decode_check=decode_check, memory_check=memory_check,
                          memory_images=memory_images, num_cpus=num_cpus)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    result = run_benchmark(s, log=lambda m: click.echo(m, err=True))
    click.echo(format_table(result))
    if out_json:
        with open(out_json, "w") as f:
            json.dump(result, f, indent=2)
        click.echo(f"wrote {out_json}")


if __name__ == "__main__":
    main()
