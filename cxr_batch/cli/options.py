"""Options that several commands share, declared once: which cluster, how to print, and the one
place where a CxrError becomes one line and an exit code."""

from __future__ import annotations

import functools

import click

from ..errors import CxrError


def friendly(fn):
    """Domain errors become one line ("Error: ...") and the exit code of their class (errors.EXIT_ERROR,
    or EXIT_INCOMPLETE for a run that a re-run resumes), never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CxrError as e:
            exc = click.ClickException(str(e))
            exc.exit_code = e.exit_code
            raise exc from None

    return wrapper


def cluster_options(fn):
    """--address, --wait-for-gpus, --wait-timeout: where the job runs."""
    fn = click.option("--wait-timeout", type=click.FloatRange(min=0), default=900, show_default=True, metavar="S",
                      help="Seconds to wait for --wait-for-gpus, then fail with what to check.")(fn)
    fn = click.option("--wait-for-gpus", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
                      help="First ask the autoscaler for N GPUs and wait for them (a cluster that scales from zero).")(fn)
    fn = click.option("--address", envvar="RAY_ADDRESS", default=None, metavar="ADDR",
                      help="Ray cluster to join (also RAY_ADDRESS; `ray job submit` sets it)."
                           " Default: start Ray in this process.")(fn)
    return fn


def cam_size_option(fn):
    """--cam-size: the overlay PNGs' long side (score and evaluate)."""
    return click.option("--cam-size", type=click.IntRange(min=0), default=None,
                        help="Overlay long side in px, in the image's aspect ratio. Default: the model's input size; 0 = the image's own resolution (slow).")(fn)


def cam_scale_option(fn):
    """--cam-scale: how the overlay PNGs show heat (score and evaluate)."""
    return click.option(
        "--cam-scale", type=click.Choice(["absolute", "relative"]), default="absolute", show_default=True,
        help="Overlay heat. absolute: one fixed range of the map's logit units for every image, so a confident"
             " NORMAL stays cold and heat says how strong; relative: min-max per image (always a hot spot)."
             " The raw maximum is in the cam_max column either way.")(fn)


def cam_point_option(default: str):
    """--cam-point: where cam_peak_x/y come from (score: map by default, for speed; evaluate: evidence)."""
    def add(fn):
        return click.option(
            "--cam-point", type=click.Choice(["map", "evidence"]), default=default, show_default=True,
            help="Where cam_peak_x/y come from. map: the centre of the CAM's hot spot (no extra work); evidence: the"
                 " input pixels that make that hot spot hot, by one backward pass per batch (several times the"
                 " forward's cost on a CPU; free of the map's pull towards mid-lung, see docs/score.md).")(fn)
    return add


def output_options(fn):
    """--json, --verbose: what the console shows."""
    fn = click.option("--verbose", "-v", is_flag=True,
                      help="Show Ray's own output too (workers, Ray Train, Ray Data). Default: it goes to Ray's log"
                           " files (/tmp/ray/session_latest/logs) and only our progress and summary are printed.")(fn)
    fn = click.option("--json", "as_json", is_flag=True,
                      help="Print the settings as JSON first (\"settings: {...}\") and the summary as JSON last"
                           " ({\"summary\": {...}}), for scripts and job logs.")(fn)
    return fn
