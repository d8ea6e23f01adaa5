"""What a command prints: progress lines with an ETA on stderr, the summary on stdout.

On a terminal a progress line is redrawn in place; in a log (stderr not a TTY) a new line is
written at most every ``LOG_INTERVAL_S`` seconds, and always the last one. With ``--json`` the
first stdout line is the settings and the last one is the summary, each as JSON.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict

import click

LOG_INTERVAL_S = 5.0


class Console:
    def __init__(self, *, as_json: bool = False, verbose: bool = False, stream=None):
        self.as_json, self.verbose = as_json, verbose
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._open = False  # a redrawn line is on screen without its newline
        self._last_logged = 0.0

    def note(self, line: str) -> None:
        """A line about what the job is doing (stderr)."""
        self._end_line()
        click.echo(line, file=self.stream)

    def warn(self, line: str) -> None:
        self._end_line()
        click.secho(line, fg="yellow", file=self.stream)

    def settings(self, settings) -> None:
        if self.as_json:
            click.echo("settings: " + json.dumps(asdict(settings), default=str))

    def summary(self, text: str, data) -> None:
        """The human summary, then (with --json) the same as one JSON line, the last one printed."""
        self._end_line()
        click.echo(text)
        if self.as_json:
            click.echo(json.dumps({"summary": data}, default=str))

    def progress(self, text: str, *, final: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
            self.stream.flush()
            self._open = not final
        elif final or now - self._last_logged >= LOG_INTERVAL_S:
            click.echo(text, file=self.stream)
            self._last_logged = now

    def _end_line(self) -> None:
        if self._open:
            self.stream.write("\n")
            self._open = False

    def score_progress(self, what: str = "scored"):
        """A ``progress(summary, total)`` callback for run_score."""
        return ScoreProgress(self, what)

    def epoch_progress(self):
        """A ``progress(metrics, epochs)`` callback for run_train: one line per epoch."""
        return EpochProgress(self)


def eta(seconds: float | None) -> str:
    if seconds is None:
        return "--"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class ScoreProgress:
    """The rate counts from the first rows out, so the ETA leaves the start-up (actors, model) out."""

    def __init__(self, console: Console, what: str):
        self.console, self.what, self.first = console, what, None

    def __call__(self, summary, total: int) -> None:
        done, now = summary.scored + summary.errors + getattr(summary, "skipped", 0), time.monotonic()
        if self.first is None and done:
            self.first = (now, done)
        rate = summary.images_per_s or None  # start-up included, until a second point gives the steady rate
        if self.first and now > self.first[0] and done > self.first[1]:
            rate = (done - self.first[1]) / (now - self.first[0])
        left = (total - done) / rate if rate else None
        final = done >= total
        self.console.progress(
            f"{self.what} {done:,}/{total:,} files  {summary.images_per_s:.1f} img/s  {summary.errors:,} errors"
            + ("" if final else f"  ETA {eta(left)}"), final=final)


class EpochProgress:
    def __init__(self, console: Console):
        self.console, self.last = console, None

    def __call__(self, m: dict, epochs: int) -> None:
        now = time.monotonic()
        # Wall time per epoch as seen here (validation and checkpoints included); the first epoch
        # is timed by the workers, since the driver's clock also holds their start-up.
        per_epoch = now - self.last if self.last else m.get("epoch_seconds", 0)
        self.last = now
        auc = m.get("val_auc")
        self.console.note(
            f"epoch {m['epoch']}/{epochs}  train loss {m['train_loss']:.3f} acc {m['train_acc']:.3f}"
            f"  val loss {m['val_loss']:.3f} acc {m['val_acc']:.3f} AUC {'n/a' if auc is None else f'{auc:.3f}'}"
            f"  {per_epoch:.0f} s" + (f"  ETA {eta(per_epoch * (epochs - m['epoch']))}" if m["epoch"] < epochs else ""))
