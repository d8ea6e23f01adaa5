"""The run loop's retry policy, driven by a plain engine: every todo file ends as exactly one row;
transient failures are retried with backoff and what outlasts them is a "retry" row; a file that
kills its batch ends as its own error row and the rest of its batch is scored. (The same with real
Ray workers, a real vanished folder and a decoder that calls os._exit: tests/test_failures.py.)"""

from collections import Counter

import pyarrow as pa
import pytest

from cxr_batch.jobs.runloop import LOST, POISON, RetryPolicy, WorkersFailed, drive


def todo(n):
    return pa.table({"path": [f"f{i:03d}.png" for i in range(n)], "sniff": [False] * n, "size": [10] * n})


def rows(paths, status, error=None):
    return pa.table({"path": pa.array(paths, pa.string()), "status": [status] * len(paths),
                     "error": pa.array([error] * len(paths), pa.string())})


class Engine:
    """Scores in batches of 4; ``transient(path, attempt)`` says a file fails for now; a batch that
    holds a path in ``poison`` is lost whole, as when its worker dies."""

    def __init__(self, transient=lambda p, k: False, poison=()):
        self.transient, self.poison, self.seen, self.calls = transient, set(poison), Counter(), []

    def __call__(self, table, isolate):
        self.calls.append((table.num_rows, isolate))
        paths = table["path"].to_pylist()
        size = 1 if isolate else 4
        for i in range(0, len(paths), size):
            batch = paths[i: i + size]
            if self.poison & set(batch):
                continue
            for p in batch:
                self.seen[p] += 1
                yield rows([p], "retry", "file vanished after it was listed") if self.transient(p, self.seen[p]) \
                    else rows([p], "scored")


def run(engine, n, policy=RetryPolicy(passes=3, backoff_s=1.0, deaths=2)):
    out, waits = [], []
    outcome = drive(todo(n), engine, out.append, lambda paths, error, status: rows(paths.to_pylist(), status, error),
                    policy, sleep=waits.append)
    table = pa.concat_tables(out)
    assert sorted(table["path"].to_pylist()) == todo(n)["path"].to_pylist()  # every file exactly once
    return {r["path"]: r for r in table.to_pylist()}, outcome, waits


def test_a_transient_failure_that_passes_is_scored_on_a_retry():
    got, outcome, waits = run(Engine(transient=lambda p, k: p < "f004" and k < 3), 10)
    assert all(r["status"] == "scored" for r in got.values())
    assert waits == [1.0, 2.0] and outcome.retried == 4 and outcome.left == 0


def test_what_outlasts_the_retries_is_a_retry_row():
    got, outcome, waits = run(Engine(transient=lambda p, k: p == "f001.png"), 6)
    assert got["f001.png"]["status"] == "retry" and got["f001.png"]["error"] == "file vanished after it was listed"
    assert [r["status"] for p, r in got.items() if p != "f001.png"] == ["scored"] * 5
    assert waits == [1.0, 2.0, 4.0] and outcome.left == 1


def test_a_poison_file_is_its_own_error_row_and_its_batch_is_scored():
    engine = Engine(poison={"f005.png"})
    got, outcome, _ = run(engine, 10)
    assert got["f005.png"]["status"] == "error" and got["f005.png"]["error"] == POISON.format(n=2)
    assert all(r["status"] == "scored" for p, r in got.items() if p != "f005.png")  # f004, f006, f007 too
    assert outcome.poison == ["f005.png"]
    assert (4, True) in engine.calls  # the lost batch was retried one file at a time


def test_a_file_lost_until_the_passes_run_out_is_left_to_retry():
    got, outcome, _ = run(Engine(poison={"f002.png"}), 4, RetryPolicy(passes=1, backoff_s=0, deaths=2))
    assert got["f002.png"]["status"] == "retry" and got["f002.png"]["error"] == LOST.format(n=1)
    assert outcome.left == 1


@pytest.mark.parametrize("n", [40, 3])
def test_a_job_that_loses_everything_blames_no_file(n):
    with pytest.raises(WorkersFailed, match=f"all {n} files were lost in the workers"):
        run(Engine(poison={f"f{i:03d}.png" for i in range(n)}), n)


def test_a_small_batch_with_one_poison_file_is_not_taken_for_a_broken_job():
    got, outcome, _ = run(Engine(poison={"f001.png"}), 3)
    assert outcome.poison == ["f001.png"] and got["f000.png"]["status"] == got["f002.png"]["status"] == "scored"
