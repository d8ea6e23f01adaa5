"""(d) `cxr-batch score` as a user runs it: a fresh Python process per engine, so that everything a
small archive pays before its first row (the interpreter, torch's import, Ray's or the pool's start,
the model build, the first batches) is inside the time. The engine's own breakdown of that start-up
comes back in the summary (``ScoreSummary.startup``) of ``--json``.

The in-process runs of (b) cannot show this: the benchmark has imported torch and started Ray
before them, which a user's first `cxr-batch score` has not.
"""

from __future__ import annotations

import sys
import time

from .host import run_json

# The CLI's own console script (cli.run, as `cxr-batch` runs it), run by this interpreter (a `cxr-batch` on PATH may
# belong to another venv).
_ENTRY = "from cxr_batch.cli import run; run()"


def score_command(archive: str, out: str, model: str, *, engine: str, precision: str, batch_size: int,
                  limit: int, device: str) -> list[str]:
    return [sys.executable, "-c", _ENTRY, "score", archive, "--out", out, "--model", model, "--engine", engine,
            "--precision", precision, "--batch-size", str(batch_size), "--limit", str(limit), "--device", device,
            "--overwrite", "--json"]


def run_score_cli(command: list[str]) -> dict:
    """Run one `cxr-batch score --json`; its summary plus the wall time the user waited for it."""
    t0 = time.perf_counter()
    out, _ = run_json(command, what="cxr-batch score")
    return {"wall_s": round(time.perf_counter() - t0, 2), "summary": out["summary"]}


def startup_line(engine: str, startup: dict) -> str:
    """The start-up breakdown as one line of the table, in the order things happen. "process" is the
    interpreter and the CLI's imports and checks before ``run_score`` began (torch-free:
    the model is described from its checkpoint's entries); driver model check, Ray start, pool start, torch import
    and model build are durations; "first ..." are since the engine (or run_score) started."""
    names = [("process_s", "process"), ("model_check_s", "driver model check"), ("ray_start_s", "Ray start"), ("engine_start_s", "engine start"), ("pool_start_s", "pool start"),
             ("torch_import_s", "torch import"), ("model_build_s", "model build"),
             ("first_decode_s", "first decoded batch"), ("first_batch_s", "first forward done"),
             ("first_rows_s", "first rows written")]
    parts = [f"{label} {startup[key]:.2f}" for key, label in names if startup.get(key) is not None]
    return f"start-up, engine {engine} (s): " + (", ".join(parts) if parts else "(not reported)")
