"""Each option is declared once, in its settings field: the click options of score, train and
evaluate carry the field's default, choices and help (no drift), every option has help and shows its
default, `--help` lists the options in groups, and the commands share one convention (-m/--model,
--device, --precision, --limit, --no-cams)."""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext

import click
import pytest
from click.testing import CliRunner

from cxr_batch.cli import main
from cxr_batch.cli.options import names
from cxr_batch.fields import exposed
from cxr_batch.jobs.demo import DemoSettings
from cxr_batch.jobs.evaluate import EvaluateSettings
from cxr_batch.jobs.score_settings import ScoreSettings
from cxr_batch.jobs.train_config import TrainSettings

SETTINGS = {"score": ScoreSettings, "train": TrainSettings, "evaluate": EvaluateSettings, "demo": DemoSettings}
# Options that steer the command itself, not the job: they have no settings field.
NOT_SETTINGS = {"report_", "register", "address", "wait_for_gpus", "wait_timeout", "as_json", "verbose", "help"}


def options(command: str) -> list[click.Option]:
    return [p for p in main.commands[command].params if isinstance(p, click.Option)]


def drift(option: click.Option, field: dataclasses.Field) -> list[str]:
    """How ``option`` differs from the settings ``field`` it sets: default, choices, help, shown default."""
    meta, out = field.metadata, []
    if field.default is dataclasses.MISSING:
        if not option.required:
            out.append("the field has no default, the option is not required")
    else:
        default = names(None, option, option.default) if isinstance(field.default, tuple) else option.default
        if default != field.default:
            out.append(f"default {default!r} != {field.default!r}")
    choices = tuple(option.type.choices) if isinstance(option.type, click.Choice) else None
    if choices != meta["choices"]:
        out.append(f"choices {choices} != {meta['choices']}")
    if option.help != meta["help"]:
        out.append(f"help {option.help!r} != {meta['help']!r}")
    if meta["shown"] is not None and option.show_default != meta["shown"]:
        out.append(f"shown default {option.show_default!r} != {meta['shown']!r}")
    return out


@pytest.mark.parametrize("command", sorted(SETTINGS))
def test_every_option_is_its_settings_field(command):
    fields = exposed(SETTINGS[command])
    problems = []
    for option in options(command):
        if option.name in NOT_SETTINGS:
            continue
        if option.name not in fields:
            problems.append(f"{option.opts[0]}: no field {option.name!r} with option metadata in"
                            f" {SETTINGS[command].__name__}")
            continue
        problems += [f"{option.opts[0]}: {d}" for d in drift(option, fields.pop(option.name))]
    problems += [f"{SETTINGS[command].__name__}.{name} has option metadata but no option" for name in fields]
    assert not problems, "\n".join(problems)


def test_a_hand_written_option_is_drift():
    """The check itself: an option written by hand with another default, choice list or help is caught."""
    field = exposed(ScoreSettings)["precision"]
    same = click.Option(["--precision", "precision"], type=click.Choice(field.metadata["choices"]),
                        default=field.default, help=field.metadata["help"])
    assert drift(same, field) == []
    other = click.Option(["--precision", "precision"], type=click.Choice(["auto", "fp32"]), default="fp32",
                         help="Precision.")
    assert len(drift(other, field)) == 3


def test_every_option_of_every_command_has_help_and_shows_its_default():
    missing = []
    for command in main.commands:
        ctx = click.Context(main.commands[command])
        for option in options(command):
            if option.hidden or option.name == "help":
                continue
            if not option.help:
                missing.append(f"{command} {option.opts[0]}: no help")
            off_flag = option.is_flag and not option.secondary_opts and not option.get_default(ctx)
            # Prose ("Default: ...") only where no settings field holds the default.
            prose = "Default:" in (option.help or "") and (command not in SETTINGS or option.name in NOT_SETTINGS)
            if not (option.show_default or off_flag or option.required or prose):
                missing.append(f"{command} {option.opts[0]}: default not shown")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("command", ["evaluate", "score", "train"])
