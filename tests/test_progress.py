"""Progress a user can trust: the rate leaves start-up out, and a log gets a line every few seconds."""

import os
import re
import subprocess
import sys
import time

import pytest

from cxr_batch.cli.progress import LOG_INTERVAL_S, Meter


def test_the_rate_counts_from_the_first_finished_batch_not_from_launch():
    m = Meter(total=100, started=0.0)
    m.update(0, 30.0)  # start-up: nothing finished yet
    assert m.rate() is None and m.eta(30.0) is None
    m.update(10, 40.0)  # the first batch, after a long start-up
    assert m.rate() is None  # one point gives no rate
    m.update(30, 50.0)
    assert m.rate() == pytest.approx(2.0)  # 20 files in 10 s; the 40 s before them do not count
    assert m.eta(50.0) == pytest.approx(35.0)
    assert m.eta(55.0) == pytest.approx(30.0)  # counts down between batches


def test_the_line_says_starting_until_a_batch_finishes_and_drops_the_eta_at_the_end():
    m = Meter(total=4, started=0.0)
    assert "starting" in m.line("scored", "files", 7.0)
    m.update(2, 8.0)
    m.update(4, 9.0)
    assert "ETA" not in m.line("scored", "files", 9.0)


ETA = re.compile(r"ETA (\d+)m(\d+)s")


@pytest.mark.slow
def test_a_score_log_gets_a_line_every_few_seconds_and_an_honest_first_eta(tmp_path):
    """A real `cxr-batch score` with stderr to a pipe (a log): no gap over LOG_INTERVAL_S between lines,
    and the first ETA after start-up within 2x of the time the run really took from there."""
    from cxr_batch.synth.archive import make_archive

    make_archive(tmp_path / "archive", n_train=0, n_val=0, n_test=160, size=64, seed=1)
    # resnet50 on small images: a run long enough to judge on a 2-core machine, short enough to run.
    cmd = [sys.executable, "-m", "cxr_batch.cli", "score", str(tmp_path / "archive"), "--out", str(tmp_path / "r.parquet"),
           "-m", "resnet50:none", "--no-cams", "--engine", "local"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines = [(time.monotonic(), line.rstrip()) for line in proc.stderr]
    assert proc.wait() == 0, "\n".join(t for _, t in lines)
    progress = [(t, text) for t, text in lines if text.startswith("scored ")]
    start, end = progress[0][0], progress[-1][0]
    assert end - start >= 30, f"the run took {end - start:.0f} s: give the test a larger archive"
    # From the first finished batch: while torch is imported (start-up) the import holds the
    # interpreter and no thread can write (docs/score.md says so).
    steady = [(t, text) for t, text in progress if not text.startswith("scored 0/")]
    gaps = [b[0] - a[0] for a, b in zip(steady, steady[1:])]
    t, text = next((t, text) for t, text in progress if ETA.search(text))
    said = int(ETA.search(text)[1]) * 60 + int(ETA.search(text)[2])
    real = end - t
    eta_note = f"first ETA {said} s ({text!r}); the run took {real:.0f} s more"
    assert max(gaps) <= LOG_INTERVAL_S, f"{max(gaps):.1f} s without a line; {eta_note}"
    assert real / 2 <= said <= real * 2, eta_note
