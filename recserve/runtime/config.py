"""Command lines generated from a process's config dataclass, so defaults live in one place.

A daemon's config is a frozen dataclass (nested dataclasses for the settings it hands to its
parts) that validates itself in ``__post_init__``. Each field declared with :func:`option`
becomes a flag named after the field (``max_batch_samples`` -> ``--max-batch-samples``) with
the field's default and help; :func:`from_args` builds the config back from the parsed
arguments. A field declared with plain ``field()`` or a default is left to ``main``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from recserve.contracts.errors import RecserveError

T = TypeVar("T")
_KEY = "recserve.option"


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
) -> Any:
    """A config field that is also a command-line flag; ``parse`` turns the flag's text into
    the field's value (a ``RecserveError`` it raises is a usage error naming the flag)."""
    meta = {_KEY: {"help": help, "parse": parse, "metavar": metavar}}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed")
    return dataclasses.field(default=default, metadata=meta)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser | Any, cls: type) -> None:
    """Add a flag for every :func:`option` field of ``cls`` and its nested dataclasses."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            add_arguments(parser, kind)  # type: ignore[arg-type]
            continue
        meta = f.metadata.get(_KEY)
        if meta is None:
            continue
        kwargs: dict[str, Any] = {"help": _help(meta["help"], f.default), "dest": f.name}
        base = _base(kind)
        if base is bool:
            kwargs["action"] = (
                "store_true" if f.default is False else argparse.BooleanOptionalAction
            )
            kwargs["default"] = f.default
        else:
            kwargs["type"] = _converter(meta["parse"] or base, f.name)
            if f.default is dataclasses.MISSING:
                kwargs["required"] = True
            else:
                kwargs["default"] = f.default
            if meta["metavar"]:
                kwargs["metavar"] = meta["metavar"]
        parser.add_argument(flag(f.name), **kwargs)


def from_args(cls: type[T], args: argparse.Namespace, **given: Any) -> T:
    """An instance of ``cls`` from parsed arguments; ``given`` sets fields ``main`` decides
    (and fields of nested dataclasses are found by name in ``args``)."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind = hints[f.name]
        if f.name in given:
            values[f.name] = given[f.name]
        elif dataclasses.is_dataclass(kind):
            values[f.name] = from_args(kind, args)  # type: ignore[arg-type]
        elif f.metadata.get(_KEY) is not None and hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    return cls(**values)


def _base(kind: Any) -> Any:
    """``X`` of ``X | None``."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return kind if kind in (int, float, str, bool, Path) else str


def _converter(fn: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return fn(text)
        except RecserveError as exc:
            raise argparse.ArgumentTypeError(exc.message) from None

    convert.__name__ = getattr(fn, "__name__", name)  # argparse names it in errors
    return convert


def _help(text: str, default: Any) -> str:
    if default is dataclasses.MISSING or default is None or isinstance(default, bool):
        return text
    return f"{text} (default: {default})" if text else f"default: {default}"
