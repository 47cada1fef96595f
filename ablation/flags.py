"""Command-line flags generated from a settings dataclass: one flag per field, its help from the field's metadata.

`ablate train` (`TrainConfig`) and `ablate attack` (`AttackSettings`) build their parsers this way, so a
settings dataclass is the single list of a command's options (field `num_prompts` -> `--num-prompts`). Field
metadata: `help` (the text), optionally `flag` (another flag name) and `metavar`. Written here rather than taken
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
    metadata = {"help": text, **{k: kwargs.pop(k) for k in ("flag", "metavar") if k in kwargs}}
    return dataclasses.field(metadata=metadata, **kwargs)


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
    flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
    help_ = f.metadata.get("help", "")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if keep_absent:
        default = argparse.SUPPRESS
    else:
        default = f.default if f.default is not dataclasses.MISSING else None
        if default not in (None, "") and "default" not in help_:
            help_ = f"{help_} (default: {default})"
    common = dict(dest=f.name, default=default, help=help_)
    if "metavar" in f.metadata:
        common["metavar"] = f.metadata["metavar"]
    if hint is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
    elif origin is Literal:
        parser.add_argument(flag, choices=args, **common)
    elif origin is list:
        item = typing.get_args(hint)[0]
        if f.name in repeatable:
            parser.add_argument(flag, action="append", **common)
        elif typing.get_origin(item) is Literal:
            parser.add_argument(flag, nargs="+", choices=typing.get_args(item), **common)
        else:
            parser.add_argument(flag, nargs="+", **common)
    else:
        parser.add_argument(flag, type=hint if hint in (int, float) else str, **common)


def add_arguments(parser: argparse.ArgumentParser, cls, *, skip: tuple[str, ...] = (), keep_absent: bool = False,
                  repeatable: tuple[str, ...] = ()) -> None:
    """One flag per field of dataclass `cls` except `skip` (see `add_argument`)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in skip:
            add_argument(parser, f, hints[f.name], keep_absent=keep_absent, repeatable=repeatable)
