"""The command line: help texts, one-line errors, every command documented in the README."""

import pathlib
import re

import pytest
from click.testing import CliRunner

from cxr_batch.cli import main

README = pathlib.Path(__file__).parents[1] / "README.md"


def test_every_command_has_help_with_an_example():
    runner = CliRunner()
    top = runner.invoke(main, ["--help"])
    assert top.exit_code == 0
    for name in main.commands:
        r = runner.invoke(main, [name, "--help"])
        assert r.exit_code == 0 and "Example:" in r.output, name


def test_every_command_is_in_the_readme():
    text = README.read_text()
    for name in main.commands:
        assert re.search(rf"cxr-batch {name}\b", text), f"`cxr-batch {name}` is not documented in README.md"


@pytest.mark.parametrize("args,message", [
    (["score", "/nonexistent/archive", "--out", "x", "--model", "resnet18:none"], "Archive not found"),
    (["score", ".", "--out", "x", "--model", "resnet99:none"], "Checkpoint not found"),
    (["score", ".", "--out", "x", "--batch-size", "0"], "0 is not in the range"),
    (["score", ".", "--out", "x", "--precision", "fp8"], "'fp8' is not one of"),
])
def test_bad_input_gives_one_line_errors(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0
    assert message in r.output
    assert "Traceback" not in r.output
    assert len([l for l in r.output.splitlines() if l.startswith("Error")]) == 1


def test_no_model_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_BATCH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CXR_BATCH_MODEL", raising=False)
    r = CliRunner().invoke(main, ["score", str(tmp_path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "cxr-batch train" in r.output and "--model" in r.output


def test_foreign_checkpoint_is_a_clear_error(tmp_path):
    import torch

    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    r = CliRunner().invoke(main, ["score", str(tmp_path), "--out", str(tmp_path / "o"), "--model", str(tmp_path / "foreign.pt")])
    assert r.exit_code == 1 and "not a cxr-batch checkpoint" in r.output


def test_help_and_readme_document_the_exit_codes():
    from cxr_batch.errors import EXIT_ERROR, EXIT_INCOMPLETE, EXIT_OK, EXIT_USAGE

    top = CliRunner().invoke(main, ["--help"]).output
    assert "Exit codes" in top
    text = README.read_text()
    for code in (EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INCOMPLETE):
        assert re.search(rf"^\s+{code}  \S", top, re.M), code
        assert re.search(rf"^\| `{code}` \|", text, re.M), f"exit code {code} is not in the README's table"


def test_a_usage_error_exits_2_and_a_domain_error_exits_1(tmp_path):
    from cxr_batch.errors import EXIT_ERROR, EXIT_USAGE

    assert CliRunner().invoke(main, ["score", ".", "--out", "x", "--no-such-option"]).exit_code == EXIT_USAGE
    r = CliRunner().invoke(main, ["score", str(tmp_path), "--out", "x", "--model", "resnet99:none"])
    assert r.exit_code == EXIT_ERROR


@pytest.mark.parametrize("args,message", [
    (["benchmark", "{tmp}/b", "--modes", "bf16"], "fp32 is required"),
    (["benchmark", "{tmp}/b", "--min-side", "900", "--max-side", "500"], "--min-side <= --max-side"),
    (["synth", "{tmp}/full", "--train", "2"], "is not empty"),
])
def test_bad_settings_of_every_command_are_one_line(args, message, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    r = CliRunner().invoke(main, [a.format(tmp=tmp_path) for a in args])
    assert r.exit_code == 1, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in r.output, r.output


def option_names(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", help_text))


@pytest.mark.parametrize("job,command,only_in_jobs_before", [
    ("score.py", "score", {"--stall-timeout", "--wait-for-gpus", "--wait-timeout"}),
    ("train.py", "train", {"--placement", "--max-failures", "--wait-for-gpus", "--wait-timeout"}),
    ("benchmark.py", "benchmark", set()),
])
def test_the_job_scripts_are_the_cli_commands(job, command, only_in_jobs_before):
    """jobs/*.py run `cxr-batch COMMAND`: the same options (declared once), the cluster ones included."""
    import subprocess
    import sys

    script = README.parent / "jobs" / job
    p = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    cli = CliRunner().invoke(main, [command, "--help"]).output
    assert option_names(p.stdout) == option_names(cli)
    assert only_in_jobs_before <= option_names(cli)


def test_register_default_is_on_for_a_ray_of_our_own_and_off_when_joining(monkeypatch):
    from cxr_batch.jobs.ray_env import joining_a_cluster

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not joining_a_cluster(None)
    assert joining_a_cluster("10.0.0.1:6379")
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")  # what `ray job submit` gives its driver
    assert joining_a_cluster(None)
    help_text = " ".join(CliRunner().invoke(main, ["train", "--help"]).output.split())
    assert "Default: when Ray runs in this process and the model is not weak" in help_text
    assert "never when joining a cluster" in help_text


def test_no_module_imports_from_the_cli():
    """The CLI is the top layer: the library, the jobs and the job scripts never reach into it for
    formatters (the scripts call ``main`` and nothing else)."""
    import ast

    root = README.parent
    for path in [*(root / "cxr_batch").rglob("*.py"), *(root / "jobs").glob("*.py")]:
        if "cli" in path.relative_to(root).parts[:2]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and "cli" in node.module.split("."):
                assert [a.name for a in node.names] == ["main"] and path.parent.name == "jobs", (path, node.module)


def test_the_console_script_skips_teardown_after_a_score_and_keeps_every_row(tmp_path):
    """`cxr-batch` (cli.run) ends a finished score with os._exit (torch's teardown cost 1.1-1.6 s): every
    row must be written by then and the exit code kept; a refused run exits the normal way."""
    import subprocess
    import sys

    import pyarrow.parquet as pq
    from PIL import Image

    (tmp_path / "a" / "NORMAL").mkdir(parents=True)
    for i in range(5):
        Image.new("L", (48, 48), 30 * i).save(tmp_path / "a" / "NORMAL" / f"{i}.png")
    marker = tmp_path / "atexit-ran"
    code = (f"import atexit, sys; atexit.register(lambda: open({str(marker)!r}, 'w').close()); sys.argv[0] = 'cxr-batch';"
            " from cxr_batch.cli import run; run()")

    p = subprocess.run([sys.executable, "-c", code, "score",
                        str(tmp_path / "a"), "--out", str(tmp_path / "o"), "--model", "resnet18:none", "--engine",
                        "local"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert sorted(pq.read_table(tmp_path / "o").column("path").to_pylist()) == [f"NORMAL/{i}.png" for i in range(5)]
    assert "5 scored" in p.stdout and not marker.exists()  # teardown (and so atexit) skipped
    p = subprocess.run([sys.executable, "-c", code, "score",
                        str(tmp_path / "missing"), "--out", str(tmp_path / "o2"), "--model", "resnet18:none"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "Error" in p.stderr + p.stdout and marker.exists()
