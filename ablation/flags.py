"""Command-line flags generated from a settings dataclass: one flag per field, its help from the field's metadata.

Every command builds its parser this way (`ablate train`: `TrainConfig`, `ablate attack`: `AttackSettings`,
`ablate generate / inpaint / upscale / eval`: the option classes of `ablation.evaluation.cli`), so a settings
dataclass is the single list of a command's options (field `num_prompts` -> `--num-prompts`). Field metadata:
`help` (the text), optionally `flag` (another flag name), `aliases` (more names), `metavar`, `required` and
`repeatable` (a list given as a repeated flag). Written here rather than taken
from a library: `transformers.HfArgumentParser` does the same but imports transformers' training stack and
has no "absent flag leaves the YAML value" mode, which `ablate train` needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal


def option(text: str, **kwargs) -> Any:
    """A dataclass field with its `--help` text (and `flag` / `metavar` passed as metadata)."""
    metadata = {"help": text, **{k: kwargs.pop(k) for k in METADATA if k in kwargs}}
    if metadata.get("required") and "default" not in kwargs and "default_factory" not in kwargs:
        kwargs["default"] = None  # filled by the parser; the dataclass itself may be built without it
    return dataclasses.field(metadata=metadata, **kwargs)


#: the `option()` keywords kept as field metadata (the rest go to `dataclasses.field`)
METADATA = ("flag", "aliases", "metavar", "required", "repeatable")


def default_of(f: dataclasses.Field) -> Any:
    """The field's default (a fresh one for a `default_factory`), None when it has none."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def add_argument(parser: argparse.ArgumentParser, f: dataclasses.Field, hint, *, keep_absent: bool = False,
                 repeatable: tuple[str, ...] = ()) -> None:
    """One flag for field `f` (type `hint`).

    Args:
        parser: the parser.
        f: the field.
        hint: its resolved type.
        keep_absent: an absent flag sets nothing (`argparse.SUPPRESS`), so values from a YAML recipe survive;
            otherwise the field's default is the flag's default and `--help` shows it.
        repeatable: list fields given as a repeated flag (`--target A --target B`) rather than `nargs="+"`.
    """
    flags = (f.metadata.get("flag") or "--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ()))
    help_ = f.metadata.get("help", "")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if keep_absent:
        default = argparse.SUPPRESS
    else:
        default = default_of(f)
        shown = default is not None and default is not False and not (isinstance(default, str | list | tuple)
                                                                        and not default)
        if shown and "default" not in help_ and not f.metadata.get("required"):
            help_ = f"{help_} (default: {default})"
    common = dict(dest=f.name, default=default, help=help_)
    for key in ("metavar", "required"):
        if key in f.metadata:
            common[key] = f.metadata[key]
    if hint is bool:  # a False default is a plain switch, as argparse's store_true; a True one can be turned off
        action = argparse.BooleanOptionalAction if default or keep_absent else "store_true"
        parser.add_argument(*flags, action=action, **common)
    elif origin is Literal:
        parser.add_argument(*flags, choices=args, **common)
    elif origin is list:
        item = typing.get_args(hint)[0]
        if f.name in repeatable or f.metadata.get("repeatable"):
            if typing.get_origin(item) is Literal:
                common["choices"] = typing.get_args(item)
            if not keep_absent:  # argparse would append to the default list itself: None, filled in afterwards
                common["default"] = None
            parser.add_argument(*flags, action="append", **common)
        elif typing.get_origin(item) is Literal:
            parser.add_argument(*flags, nargs="+", choices=typing.get_args(item), **common)
        else:
            parser.add_argument(*flags, nargs="+", **common)
    else:
        parser.add_argument(*flags, type=hint if hint in (int, float) else str, **common)


def add_arguments(parser: argparse.ArgumentParser, cls, *, skip: tuple[str, ...] = (), keep_absent: bool = False,
                  repeatable: tuple[str, ...] = ()) -> None:
    """One flag per field of dataclass `cls` except `skip` (see `add_argument`)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in skip:
            add_argument(parser, f, hints[f.name], keep_absent=keep_absent, repeatable=repeatable)


def from_namespace(cls, args: argparse.Namespace):
    """An instance of dataclass `cls` from the parsed flags of its fields (an absent repeated flag: its default)."""
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        values[f.name] = default_of(f) if value is None and f.metadata.get("repeatable") else value
    return cls(**values)
