"""Options that several commands share, declared once: which cluster, how to print, and the one
place where a CxrError becomes one line and an exit code; and the options built from a settings
field's metadata (cxr_batch/fields.py), listed in groups by `--help`."""

from __future__ import annotations

import dataclasses
import functools

import click

from ..errors import EXIT_ERROR, EXIT_INCOMPLETE, CxrError, one_line
from ..fields import CLUSTER, GROUPS, OUTPUT, field_of

OTHER = "Other"


class GroupedOption(click.Option):
    """A click option that knows its `--help` group."""

    def __init__(self, *decls, group: str = OTHER, **kwargs):
        super().__init__(*decls, **kwargs)
        self.group = group


class GroupedCommand(click.Command):
    """A command whose `--help` lists its options in sections (Input options, Output options, ...)."""

    def format_options(self, ctx, formatter):
        rows: dict[str, list] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
            if record:
                rows.setdefault(getattr(param, "group", OTHER), []).append(record)
        for group in (*GROUPS, OTHER):
            if group in rows:
                with formatter.section(f"{group} options" if len(rows) > 1 else "Options"):
                    formatter.write_dl(rows[group])


def names(ctx, param, value) -> tuple[str, ...]:
    """A comma-separated option value as a tuple of upper-case names ("pa, ap" -> ("PA", "AP"))."""
    if isinstance(value, tuple):
        return value
    out = tuple(v.strip().upper() for v in value.split(",") if v.strip())
    if not out:
        raise click.BadParameter("give at least one value, e.g. CR,DX")
    return out


def option_from_field(settings, name: str, *decls: str, **extra):
    """The click option of settings field ``name``: its default, choices, help and group come from the
    field's metadata; ``extra`` adds what only the command line has (a range type, a metavar, hidden).
    The option's parameter is the field's name, so the command passes it straight to the settings."""
    f = field_of(settings, name)
    meta = f.metadata
    if "help" not in meta:
        raise TypeError(f"{settings.__name__}.{name} has no option metadata: declare it with fields.setting().")
    kwargs = {"help": meta["help"], "cls": GroupedOption, "group": meta["group"],
              "show_default": meta["shown"] if meta["shown"] is not None else True}
    if f.default is dataclasses.MISSING:
        kwargs.update(required=True, show_default=False)
    elif isinstance(f.default, tuple):  # a list of names, given comma-separated
        kwargs.update(default=",".join(f.default), callback=names, metavar="LIST")
    else:
        kwargs["default"] = f.default
    if isinstance(f.default, bool) and not any("/" in d for d in decls):
        kwargs["is_flag"] = True
    if meta["choices"]:
        kwargs["type"] = click.Choice(meta["choices"])
    return click.option(*decls, name, **kwargs, **extra)


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
        except OSError as e:  # storage or the cluster failed us (an S3 answering 500, no Ray at --address)
            exc = click.ClickException(storage_error(e))
            exc.exit_code = EXIT_ERROR if isinstance(e, (FileNotFoundError, PermissionError)) else EXIT_INCOMPLETE
            raise exc from None

    return wrapper


def storage_error(e: OSError) -> str:
    """One line for an OSError that reached the command: what failed and what to do. A missing path or a
    permission is the user's to fix; anything else (a server error, a timeout, a lost connection)
    usually passes, and a re-run resumes."""
    what = one_line(e, 300)
    if isinstance(e, (FileNotFoundError, PermissionError)):
        return f"{what}. Check the path and its permissions."
    if "ray" in what.lower() and isinstance(e, ConnectionError):
        return f"{what}. Check --address (or RAY_ADDRESS) and that this process has the cluster's auth token; run again."
    return f"storage error: {what}. It is usually passing: run the same command again (it resumes)."


def cluster_options(fn):
    """--address, --wait-for-gpus, --wait-timeout: where the job runs."""
    fn = click.option("--wait-timeout", type=click.FloatRange(min=0), default=900, show_default=True, metavar="S",
                      cls=GroupedOption, group=CLUSTER,
                      help="Seconds to wait for --wait-for-gpus, then fail with what to check.")(fn)
    fn = click.option("--wait-for-gpus", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
                      cls=GroupedOption, group=CLUSTER,
                      help="First ask the autoscaler for N GPUs and wait for them (a cluster that scales from zero).")(fn)
    fn = click.option("--address", envvar="RAY_ADDRESS", default=None, metavar="ADDR", cls=GroupedOption,
                      group=CLUSTER, show_default="start Ray in this process",
                      help="Ray cluster to join (also RAY_ADDRESS, which `ray job submit` sets).")(fn)
    return fn


def output_options(fn):
    """--json, --verbose: what the console shows."""
    fn = click.option("--verbose", "-v", is_flag=True, cls=GroupedOption, group=OUTPUT,
                      help="Show Ray's own output too (workers, Ray Train, Ray Data); without it that goes to Ray's"
                           " log files (/tmp/ray/session_latest/logs).")(fn)
    fn = click.option("--json", "as_json", is_flag=True, cls=GroupedOption, group=OUTPUT,
                      help="Print the settings as JSON first (\"settings: {...}\") and the summary as JSON last"
                           " ({\"summary\": {...}}), for scripts and job logs.")(fn)
    return fn
