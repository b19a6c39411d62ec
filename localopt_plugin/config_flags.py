"""Flags generated from config fields: each flag's name, default, help and rule in one place.

A component's configuration is a frozen dataclass that derives from :class:`FlagConfig` and
declares each of its flags as a field with :func:`option` (the help text, and what argparse
needs beyond the default: choices, a type where the default is None). ``add_args`` turns the
fields into an argument group, ``from_args`` turns parsed flags back into the config and runs its
``validate()``, ``flag`` names a field's flag in messages: in the spirit of Megatron-Core's
``ArgumentGroupFactory``, which generates its flags from its config dataclasses. A field's flag
is the class's ``PREFIX`` followed by the field name in dashes, unless the field names its own.
Fields declared without :func:`option` are not flags (e.g. Megatron's own ``--data-path``,
which a config's ``from_args`` passes in).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable
from typing import Any, ClassVar, Self


def option(default: Any, help: str, *, flag: str | None = None,
           choices: Iterable[Any] | None = None, type: Any = None,
           nargs: str | None = None, group: str | None = None) -> Any:
    """A config field that is also a flag (see the module docstring). A ``False`` default makes
    a switch (``store_true``); ``nargs`` a list, kept as a tuple in the config; ``group``: a
    --help section other than the class's."""
    return dataclasses.field(default=default, metadata={
        "help": help, "flag": flag, "choices": tuple(choices) if choices else None,
        "type": type, "nargs": nargs, "group": group})


class FlagConfig:
    """Base of the configs whose fields are flags (frozen dataclasses)."""

    PREFIX: ClassVar[str] = "--"  # a field's flag: PREFIX + its name in dashes
    GROUP: ClassVar[str] = ""  # the --help section
    # flags the config's from_args reads that are no field (Megatron's switches and aliases):
    # (--help section or None for GROUP, the flag's names, argparse options)
    EXTRA_FLAGS: ClassVar[tuple[tuple[str | None, tuple[str, ...], dict], ...]] = ()

    @classmethod
    def flag_fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if "help" in f.metadata]

    @classmethod
    def flag(cls, name: str) -> str:
        """The flag of field ``name``: its own, or the declaring class's prefix + its name."""
        field = next((f for f in cls.flag_fields() if f.name == name), None)
        if field is None:
            raise KeyError(f"{cls.__name__} has no flag field {name!r}")
        declaring = next(k for k in cls.__mro__ if name in vars(k).get("__annotations__", {}))
        return field.metadata["flag"] or declaring.PREFIX + name.replace("_", "-")

    @classmethod
    def dest(cls, name: str) -> str:
        """Where argparse keeps the flag of field ``name``."""
        return cls.flag(name)[2:].replace("-", "_")

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser,
                 only: Iterable[str] | None = None) -> None:
        """The fields' flags (``only``: some of them, e.g. for a bench) and, without ``only``,
        the ``EXTRA_FLAGS``, each in the group of the class that declares it; a field's flag the
        parser has already (a parent config's, added for another component) is not added
        again."""
        for klass in reversed(cls.__mro__):
            declared = vars(klass).get("__annotations__", {})
            fields = [f for f in cls.flag_fields() if f.name in declared
                      and (only is None or f.name in only)
                      and cls.flag(f.name) not in parser._option_string_actions]
            for field in fields:
                group = argument_group(parser, field.metadata["group"] or klass.GROUP)
                group.add_argument(cls.flag(field.name), **_argparse_options(field))
            for title, names, options in vars(klass).get("EXTRA_FLAGS", ()) if only is None else ():
                argument_group(parser, title or klass.GROUP).add_argument(*names, **options)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **values: Any) -> Self:
        """The config from parsed flags, validated; ``values`` give the fields that are not
        flags. A flag the parser did not declare (a bench declaring ``only`` some) keeps its
        field's default."""
        for field in cls.flag_fields():
            if field.name not in values and hasattr(args, cls.dest(field.name)):
                values[field.name] = getattr(args, cls.dest(field.name))
        config = cls(**{name: tuple(value) if isinstance(value, list) else value
                        for name, value in values.items()})
        config.validate()
        return config

    def validate(self) -> None:
        """Raises :class:`~localopt_plugin.errors.UserError` naming the flag of a bad value."""

    def flags(self) -> list[str]:
        """These settings as the flags that give them (e.g. for a child process): a switch
        only when on, a list as its items, an unset (None) setting not at all."""
        argv: list[str] = []
        for field in self.flag_fields():
            value = getattr(self, field.name)
            if value is None or value is False:
                continue
            argv.append(self.flag(field.name))
            if value is not True:
                argv += [str(v) for v in value] if isinstance(value, tuple) else [str(value)]
        return argv

    @classmethod
    def changed_fields(cls, args: argparse.Namespace, given: set[str] | None) -> list[str]:
        """This config's flag fields that were given (``given``: the dests on the command
        line) or, without that list, hold another value than their default in ``args``."""
        if given is not None:
            return [f.name for f in cls.flag_fields() if cls.dest(f.name) in given]
        return [f.name for f in cls.flag_fields() if hasattr(args, cls.dest(f.name))
                and getattr(args, cls.dest(f.name)) != f.default]


def argument_group(parser: argparse.ArgumentParser, title: str) -> argparse._ArgumentGroup:
    """The parser's --help section ``title``, made on first use."""
    for group in parser._action_groups:
        if group.title == title:
            return group
    return parser.add_argument_group(title)


def _argparse_options(field: dataclasses.Field) -> dict[str, Any]:
    meta, default = field.metadata, field.default
    help_text = meta["help"].replace("%", "%%")
    if default is False:
        return {"action": "store_true", "help": help_text}
    if default is not None:
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        help_text += f" (default: {shown})"
    kind = meta["type"] or (type(default) if default is not None else str)
    if meta["nargs"]:
        kind = meta["type"] or (type(default[0]) if default else str)
        default = list(default) if default is not None else None
    return {"type": kind, "default": default, "choices": meta["choices"],
            "nargs": meta["nargs"], "help": help_text}
