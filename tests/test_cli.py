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
