"""The `vitray` entry point: build the parser from each command's module, parse, run, and fail in one line."""
from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import Any, Callable, Sequence

from vitray import __version__
from vitray.cli.anomaly import add_anomaly
from vitray.cli.config import configurable, merge_config
from vitray.cli.data import add_synth
from vitray.cli.deciding import add_calibrate
from vitray.cli.deploy import add_export
from vitray.cli.logs import failed, output_of, setup_logging
from vitray.cli.options import Parser
from vitray.cli.pretraining import add_pretrain
from vitray.cli.scoring import add_explain, add_score
from vitray.cli.search import add_tune
from vitray.cli.training import add_evaluate, add_params, add_train
from vitray.errors import VitrayError
from vitray.interrupts import STOP_EXIT_CODES, handle_stop_signals, stop_exit_code, stopped
from vitray.interrupts import reset as reset_stops

COMMANDS: list[Callable[[Any], None]] = [add_synth, add_pretrain, add_train, add_evaluate, add_params,
                                           add_tune, add_calibrate, add_anomaly, add_score, add_explain,
                                           add_export]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="vitray", description="Train, tune and run Vision Transformers for "
                                                "visual inspection on Ray.")
    parser.add_argument("--version", action="version", version=f"vitray {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for add in COMMANDS:
        add(sub)
    for command in sub.choices.values():
        configurable(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Library chatter (download bars, load reports) is not progress; Ray's and ours are.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    try:
        args = parse(argv)
    except VitrayError as exc:
        sys.stderr.write(f"vitray: error: {exc}\n")
        return exc.exit_code
    setup_logging(args.verbose)
    try:
        if hasattr(args, "ray_address"):  # a malformed address is a usage error, before any work
            from vitray.runtime import ADDRESS_ENV, check_address

            check_address(args.ray_address) if args.ray_address else \
                check_address(os.environ.get(ADDRESS_ENV), f"${ADDRESS_ENV}")
    except VitrayError as exc:
        sys.stderr.write(f"vitray: error: {exc}\n")
        return exc.exit_code
    reset_stops()
    handle_stop_signals()  # SIGTERM and SIGHUP stop a run as Ctrl-C does
    try:
        return int(args.func(args) or 0)
    except VitrayError as exc:
        if exc.exit_code in STOP_EXIT_CODES:
            sys.stderr.write(f"vitray: {exc}\n")
            return exc.exit_code
        if exc.exit_code != 2 and exc.__cause__ is not None:  # a run that failed: keep its traceback
            return failed(args, exc, str(exc), exc.exit_code)
        sys.stderr.write(f"vitray: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"vitray: {stopped()}\n")
        return stop_exit_code()
    except Exception as exc:  # noqa: BLE001 - anything else is one line here, the traceback in a log
        from vitray.faults import describe

        return failed(args, exc, describe(exc, output_of(args) or "the run"), 1)


def run() -> None:
    """The `vitray` executable: `main`, then exit without the interpreter's last garbage collections.

    PyTorch, transformers and Ray leave millions of objects, and collecting them at exit took
    about a second of every command's time (docs/benchmarks.md). They are frozen out of the
    collector; the atexit handlers (Ray's shutdown among them) still run and the files still close.
    """
    code = main()
    gc.freeze()
    sys.exit(code)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (and its --config) as one Namespace; usage errors exit 2 with one line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return merge_config(subparser(parser, args.command), args)


def subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]
