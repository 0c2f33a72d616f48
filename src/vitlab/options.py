"""Command-line options derived from config dataclass fields, typed by their annotations.

``add_options(parser, ViTConfig)`` adds ``--drop-path FLOAT``, ``--pool {token,gap}``,
``--class-token/--no-class-token``, ``--mean F F F`` ... Options default to "not given"
(``argparse.SUPPRESS``), so the parsed namespace holds exactly the overrides a user typed.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from typing import Any, Literal, Union


class _Tuple(argparse.Action):
    """Store ``nargs`` values as a tuple (``int | tuple[int, int]``: one value stays an int)."""

    def __init__(self, *args: Any, scalar_ok: bool = False, sizes: tuple[int, ...] = (), **kwargs: Any) -> None:
        self.scalar_ok, self.sizes = scalar_ok, sizes
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        if self.sizes and len(values) not in self.sizes:
            parser.error(f"{option_string} takes {' or '.join(map(str, self.sizes))} values, got {len(values)}")
        setattr(namespace, self.dest, values[0] if self.scalar_ok and len(values) == 1 else tuple(values))


def _none_or(cast: Any) -> Any:
    def convert(text: str) -> Any:
        return None if text.lower() == "none" else cast(text)
    convert.__name__ = getattr(cast, "__name__", "value")  # argparse names the type in errors
    return convert


def option_kwargs(hint: Any) -> dict[str, Any] | None:
    """``add_argument`` keywords for a field annotation; None for types with no option (configs, dicts)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:  # X | None
            kw = option_kwargs(rest[0])
            if kw is None or "nargs" in kw or "action" in kw:
                return kw
            return {**kw, "type": _none_or(kw["type"])}
        scalars = [a for a in rest if a in (int, float, str)]
        tuples = [a for a in rest if typing.get_origin(a) is tuple]
        if len(scalars) == 1 and len(tuples) == 1:  # e.g. int | tuple[int, int]
            size = len(typing.get_args(tuples[0]))
            return {"type": scalars[0], "nargs": "+", "action": _Tuple, "scalar_ok": True, "sizes": (1, size),
                    "metavar": scalars[0].__name__.upper()}
        return None
    if origin is Literal:
        return {"type": type(args[0]), "choices": list(args)}
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:  # no values: the empty tuple (``--conv-stem`` alone: none)
            return {"type": args[0], "nargs": "*", "action": _Tuple, "metavar": args[0].__name__.upper()}
        if len(set(args)) == 1 and args[0] in (int, float, str):
            return {"type": args[0], "nargs": len(args), "action": _Tuple, "metavar": args[0].__name__.upper()}
        return None
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if hint in (int, float, str):
        return {"type": hint, "metavar": hint.__name__.upper()}
    return None


def field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field in the class source: the options' help text."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found = (re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line) for line in source.splitlines())
    return {m.group(1): m.group(2).strip() for m in found if m}


def flag(name: str) -> str:
    """The option spelling of a field name: ``drop_path`` -> ``--drop-path``."""
    return "--" + name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser | Any, cls: type, *, exclude: tuple[str, ...] = (),
                rename: dict[str, str] | None = None, defaults: Any = None, show_defaults: bool = True) -> list[str]:
    """Add one option per field of the dataclass ``cls``; returns the field names added.

    ``show_defaults=False`` leaves defaults out of the help (model fields: the chosen preset decides them).
    """
    rename = rename or {}
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    added = []
    for f in dataclasses.fields(cls):
        kwargs = option_kwargs(hints[f.name])
        if kwargs is None or f.name in exclude:
            continue
        default = getattr(defaults, f.name, f.default)
        shown = "" if default in (dataclasses.MISSING, "", None) or not show_defaults else f" (default: {default})"
        text = comments.get(f.name, f"{cls.__name__}.{f.name}")
        parser.add_argument(flag(rename.get(f.name, f.name)), dest=f.name, default=argparse.SUPPRESS,
                            help=f"{text}{shown}".replace("%", "%%"), **kwargs)
        added.append(f.name)
    return added
