"""The command line: each command turns its options into a settings object and calls the library.

One module per command group (score.py, train.py with evaluate, examples.py with synth and demo,
report.py, benchmark.py); shared options in options.py; what gets printed in console.py and summaries.py.
The scripts in jobs/ at the repository root call ``main`` with their command's name.
"""

from __future__ import annotations

import os
import sys

import click

from ..errors import EXIT_ERROR, EXIT_INCOMPLETE, EXIT_OK, EXIT_USAGE
from .benchmark import benchmark
from .examples import demo, synth
from .report import report
from .score import score
from .train import evaluate, train

EXIT_CODES = f"""Exit codes:

\b
  {EXIT_OK}  success
  {EXIT_ERROR}  an error you can fix, printed as one line "Error: ..." (a bad path, model or option value)
  {EXIT_USAGE}  a usage error: an unknown option, a value out of range, a missing argument
  {EXIT_INCOMPLETE}  score finished, but some files failed for a transient reason (status 'retry'): run it again
"""


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}, epilog=EXIT_CODES)
@click.version_option(package_name="cxr-batch")
def main():
    """Chest X-ray pneumonia classifier at archive scale: fine-tune a ResNet with Ray Train, score
    folders of images with Ray Data into Parquet plus a Class Activation Map PNG per image.

    Start with `cxr-batch demo`, or `cxr-batch synth ARCHIVE` for an example archive.
    """


for _command in (score, report, train, evaluate, demo, synth, benchmark):
    main.add_command(_command)


def run() -> None:
    """The `cxr-batch` console script: ``main`` as a process of its own.

    After `cxr-batch score`, the process exits without the interpreter's teardown: with torch
    loaded, freeing every module takes about a second after the work is done, time the user waits
    for nothing. By then every file is closed, the pool
    joined and the lease released; Ray, when this process started it, is shut down by the normal
    exit, so that path is kept whenever Ray is up. Other commands exit normally (temporary folders
    and the like are cleaned up at exit)."""
    try:
        main.main(prog_name="cxr-batch")
    except SystemExit as e:
        code = 0 if e.code is None else e.code
    else:
        code = 0
    if _may_skip_teardown():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe (`| head`) or stream: nothing more can be said
                pass
        os._exit(code if isinstance(code, int) else 1)
    sys.exit(code)


def _may_skip_teardown() -> bool:
    from .score import finished

    ray = sys.modules.get("ray")
    return finished() and not (ray is not None and ray.is_initialized())
