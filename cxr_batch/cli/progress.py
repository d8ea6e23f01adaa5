"""Progress of a long phase: counts, a rate and an ETA that leave the start-up out.

``Meter`` is the pure core: it is told how many items are done and when, and gives the rate and
the time left. The rate counts from the first finished batch, not from launch: starting Ray, the
actors and the model takes a while that says nothing about how fast the rest will go, and
counting it made the first ETA many times too long.

``Ticker`` redraws a line from a background thread, so that a line comes even while no batch
finishes (a slow model, a long first batch): on a terminal in place, in a log as new lines never
further apart than ``LOG_INTERVAL_S`` (what the README promises).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

LOG_INTERVAL_S = 5.0
# A log line is due a little before the promised interval, so a busy machine that wakes the
# thread late still keeps the promise.
LOG_DUE_S = LOG_INTERVAL_S * 0.7
TICK_S = 0.25


def eta(seconds: float | None) -> str:
    if seconds is None:
        return "--"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


@dataclass
class Meter:
    """``done`` of ``total`` items, updated as batches finish."""
    total: int
    started: float
    first: tuple[float, int] | None = None  # (time, done) at the first finished batch
    last: tuple[float, int] | None = None

    def update(self, done: int, now: float) -> None:
        if done and self.first is None:
            self.first = (now, done)
        if done:
            self.last = (now, done)

    @property
    def done(self) -> int:
        return self.last[1] if self.last else 0

    def rate(self) -> float | None:
        """Items per second since the first finished batch; None until a second one has finished."""
        if not self.first or not self.last or self.last[1] <= self.first[1] or self.last[0] <= self.first[0]:
            return None
        return (self.last[1] - self.first[1]) / (self.last[0] - self.first[0])

    def eta(self, now: float) -> float | None:
        """Seconds left: what is left at the rate, less the time since the last batch finished."""
        rate = self.rate()
        if rate is None:
            return None
        return max(0.0, (self.total - self.done) / rate - (now - self.last[0]))

    def line(self, what: str, unit: str, now: float, extra: str = "") -> str:
        elapsed = now - self.started
        if not self.done:
            return f"{what} 0/{self.total:,} {unit}  starting ({elapsed:.0f} s){extra}"
        rate = self.rate()
        speed = "" if rate is None else f"  {rate:.1f} {unit}/s"
        tail = "" if self.done >= self.total else f"  ETA {eta(self.eta(now))}"
        return f"{what} {self.done:,}/{self.total:,} {unit}{speed}{extra}  {elapsed:.0f} s{tail}"


class Ticker:
    """Calls ``console.progress(render())`` every TICK_S from a daemon thread until ``stop()``."""

    def __init__(self, console, render):
        self.console, self.render = console, render
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(TICK_S):
            self.console.progress(self.render())

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()


class ScoreProgress:
    """A ``progress(summary, total)`` callback for run_score; a new summary object is a new run
    (evaluate scores its folder, then the --ood-check folder, through one callback)."""

    def __init__(self, console, what: str):
        self.console, self.what = console, what
        self.summary, self.meter, self.ticker = None, None, None

    def __call__(self, summary, total: int) -> None:
        now = time.monotonic()
        if summary is not self.summary:
            self.close()
            if not total:  # nothing to score: the summary says so
                return
            self.summary, self.meter = summary, Meter(total, now)
            self.ticker = Ticker(self.console, self.render)
        if self.meter:
            self.meter.update(summary.scored + summary.errors + getattr(summary, "skipped", 0), now)
            if self.meter.done >= total:
                self.close()

    def render(self) -> str:
        errors = self.summary.errors
        return self.meter.line(self.what, "files", time.monotonic(), f"  {errors:,} errors" if errors else "")

    def close(self) -> None:
        """Stop the ticker and draw the last line, once per run."""
        if self.ticker:
            self.ticker.stop()
            self.ticker = None
            self.console.progress(self.render(), final=True)


class PhaseProgress:
    """``update(done)`` for a phase with a known amount of work (evaluate's deletion curves)."""

    def __init__(self, console, what: str, total: int, unit: str):
        self.console, self.what, self.unit = console, what, unit
        self.meter = Meter(total, time.monotonic())
        self.ticker = Ticker(console, self.render)

    def __call__(self, done: int) -> None:
        self.meter.update(done, time.monotonic())
        if done >= self.meter.total:
            self.close()

    def render(self) -> str:
        return self.meter.line(self.what, self.unit, time.monotonic())

    def close(self) -> None:
        if self.ticker:
            self.ticker.stop()
            self.ticker = None
            self.console.progress(self.render(), final=True)
