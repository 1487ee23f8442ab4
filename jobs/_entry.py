"""What every job script does: run one `vitray` command with the job's arguments.

A job takes its command's options plus `--config YAML`. Where the command reads
`--config` itself, the arguments pass through untouched; where it does not, the
YAML's keys become flags placed before the given ones, so that flags still win.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from vitray.errors import VitrayError


def command_parser(command: str) -> argparse.ArgumentParser:
    """The real CLI's parser of one command, so that a job accepts exactly what the CLI does."""
    from vitray.cli import build_parser

    parser = build_parser()
    # argparse keeps sub-commands in a private action; there is no public accessor.
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if command not in sub.choices:
        raise VitrayError(f"this vitray has no '{command}' command (vitray --help lists them)")
    return sub.choices[command]


def split_config(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """`--config PATH` (or `--config=PATH`) taken out of argv; the rest in order."""
    path, rest, items = None, [], iter(argv)
    for arg in items:
        if arg == "--config":
            path = next(items, None)
            if path is None:
                raise VitrayError("--config needs a YAML file")
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return path, rest


def config_flags(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """A YAML file of `option: value` as the flags the command's parser takes."""
    from vitray.cli import read_yaml_mapping

    values = read_yaml_mapping(path)
    options = parser._option_string_actions  # flag -> action; argparse offers no public view
    flags = {key: "--" + str(key).replace("_", "-") for key in values}
    unknown = sorted(str(key) for key, flag in flags.items() if flag not in options or flag == "--help")
    if unknown:
        raise VitrayError(f"{path}: unknown option(s) {', '.join(unknown)}")
    out: list[str] = []
    for key, value in values.items():
        flag = flags[key]
        if value is None:
            continue
        if options[flag].nargs == 0:  # a switch such as --verbose: present or not
            out += [flag] if value else []
        elif isinstance(value, list):
            out += [flag, *(str(v) for v in value)]
        else:
            out += [flag, str(value)]
    return out


def job_argv(command: str, argv: Sequence[str]) -> list[str]:
    """The `vitray` argv that runs `command` with a job's arguments."""
    parser = command_parser(command)
    if "--config" in parser._option_string_actions:
        return [command, *argv]
    path, rest = split_config(argv)
    return [command, *(config_flags(path, parser) if path else []), *rest]


def run(command: str, argv: Sequence[str] | None = None) -> int:
    """Run `vitray COMMAND` as a job's driver; the exit code is the job's."""
    from vitray.cli import main

    try:
        full = job_argv(command, sys.argv[1:] if argv is None else argv)
    except VitrayError as exc:
        sys.stderr.write(f"vitray: error: {exc}\n")
        return exc.exit_code
    return main(full)

