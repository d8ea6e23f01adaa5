"""How a job's settings field says what a user may set: its default, its choices, one sentence of
help and the group it is listed under. The settings dataclasses are the one source; the command
line (cli/options.option_from_field) builds each option from a field's metadata, so a default or a
choice list is written once."""

from __future__ import annotations

import dataclasses

# The groups of options in `--help`, in the order they are listed.
INPUT, OUTPUT, MODEL, TRAINING, METRICS, PERFORMANCE, CLUSTER = (
    "Input", "Output", "Model", "Training", "Metrics", "Performance", "Cluster")
GROUPS = (INPUT, OUTPUT, MODEL, TRAINING, METRICS, PERFORMANCE, CLUSTER)
# Where a job's model runs, the same words for every command (`--device`).
DEVICES = ("auto", "cpu", "gpu")


def setting(default=dataclasses.MISSING, help: str = "", *, group: str, choices: tuple | None = None,
            shown: str | None = None):
    """A dataclass field that the command line exposes. ``shown`` is what `--help` prints as the
    default where the value itself says little (None resolved later, e.g. "one per GPU")."""
    if group not in GROUPS:
        raise ValueError(f"Unknown option group {group!r}. Only {', '.join(GROUPS)} are known.")
    if not help:
        raise ValueError("An exposed setting needs one sentence of help.")
    if choices is not None and default not in (*choices, None, dataclasses.MISSING):
        raise ValueError(f"Default {default!r} is not one of its choices {choices}.")
    meta = {"help": help, "group": group, "choices": choices, "shown": shown}
    return dataclasses.field(default=default, metadata=meta)


def setting_like(settings, name: str, **changes):
    """The field ``name`` of another settings class, with some of default, help, group, choices,
    shown changed: the same option in two commands, declared once."""
    f = field_of(settings, name)
    meta = {"default": f.default, **f.metadata, **changes}
    return setting(meta.pop("default"), meta.pop("help"), **meta)


def field_of(settings, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(settings):
        if f.name == name:
            return f
    raise KeyError(f"{settings.__name__} has no field {name!r}.")


def exposed(settings) -> dict[str, dataclasses.Field]:
    """The fields of ``settings`` that carry option metadata, by name."""
    return {f.name: f for f in dataclasses.fields(settings) if "help" in f.metadata}
