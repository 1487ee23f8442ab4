"""What every command shares: the parser, option types, defaults from the config dataclasses, the summary."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from vitray.errors import VitrayError
from vitray.options import fraction, positive_int  # noqa: F401 - the option types every command module uses


class Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"vitray: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def ray_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster to join (default: $RAY_ADDRESS, else an embedded Ray)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own logs, and tracebacks of failures")
    parser.add_argument("--shared-fs", action="store_true", default=None,
                        help="a local output path is on a filesystem every Ray node mounts (on a cluster of "
                             "several nodes a local output is refused without it; use s3:// instead)")


def option_default(cls: Any, name: str) -> Any:
    """The one default of an option: the config dataclass's."""
    from dataclasses import MISSING, fields

    for f in fields(cls):
        if f.name == name:
            return None if f.default is MISSING else f.default
    raise KeyError(name)


def given(args: argparse.Namespace, names: Sequence[str], required: Sequence[str] = ()) -> dict[str, Any]:
    """The options among `names` that the command line or --config gave; each of `required` must be there."""
    values = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    for name in required:
        if not values.get(name):
            raise VitrayError(f"--{name.replace('_', '-')} is required (on the command line or in --config)")
    return values


def summary(headline: str, outputs: dict[str, str], next_command: str) -> str:
    """The closing lines of a command: what it did, where its outputs are, what a user runs next."""
    width = max(len(name) for name in outputs)
    return "\n".join([headline, *(f"  {name:<{width}}  {where}" for name, where in outputs.items()),
                      f"next: {next_command}"])
