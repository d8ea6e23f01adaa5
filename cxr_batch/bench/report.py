"""How `cxr-batch report` scales: a table of N rows made from a real scored table, reported by our
streaming pass and, in the same run, by the obvious baseline (pandas reads the whole table, then
groups), each in its own process so that peak memory is its own.

    python -m cxr_batch.bench.report SOURCE_RESULTS WORKDIR --rows 1000000

The big table repeats SOURCE's rows (errors, labels, CAM paths and all) under 100 sites x 10 wards
of folders, with each probability moved by a little noise so the histogram and galleries are not
copies; it is written in part files of 2,000 rows, as `cxr-batch score` writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..archive import storage
from ..archive.results import part_files, read_metadata, read_table
from .host import run_json

ROWS_PER_PART = 2000


def make_big_table(source: str, out: str, rows: int, *, seed: int = 0) -> str:
    """SOURCE's rows repeated to ``rows`` rows in ``out`` (a results folder), with varied folders and P."""
    src = read_table(source)
    meta = read_metadata(source)
    rng = np.random.default_rng(seed)
    storage.makedirs(out)
    schema = src.schema.with_metadata({b"cxr_batch": json.dumps(meta).encode()})
    for seq, start in enumerate(range(0, rows, ROWS_PER_PART)):
        n = min(ROWS_PER_PART, rows - start)
        idx = np.arange(start, start + n)
        t = src.take(pa.array(idx % src.num_rows))
        site = pa.array([f"site-{s:03d}/ward-{w}" for s, w in zip(idx * 7 % 100, idx % 10)])
        t = t.set_column(0, "path", pc.binary_join_element_wise(site, pa.array(idx.astype(str)), t["path"], "/"))
        p = t["prob_pneumonia"].to_numpy(zero_copy_only=False)
        noisy = np.clip(p + rng.normal(0, 0.04, n), 0, 1).astype(np.float32)
        t = t.set_column(t.schema.get_field_index("prob_pneumonia"), "prob_pneumonia",
                         pa.array(np.where(np.isnan(p), np.nan, noisy).astype(np.float32)))  # NaN where unscored, as scoring writes
        thr = t["threshold"].to_numpy(zero_copy_only=False)
        pred = np.where(np.isnan(noisy) | np.isnan(p), None, np.where(noisy >= thr, "PNEUMONIA", "NORMAL"))
        t = t.set_column(t.schema.get_field_index("pred"), "pred", pa.array(pred.tolist(), pa.string()))
        pq.write_table(t.cast(schema), os.path.join(out, f"part-0000be7c-{seq:05d}.parquet"), compression="zstd")
    return out


def _baseline(results: str) -> None:
    """What a user writes today: the whole table into pandas, then the same counts."""
    import pandas as pd

    df = pd.concat([pd.read_parquet(p) for p in part_files(results)], ignore_index=True)
    ok = df["error"].isna()
    df["folder"] = df["path"].str.split("/").str[0]
    df.groupby("folder").agg(files=("path", "size"), flagged=("pred", lambda s: (s == "PNEUMONIA").sum()))
    df[~ok].groupby("error").size()
    df[ok].nlargest(12, "prob_pneumonia")
    np.histogram(df.loc[ok, "prob_pneumonia"], bins=50, range=(0, 1))


def _measure(args: list[str]) -> dict:
    """Run ``python -m cxr_batch.bench.report --child ...``: its seconds (interpreter start included),
    peak RSS and what it printed."""
    t0 = time.perf_counter()
    out, p = run_json(["/usr/bin/time", "-f", "%M", sys.executable, "-m", "cxr_batch.bench.report", "--child", *args],
                      what=f"report benchmark child ({args[0]})")
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": int(p.stderr.strip().splitlines()[-1]) / 1024, **out}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", nargs="?")
    ap.add_argument("workdir", nargs="?")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--child", nargs=2, metavar=("WHAT", "RESULTS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        what, results = a.child
        if what == "report":
            from ..reports.html.score import ReportSettings, write_score_report

            r = write_score_report(ReportSettings(results=results, out=results + "-report.html"))
            print(json.dumps({"pass_seconds": r.pass_seconds, "inside_seconds": r.seconds}))
        else:
            _baseline(results)
        return
    if not (a.source and a.workdir):
        ap.error("SOURCE and WORKDIR are required")
    big = os.path.join(a.workdir, f"big-{a.rows}.parquet")
    if not part_files(big):
        t0 = time.perf_counter()
        make_big_table(a.source, big, a.rows)
        print(f"built {a.rows:,} rows in {len(part_files(big))} parts in {time.perf_counter() - t0:.1f} s: {big}")
    ours, base = _measure(["report", big]), _measure(["pandas", big])
    size = os.path.getsize(big + "-report.html") / 1024
    print(f"cxr-batch report : {ours['seconds']:6.1f} s  peak RSS {ours['peak_rss_mb']:7.0f} MB  (page {size:.0f} KB;"
          f" the pass over the table {ours['pass_seconds']:.1f} s)")
    print(f"pandas baseline  : {base['seconds']:6.1f} s  peak RSS {base['peak_rss_mb']:7.0f} MB")
    print(f"ratio            : {base['seconds'] / ours['seconds']:.1f}x faster, "
          f"{base['peak_rss_mb'] / ours['peak_rss_mb']:.1f}x less memory")


if __name__ == "__main__":
    main()
