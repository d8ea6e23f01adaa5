"""The scoring run's retry policy: what the driver does with the rows an engine returns.

An engine (``engine(rows, isolate) -> Iterator[pa.Table]``) turns todo rows (path, sniff, ...) into
result rows with a ``status``; a path whose worker died is simply absent from what comes back.
The driver, not the engine, decides what happens next:

- "retry" rows (the environment's fault: I/O errors, vanished folders, throttling, no space, out of
  memory) are held back, not written, and scored again after a backoff, up to ``passes`` times;
- lost paths (their worker died: a crashing decoder, the OOM killer) are scored again one file per
  batch, so a poison file takes down only itself; a file whose worker dies ``deaths`` times when it
  is alone gets a permanent error row, and the rest of its batch is scored;
- what still fails transiently is written with status "retry": the summary and exit code 3 say the
  run is incomplete, and a re-run scores exactly those files again.

Nothing here imports Ray: the policy is tested with a plain generator as the engine.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from ..archive.results import ERROR, RETRY, pending
from ..errors import CxrError

POISON = "its worker died each of the {n} times this file was read on its own (a crashing decoder or out of memory): not scored"
LOST = "its worker died while this file's batch was processed, {n} times: run again to retry it"


@dataclass(frozen=True)
class RetryPolicy:
    passes: int = 3  # retry passes after the first; transient failures that outlast them become "retry" rows
    backoff_s: float = 2.0  # wait before retry pass k: backoff_s * 2**(k-1) (2, 4, 8 s: a remount, a throttle)
    deaths: int = 2  # a file whose worker dies this often while it is read alone is poison


@dataclass
class Outcome:
    retried: int = 0  # files scored again after a transient failure or a lost batch
    poison: list = field(default_factory=list)  # paths that ended as poison rows
    left: int = 0  # files written with status "retry"


_NONE_BACK = ("all {n:,} files were lost in the workers, none came back, not even when read one at a time:"
              " see the workers' errors above (--verbose).")


class WorkersFailed(CxrError):
    """Every batch of a pass was lost: the job is broken (not the files), so no file is blamed."""


def drive(todo: pa.Table, engine, publish, failed_rows, policy: RetryPolicy = RetryPolicy(), *,
          sleep=time.sleep, note=None) -> Outcome:
    """Score ``todo`` with ``engine``; ``publish(table)`` writes final rows, ``failed_rows(paths,
    error, status)`` builds rows for files that never came back."""
    outcome, deaths, tried = Outcome(), Counter(), []
    held, lost = _pass(engine, todo, False, publish)
    # Nothing at all came back from more than a batch's worth of files: the code or the cluster is
    # broken, and blaming every file as poison would be a lie.
    if todo.num_rows > 32 and not held and lost.num_rows == todo.num_rows:
        raise WorkersFailed(_NONE_BACK.format(n=todo.num_rows))
    came_back = bool(held) or lost.num_rows < todo.num_rows
    for k in range(1, policy.passes + 1):
        if not held and not lost.num_rows:
            break
        wait = policy.backoff_s * 2 ** (k - 1)
        if note:
            note(f"retry pass {k}/{policy.passes} in {wait:g} s: {_count(held):,} transient failures,"
                 f" {lost.num_rows:,} files whose worker died")
        sleep(wait)
        tried += [t["path"].combine_chunks() for t in held] + [lost["path"].combine_chunks()]
        held, lost_again = _pass(engine, _rows_of(todo, held), False, publish)
        if lost.num_rows:
            held_alone, still = _pass(engine, lost, True, publish)
            # Not one file ever came back, not even alone: a broken model or cluster, not poison files.
            if not came_back and not held_alone and still.num_rows == lost.num_rows > 1:
                raise WorkersFailed(_NONE_BACK.format(n=todo.num_rows))
            came_back = came_back or bool(held_alone) or still.num_rows < lost.num_rows
            held += held_alone
            lost = _poison(still, deaths, policy, publish, failed_rows, outcome)
        lost = pa.concat_tables([lost, lost_again])
    outcome.left = _count(held) + lost.num_rows
    outcome.retried = (pc.count_distinct(pa.concat_arrays(tried)).as_py() if tried else 0) - outcome.left
    for table in held:
        publish(table)
    if lost.num_rows:
        publish(failed_rows(lost["path"], LOST.format(n=max(deaths.values(), default=1)), RETRY))
    return outcome


def _pass(engine, rows: pa.Table, isolate: bool, publish) -> tuple[list, pa.Table]:
    """Run ``rows`` through the engine once: publish final rows -> (held "retry" row tables, lost todo rows)."""
    held, back = [], []
    if not rows.num_rows:
        return held, rows
    for table in engine(rows, isolate):
        is_retry = pc.fill_null(pc.equal(table["status"].cast(pa.string()), RETRY), False)
        final, retry = table.filter(pc.invert(is_retry)), table.filter(is_retry)
        if final.num_rows:
            publish(final)
        if retry.num_rows:
            held.append(retry)
        back.append(table["path"].combine_chunks())
    return held, pending(rows, back)


def _poison(still: pa.Table, deaths: Counter, policy: RetryPolicy, publish, failed_rows, outcome: Outcome) -> pa.Table:
    """Count a death for each file lost on its own; those at ``policy.deaths`` become error rows."""
    paths = still["path"].to_pylist()
    deaths.update(paths)
    poison = pa.array([p for p in paths if deaths[p] >= policy.deaths], pa.string())
    if len(poison):
        publish(failed_rows(poison, POISON.format(n=policy.deaths), ERROR))
        outcome.poison += poison.to_pylist()
    return pending(still, [poison])


def _count(tables: list) -> int:
    return sum(t.num_rows for t in tables)


def _rows_of(todo: pa.Table, held: list) -> pa.Table:
    """The todo rows (path, sniff, size) of the files behind the held result rows."""
    if not held:
        return todo.slice(0, 0)
    return todo.filter(pc.is_in(todo["path"], value_set=pa.concat_arrays([t["path"].combine_chunks() for t in held])))
