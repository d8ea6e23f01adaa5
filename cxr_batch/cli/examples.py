"""`cxr-batch synth` (an example archive) and `cxr-batch demo` (the whole flow on it)."""

from __future__ import annotations

import click

from ..jobs.demo import DemoSettings
from ..synth import FAMILIES
from .console import Console
from .options import GroupedCommand, cluster_options, friendly, option_from_field, output_options
from .summaries import format_eval_summary


@click.command()
@click.argument("out")
@click.option("--train", "n_train", type=click.IntRange(min=2), default=160, show_default=True, help="Images in train/.")
@click.option("--val", "n_val", type=click.IntRange(min=0), default=40, show_default=True, help="Images in val/.")
@click.option("--test", "n_test", type=click.IntRange(min=0), default=80, show_default=True, help="Images in test/.")
@click.option("--size", type=click.IntRange(min=64, max=4096), default=256, show_default=True, help="Image side in px.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every image's generator.")
@click.option("--family", type=click.Choice(FAMILIES), default="phantom", show_default=True,
              help="phantom: modelled lesions on clean anatomy; texture, film: an additive opacity on a textured,"
                   " low-contrast background (a generated one, or a flattened phantom film).")
@friendly
def synth(out, n_train, n_val, n_test, size, seed, family):
    """Write an example archive of procedural chest phantoms (or another task family) to OUT.

    Layout as the public pediatric pneumonia set: OUT/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg.
    PNEUMONIA images carry a planted opacity; OUT/truth.csv gives its centre and radius.

    Example: cxr-batch synth example-archive --train 200 --test 100
    """
    from ..synth.archive import make_archive

    truth = make_archive(out, n_train=n_train, n_val=n_val, n_test=n_test, size=size, seed=seed, family=family)
    click.echo(f"Wrote {n_train + n_val + n_test} phantoms to {out} (truth: {truth}).")


@click.command(cls=GroupedCommand)
@option_from_field(DemoSettings, "out", "--out", "-o")
@option_from_field(DemoSettings, "epochs", "--epochs", type=click.IntRange(min=1))
@option_from_field(DemoSettings, "n_train", "--train", type=click.IntRange(min=20))
@cluster_options
@output_options
@friendly
def demo(address, wait_for_gpus, wait_timeout, as_json, verbose, **settings):
    """Run the whole flow on built-in phantoms: synth -> train -> score -> report (minutes on a CPU).

    Example: cxr-batch demo --out demo
    """
    from ..jobs.demo import run_demo
    from ..jobs.ray_env import ray_for_job

    s = DemoSettings(**settings)
    console = Console(as_json=as_json, verbose=verbose)
    console.settings(s)
    with ray_for_job(address, wait_for_gpus=wait_for_gpus, wait_timeout=wait_timeout, verbose=verbose,
                     echo=console.note):
        r = run_demo(s, echo=console.note, epoch_progress=console.epoch_progress(),
                     score_progress=console.score_progress())
    console.summary(format_eval_summary(r["metrics"], r["report_dir"])
                    + f"\n  checkpoint    {r['checkpoint']}\n  score more    cxr-batch score ARCHIVE --out results.parquet"
                      f" --model {r['checkpoint']}", r)
