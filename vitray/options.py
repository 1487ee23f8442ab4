"""One typed source per command option: a config dataclass field whose metadata says how it reads.

A command's config dataclass (e.g. `vitray.score.ScoreConfig`) declares each option once:

    batch_size: int = option(256, "images per model call", parse=positive_int, metavar="N")

and from those fields come its flags (`add_options`), the config built from parsed flags
(`config_from`), `--config YAML` typing (the flags' own parsers, `vitray.cli.config`) and the
option table of docs/cli.md (`docs_rows`; a test holds the docs to them, `python -m
vitray.cli.docs` writes them). Pure Python: building a parser imports neither torch nor Ray.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import MISSING, dataclass
from typing import Any, Callable, Sequence


@dataclass(frozen=True)
class Option:
    """How one config field reads on the command line and in the docs."""

    help: str  # the --help line (the default is added)
    doc: str | None = None  # the docs table's text, when longer than the help
    parse: Callable[[str], Any] | None = None  # the flag's argparse type (default: from the default's type)
    choices: Sequence[Any] | None = None
    metavar: str | None = None
    required: bool = False  # on the command line or in --config
    default_text: str | None = None  # how docs and --help show the default, when not its value


def option(default: Any = MISSING, help: str = "", *, doc: str | None = None, parse: Callable[[str], Any] | None = None,
           choices: Sequence[Any] | None = None, metavar: str | None = None, required: bool = False,
           default_text: str | None = None) -> Any:
    """A config field that is also a command option (see the module docstring)."""
    meta = {"option": Option(help, doc, parse, tuple(choices) if choices is not None else None, metavar, required,
                             default_text)}
    return dataclasses.field(metadata=meta) if default is MISSING else dataclasses.field(default=default,
                                                                                          metadata=meta)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def options_of(cls: Any) -> list[tuple[dataclasses.Field, Option]]:
    """The fields of a config dataclass that are command options, in declaration order."""
    return [(f, f.metadata["option"]) for f in dataclasses.fields(cls) if "option" in f.metadata]


def flag(f: dataclasses.Field) -> str:
    return "--" + f.name.replace("_", "-")


def default_of(f: dataclasses.Field) -> Any:
    return None if f.default is MISSING else f.default


def _parse(f: dataclasses.Field, o: Option) -> Callable[[str], Any] | None:
    if o.parse is not None or o.choices is not None:
        return o.parse
    default = default_of(f)
    return type(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else None


def _shown_default(f: dataclasses.Field, o: Option) -> str | None:
    if o.default_text is not None:
        return o.default_text
    default = default_of(f)
    return None if default is None or isinstance(default, bool) or o.required else str(default)


def add_options(parser: argparse.ArgumentParser, cls: Any, skip: Sequence[str] = (),
                only: Sequence[str] | None = None) -> None:
    """One flag per option field of `cls` (a bool field is a switch), its default the field's; `skip`
    leaves some out, `only` takes just those."""
    for f, o in options_of(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        shown = _shown_default(f, o)
        help_text = o.help + (f" (default {shown})" if shown is not None else "")
        if isinstance(default_of(f), bool):
            parser.add_argument(flag(f), action="store_true", default=default_of(f), help=help_text)
            continue
        parser.add_argument(flag(f), type=_parse(f, o), choices=o.choices, default=default_of(f),
                            metavar=o.metavar, required=o.required, help=help_text)


def config_from(cls: Any, args: argparse.Namespace, **extra: Any) -> Any:
    """The config of parsed flags: each option field from `args`, the rest from `extra` or their defaults."""
    values = {f.name: getattr(args, f.name) for f, _ in options_of(cls) if hasattr(args, f.name)}
    return cls(**{**values, **extra})


def docs_rows(cls: Any, skip: Sequence[str] = ()) -> list[str]:
    """The option table of docs/cli.md for `cls`: `| flag | default | meaning |` rows."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for f, o in options_of(cls):
        if f.name in skip:
            continue
        name = flag(f) + (f" {o.metavar}" if o.metavar else "")
        shown = _shown_default(f, o)
        default = ("(required)" if o.required else "off" if default_of(f) is False else "—" if shown is None
                   else f"`{shown}`" if o.choices and o.default_text is None else shown)
        rows.append(f"| `{name}` | {default} | {o.doc or o.help} |")
    return rows