def test_help_lists_the_options_in_groups(command):
    text = CliRunner().invoke(main, [command, "--help"]).output
    for group in ("Input", "Output", "Model", "Performance", "Cluster"):
        assert f"\n{group} options:\n" in text, (command, group)


def captured(monkeypatch, module: str, function: str, summary: str) -> dict:
    """Replace ``module.function`` (the library call behind a command), its summary formatter
    ``cli.train.<summary>`` and Ray's start with stand-ins: the settings the command built land in the
    returned dict, and the command ends with the stand-in summary "summary of OUT"."""
    import importlib

    seen = {}

    def stand_in(s, **kwargs):
        seen["settings"] = s
        return {"out": s.out}

    monkeypatch.setattr(importlib.import_module(module), function, stand_in)
    # The module, not the `train` command that cxr_batch.cli's namespace gives that name to.
    monkeypatch.setattr(importlib.import_module("cxr_batch.cli.train"), summary,
                        lambda result, *out: f"summary of {out[0] if out else result['out']}")
    monkeypatch.setattr("cxr_batch.jobs.ray_env.ray_for_job", lambda *a, **k: nullcontext())
    return seen


def test_evaluate_takes_the_model_with_dash_m_and_passes_device_precision_limit_and_no_cams(monkeypatch, tmp_path):
    seen = captured(monkeypatch, "cxr_batch.jobs.evaluate", "run_evaluate", "format_eval_summary")
    r = CliRunner().invoke(main, ["evaluate", "-m", "run/best.ckpt", str(tmp_path), "--out", "rep", "--device", "cpu",
                                  "--precision", "fp32", "--limit", "4", "--no-cams"])
    assert r.exit_code == 0 and "summary of rep" in r.output, r.output
    s = seen["settings"]
    assert (s.checkpoint, s.folder) == ("run/best.ckpt", str(tmp_path))
    scoring = s.score_settings()
    assert (scoring.model, scoring.device, scoring.precision, scoring.limit, scoring.cams) == (
        "run/best.ckpt", "cpu", "fp32", 4, False)
    assert CliRunner().invoke(main, ["evaluate", str(tmp_path), "--out", "rep"]).exit_code == 2  # -m is required


def test_train_takes_device_like_score_and_keeps_the_gpu_flag_as_an_alias(monkeypatch, tmp_path):
    seen = captured(monkeypatch, "cxr_batch.jobs.train", "run_train", "format_train_summary")
    base = ["train", str(tmp_path), "--out", str(tmp_path / "run")]
    for args, gpu in ((["--device", "cpu"], False), (["--device", "gpu"], True), ([], None), (["--gpu"], True)):
        r = CliRunner().invoke(main, [*base, *args])
        assert r.exit_code == 0 and f"summary of {tmp_path / 'run'}" in r.output, r.output
        assert seen["settings"].gpu is gpu, args
    r = CliRunner().invoke(main, [*base, "--device", "cpu", "--gpu"])
    assert r.exit_code == 1 and "drop --gpu/--no-gpu" in r.output
    assert "--gpu" not in CliRunner().invoke(main, ["train", "--help"]).output


def test_cam_point_defaults_differ_and_evaluate_says_why():
    """score defaults to the free map point, evaluate to the evidence point its pointing game judges."""
    assert exposed(ScoreSettings)["cam_point"].default == "map"
    field = exposed(EvaluateSettings)["cam_point"]
    assert field.default == "evidence" and "score's default" in field.metadata["help"]
    assert field.metadata["choices"] == exposed(ScoreSettings)["cam_point"].metadata["choices"]


def test_a_setting_needs_help_a_known_group_and_a_default_among_its_choices():
    from cxr_batch.fields import INPUT, setting

    assert setting("a", "Which.", group=INPUT, choices=("a", "b")).metadata["choices"] == ("a", "b")
    for bad in (dict(default="c", help="Which.", group=INPUT, choices=("a", "b")),
                dict(default=1, help="", group=INPUT), dict(default=1, help="How many.", group="Misc")):
        with pytest.raises(ValueError):
            setting(**bad)
