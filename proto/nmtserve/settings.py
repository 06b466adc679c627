"""Configuration dataclasses as command-line flags with `NMTSERVE_*` environment fallbacks.

Every field of a settings dataclass carries its help text in
`field(metadata={"help": ...})`; this module turns the fields into argparse
flags (the environment variable supplies the default) and back. An empty
variable counts as unset, as templated manifests and configuration maps often
leave one.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import typing
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, TypeVar

ENV_PREFIX = "NMTSERVE_"
T = TypeVar("T")
# Numbers as people write them in flags and manifests; int() and float() alone also take 1_000, other scripts' digits,
# inf and nan, which no setting means.
_NUMBER = {int: re.compile(r"[+-]?[0-9]+"), float: re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")}


def env_var(name: str) -> str:
    """The environment variable that sets the field `name`."""
    return ENV_PREFIX + name.upper()


def env_value(name: str) -> str | None:
    """The value the environment gives the field `name`; None where its variable is unset or empty."""
    return os.environ.get(env_var(name)) or None


def flag(name: str) -> str:
    """The command-line flag that sets the field `name`."""
    return "--" + name.replace("_", "-")


def _base_type(hint: Any) -> type:
    """The concrete type of a field hint, unwrapping `X | None`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _value(kind: type, text: str) -> Any:
    """`text` as a value of `kind`; a number only in ASCII decimal notation, and finite."""
    pattern = _NUMBER.get(kind)
    if pattern is not None and not pattern.fullmatch(text.strip()):
        raise ValueError(f"{text!r} is not a decimal {kind.__name__}")
    value = kind(text)
    if kind is float and not math.isfinite(value):  # 1e999
        raise ValueError(f"{text!r} is beyond any float")
    return value


def decimal(kind: type) -> Callable[[str], Any]:
    """An argparse type for a flag outside the settings dataclasses: an int or float read as the settings read one."""

    def convert(text: str) -> Any:
        return _value(kind, text)

    convert.__name__ = kind.__name__  # argparse's "invalid int value"
    return convert


def _parse(kind: type, text: str, name: str) -> Any:
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{env_var(name)}={text!r} is not a boolean (use true or false)")
    try:
        return _value(kind, text)
    except ValueError as error:
        raise ValueError(f"{env_var(name)}={text!r} is not a valid {kind.__name__}") from error


class _FromEnvironment(str):
    """A variable's text as a flag's default: argparse converts it only where the flag is not given, after --help, so
    that a bad variable neither hides the help nor stops a flag that overrides it."""


def _converter(kind: type, name: str, choices: tuple | None, optional: bool) -> Any:
    """A flag's argparse type: its kind (an empty value unsets an optional field), and for a variable's text a usage
    error naming the variable."""

    def convert(text: str) -> Any:
        if optional and text == "":
            return None
        if not isinstance(text, _FromEnvironment):
            return _value(kind, text)
        try:
            value = _parse(kind, text, name)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        if choices is not None and value not in choices:  # argparse checks only values given as flags
            raise argparse.ArgumentTypeError(f"{env_var(name)}={value!r} is not one of {', '.join(map(str, choices))}")
        return value

    convert.__name__ = kind.__name__  # argparse's "invalid int value" for a flag
    return convert


def add_settings_arguments(parser: argparse.ArgumentParser, cls: type, *, positional: tuple[str, ...] = ()) -> None:
    """Add one flag per field of the dataclass `cls` to parser; NMTSERVE_<FIELD> sets its default."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        kind = _base_type(hints[f.name])
        kind = str if kind is Path else kind
        optional = type(None) in typing.get_args(hints[f.name])
        env = env_var(f.name)
        default = f.default if f.default is not MISSING else (f.default_factory() if f.default_factory is not MISSING else None)
        text = env_value(f.name)
        unset = "; an empty value unsets it" if optional and kind is not bool else ""
        help_text = f"{f.metadata.get('help', '')} [env {env}; default: %(default)s{unset}]"
        convert = _converter(kind, f.name, f.metadata.get("choices"), optional)
        default = _FromEnvironment(text) if text is not None else default
        if kind is bool:
            action = parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=help_text)
            action.type = convert  # what argparse converts a string default with; --x and --no-x set theirs directly
        elif f.name in positional:
            parser.add_argument(f.name, type=convert, nargs="?" if default is not None else None, default=default, help=help_text)
        else:
            parser.add_argument(
                flag(f.name),
                type=convert,
                default=default,
                choices=f.metadata.get("choices"),
                metavar=f.metadata.get("metavar"),
                help=help_text,
            )


def settings_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build the dataclass `cls` from parsed arguments."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields(cls):
        value = getattr(args, f.name)
        if value is not None and _base_type(hints[f.name]) is Path:
            value = Path(value)
        values[f.name] = value
    return cls(**values)


def directory_problem(name: str, directory: Path, holds: str) -> str | None:
    """Why the flag `name` cannot give `directory` to write `holds` into: a file there or on its way; None if it can."""
    directory = Path(directory)
    if directory.is_symlink() and not directory.exists():
        return f"{name} {directory} is a link to nothing ({os.readlink(directory)}); name a directory for {holds}"
    there = next((path for path in (directory, *directory.parents) if path.exists()), None)
    if there is None or there.is_dir():  # None: a relative path whose first part is still to be made
        return None
    where = "is a file" if there == directory else f"is inside {there}, a file"
    return f"{name} {directory} {where}; name a directory for {holds}"
