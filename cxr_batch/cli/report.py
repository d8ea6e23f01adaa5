"""`cxr-batch report`: an HTML page of what a scoring run found."""

from __future__ import annotations

import click

from .options import friendly


@click.command()
@click.argument("results")
@click.option("--out", "-o", default=None, help="The HTML file (local or s3://). Default: <RESULTS>-report.html beside RESULTS.")
@click.option("--folder-depth", type=click.IntRange(min=1), default=None,
              help="Path components that name a folder in the per-folder table. Default: the shallowest level with 2+ folders.")
@click.option("--gallery", type=click.IntRange(min=0), default=12, show_default=True, help="Images in each gallery.")
@friendly
def report(results, out, folder_depth, gallery):
    """Write an HTML page of what a scoring run found: counts, the model, a histogram of P(pneumonia),
    errors grouped by message, per-folder flagged rates, and the most suspicious and most uncertain
    images with their CAMs. It opens from disk in any browser, offline.

    RESULTS is the output folder of `cxr-batch score` (local or s3://). One pass over the table with
    bounded memory: a million rows take seconds.

    Example: cxr-batch report results.parquet --out results-report.html
    """
    from ..reports.html.score import ReportSettings, write_score_report

    r = write_score_report(ReportSettings(results=results, out=out, folder_depth=folder_depth, gallery=gallery))
    click.echo(f"cxr-batch report: {r.files:,} rows in {r.seconds:.1f} s -> {r.path}")
    if r.damaged:
        from ..archive.results import damaged_note

        click.echo("  note: " + damaged_note(r.damaged, "skipped (a `cxr-batch score` re-run into the same --out"
                                             " sets them aside and scores their files again)"))
