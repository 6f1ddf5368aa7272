"""Config dataclasses as command-line options: every field becomes a flag showing its help text and its default.

    @dataclass
    class TrainConfig:
        max_iters: int = option(2000, "optimizer steps")

    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_options(parser.add_argument_group("training"), TrainConfig, defaults={"max_iters": 600})
    cfg = from_args(TrainConfig, parser.parse_args())

Every command line of the project is built this way, so a flag, its help and its default always match the library.
``run`` is what each command's ``__main__`` calls: a user's mistake (a bad value, a missing file) ends with one line
naming it, not a traceback (MINIGPT_DEBUG=1 shows the traceback), and Ctrl-C ends quietly.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

MISSING = dataclasses.MISSING


def option(default=MISSING, help: str = "", *, factory=None, choices=None):
    """A dataclass field with its command-line help (and optional choices); factory for a list default."""
    metadata = {"help": help, "choices": choices}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _base_type(annotation: str) -> tuple[str, bool]:
    """("int" | "float" | "str" | "bool" | "list[...]", optional) from an annotation string such as "float | None"."""
    parts = [p.strip() for p in str(annotation).split("|")]
    return next(p for p in parts if p != "None"), "None" in parts


def _parser_for(base: str, optional: bool):
    convert = {"int": int, "float": float, "str": str}
    if base.startswith("list"):
        item = int if "int" in base else str
        return lambda text: None if optional and text.lower() == "none" else [item(x) for x in text.split(",") if x]
    typ = convert[base]

    def parse(text):
        if optional and text.lower() == "none":
            return None
        return typ(text)

    parse.__name__ = base  # argparse names the type in its error messages
    return parse


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default is MISSING else f.default


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's line breaks and shows every option's default (unless its help says it)."""

    def _get_help_string(self, action):
        if "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_options(group, cls, defaults: dict | None = None, skip=(), prefix: str = "", helps: dict | None = None):
    """A flag --field-name for every field of the dataclass cls (except skip), its default from defaults or the
    field, its help from helps or the field. bool fields get --x / --no-x; lists are comma-separated; an optional
    field also takes "none". A default of argparse.SUPPRESS leaves the flag out of the parsed args unless given."""
    defaults, helps = defaults or {}, helps or {}
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        base, optional = _base_type(f.type)
        default = defaults.get(f.name, default_of(f))
        kwargs = {"default": default, "help": helps.get(f.name, f.metadata.get("help") or " "), "dest": prefix + f.name}
        flag = "--" + f.name.replace("_", "-")
        if base == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if base.startswith("list") and isinstance(default, list):
            kwargs["default"] = None if default is None else ",".join(map(str, default))
            kwargs["type"] = str  # parsed in from_args, so the shown default reads a,b,c
        else:
            kwargs["type"] = _parser_for(base, optional)
        if f.metadata.get("choices"):
            group.add_argument(flag, choices=f.metadata["choices"], **kwargs)
        else:
            group.add_argument(flag, metavar=f.name.upper(), **kwargs)


def from_args(cls, args, prefix: str = "", **overrides):
    """An instance of cls from the parsed flags add_options made (and overrides); its checks run as usual."""
    values = {}
    for f in dataclasses.fields(cls):
        if not f.init or not hasattr(args, prefix + f.name):
            continue
        value = getattr(args, prefix + f.name)
        base, optional = _base_type(f.type)
        if base.startswith("list") and isinstance(value, str):
            value = _parser_for(base, optional)(value)
        values[f.name] = value
    values.update(overrides)
    return cls(**values)


def parse(parser: argparse.ArgumentParser, argv=None):
    """parser.parse_args(argv), with ``args.given``: the dests the command line set explicitly, whatever the value
    (a flag given at its default value counts as given)."""
    args = parser.parse_args(argv)
    defaults = {a.dest: a.default for a in parser._actions}
    try:
        for a in parser._actions:
            a.default = argparse.SUPPRESS
        args.given = set(vars(parser.parse_args(argv)))
    finally:
        for a in parser._actions:
            a.default = defaults[a.dest]
    return args


def run(main) -> None:
    """Run a command's main(): a user error is one line on stderr and exit status 2; Ctrl-C exits with 130, saying
    how to continue when the loop saved a checkpoint first."""
    from .runs import Interrupted, resume_command

    try:
        main()
    except Interrupted as e:
        print(f"\n{e}; continue it with:\n  {resume_command()}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, RuntimeError,
            FloatingPointError, OSError) as e:
        if os.environ.get("MINIGPT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
