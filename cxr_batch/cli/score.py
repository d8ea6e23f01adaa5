"""`cxr-batch score` (also `python jobs/score.py`)."""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial

import click

from .console import Console
from .options import cam_point_option, cam_scale_option, cam_size_option, cluster_options, friendly, output_options
from .summaries import format_summary
from ..pixels.gate import DEFAULT_MODALITIES, DEFAULT_VIEWS


def _names(ctx, param, value: str) -> tuple[str, ...]:
    """A comma-separated option value as a tuple of upper-case names ("pa, ap" -> ("PA", "AP"))."""
    names = tuple(v.strip().upper() for v in value.split(",") if v.strip())
    if not names:
        raise click.BadParameter("give at least one value, e.g. CR,DX")
    return names


@click.command()
@click.argument("archive")
@click.option("--out", "-o", required=True, help="Parquet output: a folder of part files (local path or s3://).")
@click.option("--model", "-m", default=None, metavar="CKPT|ARCH:WEIGHTS",
              help="A checkpoint from `cxr-batch train`, or e.g. resnet101:imagenet / resnet18:none (untrained head)."
                   " Default: $CXR_BATCH_MODEL, else the model the last training registered.")
@click.option("--cam-dir", default=None, help="Where CAM overlay PNGs go. Default: <out>-cams beside the output.")
@click.option("--cams/--no-cams", default=True, show_default=True, help="Write a CAM overlay PNG per image.")
@cam_size_option
@cam_scale_option
@cam_point_option("map")
@click.option("--ood", type=click.Choice(["skip", "flag", "off"]), default="skip", show_default=True,
              help="Images that do not look like the model's training images (the out-of-distribution check, docs/ood.md):"
                   " skip = status out_of_scope, no prediction; flag = keep the prediction, mark the out_of_scope column;"
                   " off = no check.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Images per forward pass.")
@click.option("--actors", type=click.IntRange(min=1), default=None, help="Model replicas. Default: one per GPU, else fit to CPUs.")
@click.option("--cpus-per-actor", type=click.FloatRange(min=0.5), default=None, help="CPUs per model actor (torch threads).")
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="auto: bf16 autocast where the hardware has native bf16 (GPU sm80+, CPU with AVX512-BF16 or AMX), else fp32.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model in each actor.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=None, help="Refuse images above this many pixels (decompression bombs). Default 100M.")
@click.option("--overwrite", is_flag=True, help="First delete what earlier runs wrote to the output and CAM folder (only"
              " cxr-batch's own files). Default: resume, scoring only files with no row yet.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Score only the first N files (sorted by path).")
@click.option("--manifest", default=None, metavar="FILE",
              help="Score the files this CSV (`path`, optional `size` column), .txt (one path per line) or Parquet"
                   " file lists, relative to ARCHIVE, instead of listing ARCHIVE.")
@click.option("--follow-symlinks", is_flag=True,
              help="Also read symlinks whose target lies outside ARCHIVE. Default: such links are not followed.")
@click.option("--stall-timeout", type=click.FloatRange(min=1), default=900, show_default=True, metavar="S",
              help="Stop after this many seconds without progress (Ray Data waiting for resources that never come, a"
                   " read that never returns); what was written is kept and a re-run resumes.")
@click.option("--max-bytes", type=click.IntRange(min=1), default=None, metavar="N",
              help="Files larger than this (by the listing's size) get an error row and are not read. Default 1 GiB.")
@click.option("--retries", type=click.IntRange(min=0), default=3, show_default=True,
              help="Retry passes, with backoff, for files that failed for a transient reason (I/O, a vanished folder,"
                   " throttling, no space, a dead worker). What still fails has status 'retry': exit code 3.")
@click.option("--retry-backoff", type=click.FloatRange(min=0), default=2.0, hidden=True, metavar="S",
              help="Seconds before the first retry pass, doubled for each next one.")
@click.option("--engine", type=click.Choice(["auto", "ray", "local"]), default="auto", show_default=True,
              help="ray: Ray Data (tasks, an actor pool; any cluster). local: this process and a process pool, no"
                   " Ray start-up. auto: local on one machine with at most one GPU (and for up to 20,000 files on"
                   " a CPU machine of more than 8 CPUs), ray when joining a cluster (--address, RAY_ADDRESS).")
@click.option("--decode-on", type=click.Choice(["auto", "cpu", "device"]), default="auto", show_default=True,
              help="Where JPEGs are decoded and CAM overlays composed. device: beside the model, in one batched"
                   " call (nvJPEG on a GPU), the CPUs only read and check the files and encode the PNGs; other formats"
                   " and files the device fails on are decoded on the CPUs. auto: device when the model runs on a"
                   " GPU, else cpu.")
@click.option("--rows-per-part", type=click.IntRange(min=1), default=2000, hidden=True,
              help="Rows per published Parquet part: small values make tests see parts early.")
@click.option("--lease-timeout", type=click.FloatRange(min=1), default=None, hidden=True,
              help="Seconds without a heartbeat after which this run's lease on --out may be taken over (default 120).")
@click.option("--gate/--no-gate", default=True, show_default=True,
              help="Skip (status 'skipped', never decoded) each DICOM whose header says it is not a frontal chest"
                   " radiograph: another modality, colour, several frames, another body part, a lateral view, a"
                   " report (docs/dicom-gate.md). Off: every file is scored.")
@click.option("--modalities", default=",".join(DEFAULT_MODALITIES), show_default=True, metavar="LIST",
              callback=_names, help="DICOM Modality values the gate lets through, comma-separated.")
