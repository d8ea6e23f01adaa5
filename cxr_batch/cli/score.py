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
from .options import GroupedCommand, GroupedOption, cluster_options, friendly, option_from_field, output_options
from .summaries import format_summary
from ..fields import OUTPUT
from ..jobs.score_settings import ScoreSettings


def _option(name: str, *decls: str, **extra):
    return option_from_field(ScoreSettings, name, *decls, **extra)


@click.command(cls=GroupedCommand)
@click.argument("archive")
@_option("out", "--out", "-o")
@_option("model", "--model", "-m", metavar="CKPT|ARCH:WEIGHTS")
@_option("cam_dir", "--cam-dir", metavar="DIR")
@_option("cams", "--cams/--no-cams")
@_option("cam_size", "--cam-size", type=click.IntRange(min=0), metavar="PX")
@_option("cam_scale", "--cam-scale")
@_option("cam_point", "--cam-point")
@_option("ood", "--ood")
@_option("batch_size", "--batch-size", type=click.IntRange(min=1))
@_option("actors", "--actors", type=click.IntRange(min=1))
@_option("cpus_per_actor", "--cpus-per-actor", type=click.FloatRange(min=0.5))
@_option("device", "--device")
@_option("precision", "--precision")
@_option("compile", "--compile")
@_option("max_pixels", "--max-pixels", type=click.IntRange(min=1), metavar="N")
@_option("overwrite", "--overwrite")
@_option("limit", "--limit", type=click.IntRange(min=1), metavar="N")
@_option("manifest", "--manifest", metavar="FILE")
@_option("follow_symlinks", "--follow-symlinks")
@_option("stall_timeout_s", "--stall-timeout", type=click.FloatRange(min=1), metavar="S")
@_option("max_bytes", "--max-bytes", type=click.IntRange(min=1), metavar="N")
@_option("retries", "--retries", type=click.IntRange(min=0))
@_option("retry_backoff_s", "--retry-backoff", type=click.FloatRange(min=0), hidden=True, metavar="S")
@_option("engine", "--engine")
@_option("decode_on", "--decode-on")
@_option("rows_per_part", "--rows-per-part", type=click.IntRange(min=1), hidden=True)
@_option("lease_timeout_s", "--lease-timeout", type=click.FloatRange(min=1), hidden=True, metavar="S")
@_option("gate", "--gate/--no-gate")
@_option("modalities", "--modalities")
@_option("views", "--views")
@click.option("--report", "report_", is_flag=True, cls=GroupedOption, group=OUTPUT,
              help="Also write an HTML report beside the output (see `cxr-batch report`).")
@cluster_options
@output_options
@friendly
def score(report_, address, wait_for_gpus, wait_timeout, as_json, verbose, **settings):
    """Score every chest X-ray under ARCHIVE (JPEG, PNG, DICOM; any nesting) into a Parquet table.

    One row per file: path, label (from a NORMAL/PNEUMONIA folder), pred, prob_pneumonia, cam_path,
    cam_peak_x/y, cam_max, width, height, sha256, model, error, status. A re-run with the same --out scores only
    what is missing, and again what had failed for a transient reason (exit code 3 says so).

    Example: cxr-batch score /data/chest_xray/test --out results.parquet
    """
    from ..jobs.ray_env import ray_for_job
    from ..errors import EXIT_INCOMPLETE
    from ..jobs.score import prepare, run_score

    settings["engine"] = _engine(settings["engine"], address, wait_for_gpus)
    s = ScoreSettings(**settings)
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