@click.option("--views", default=",".join(DEFAULT_VIEWS), show_default=True, metavar="LIST", callback=_names,
              help="DICOM ViewPosition values the gate lets through (a file without one always passes), e.g."
                   " PA,AP,LL to score left laterals too.")
@click.option("--report", "report_", is_flag=True, help="Also write an HTML report beside the output (see `cxr-batch report`).")
@cluster_options
@output_options
@friendly
def score(archive, out, model, cam_dir, cams, cam_size, cam_scale, cam_point, ood, batch_size, actors, cpus_per_actor, device, precision,
          compile_, max_pixels, overwrite, limit, manifest, follow_symlinks, stall_timeout, max_bytes, retries,
          retry_backoff, engine, decode_on, rows_per_part, lease_timeout, gate, modalities, views, report_, address,
          wait_for_gpus, wait_timeout, as_json, verbose):
    """Score every chest X-ray under ARCHIVE (JPEG, PNG, DICOM; any nesting) into a Parquet table.

    One row per file: path, label (from a NORMAL/PNEUMONIA folder), pred, prob_pneumonia, cam_path,
    cam_peak_x/y, cam_max, width, height, sha256, model, error, status. A re-run with the same --out scores only
    what is missing, and again what had failed for a transient reason (exit code 3 says so).

    Example: cxr-batch score /data/chest_xray/test --out results.parquet
    """
    from ..jobs.ray_env import ray_for_job
    from ..archive.lease import DEFAULT_TIMEOUT_S
    from ..errors import EXIT_INCOMPLETE
    from ..jobs.score import DEFAULT_MAX_BYTES, ScoreSettings, prepare, run_score
    from ..pixels.decode import DEFAULT_MAX_PIXELS

    s = ScoreSettings(archive=archive, out=out, model=model, cam_dir=cam_dir, cams=cams, cam_size=cam_size,
                      cam_scale=cam_scale, cam_point=cam_point, batch_size=batch_size, actors=actors, cpus_per_actor=cpus_per_actor, device=device,
                      precision=precision, compile=compile_, max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
                      overwrite=overwrite, limit=limit, manifest=manifest, follow_symlinks=follow_symlinks,
                      rows_per_part=rows_per_part, stall_timeout_s=stall_timeout,
                      lease_timeout_s=lease_timeout or DEFAULT_TIMEOUT_S, max_bytes=max_bytes or DEFAULT_MAX_BYTES,
                      retries=retries, retry_backoff_s=retry_backoff, engine=_engine(engine, address, wait_for_gpus),
                      decode_on=decode_on, gate=gate, modalities=modalities, views=views, ood=ood)
    console = Console(as_json=as_json, verbose=verbose)
    console.settings(s)
    t0 = time.perf_counter()
    s, info = prepare(s)  # fails on a bad model file or output folder before anything starts (no torch yet)
    warn_if_untrained(info, console)
    # Ray starts only if the engine needs it (run_score decides once it knows the number of files).
    ray = partial(ray_for_job, address, wait_for_gpus=wait_for_gpus, wait_timeout=wait_timeout, verbose=verbose,
                  echo=console.note)
    with sigterm_stops_the_run():
        summary = run_score(s, progress=console.score_progress(), echo=console.note, ray_context=ray,
                            prepared=(s, info, time.perf_counter() - t0))
    _FINISHED.append(True)  # the work is done and its files closed: the process may skip teardown (cli.run)
    console.summary(format_summary(summary), asdict(summary))
    if report_:
        from ..reports.html.score import ReportSettings, write_score_report

        console.note(f"  report        {write_score_report(ReportSettings(results=summary.out)).path}")
    if summary.incomplete:  # finished, but not every file got its verdict: a re-run retries exactly those
        click.get_current_context().exit(EXIT_INCOMPLETE)


_FINISHED: list = []


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: unwound like Ctrl-C (a KeyboardInterrupt), so every cleanup on the way runs."""


@contextmanager
def sigterm_stops_the_run():
    """SIGTERM (what `ray job stop`, Kubernetes and batch schedulers send) stops the run as Ctrl-C does:
    the local engine's pool is ended and the lease released, so the next run need not wait for the
    lease to go stale. The process then exits 143 (128 + SIGTERM) with one line. (When this process
    starts Ray, Ray installs its own SIGTERM handler, an exit that unwinds the same way.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    received = []

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: a second one must not cut the cleanup short
        received.append(signum)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except KeyboardInterrupt:
        if not received:  # Ctrl-C itself: click's "Aborted!"
            raise
        # Ray Train's fit() turns the interrupt into a KeyboardInterrupt of its own: the flag, not the type, says why.
        click.echo("Stopped by SIGTERM: what was written is kept; run the same command again to resume.", err=True)
        click.get_current_context().exit(128 + signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)


def finished() -> bool:
    """Whether a `score` in this process ran to its end (with or without files left to retry)."""
    return bool(_FINISHED)


def _engine(engine: str, address: str | None, wait_for_gpus: int) -> str:
    """A cluster to join or GPUs to wait for mean Ray; --engine local with either is a contradiction."""
    from ..errors import InputError
    from ..jobs.ray_env import joining_a_cluster

    if joining_a_cluster(address) or wait_for_gpus:
        if engine == "local":
            raise InputError("--engine local runs without Ray: drop --address/RAY_ADDRESS and --wait-for-gpus,"
                             " or use --engine ray.")
        return "ray"
    return engine


def warn_if_untrained(info, console: Console) -> None:
    if not info.trained:
        console.warn(f"WARNING: {info.spec} has an UNTRAINED 2-class head: predictions and CAMs are meaningless"
                     " except as a smoke test. Pass a checkpoint from `cxr-batch train`.")
