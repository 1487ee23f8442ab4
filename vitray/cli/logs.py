"""How a command speaks: vitray's lines on stderr, the libraries' only with --verbose, failures as one line."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def setup_logging(verbose: bool) -> None:
    """The one logging set-up: vitray's lines on stderr; the libraries' only with --verbose.

    Quiet, Ray and its workers keep their logs in Ray's log files (vitray.runtime), and the
    libraries' Python warnings (deprecations inside Ray, PyTorch, transformers) are not shown;
    vitray's own warnings and every error are.
    """
    import logging
    import warnings

    from vitray.runtime import VERBOSE_ENV

    os.environ[VERBOSE_ENV] = "1" if verbose else "0"  # Ray's workers and job drivers read it too
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter())
    handler.set_name("vitray")
    root = logging.getLogger()
    # Ours replaces ours (main may run more than once in a process); other handlers stay.
    root.handlers[:] = [h for h in root.handlers if h.get_name() != "vitray"] + [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("vitray").setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)
    if not verbose:
        for library in ("ray", "torch", "transformers", "peft", "pyarrow", "datasets", "huggingface_hub",
                        "accelerate", "tqdm"):
            warnings.filterwarnings("ignore", module=rf"{library}(\.|$)")


class LineFormatter:
    """INFO as the bare message; warnings and errors say so."""

    def format(self, record: Any) -> str:
        import logging

        text = record.getMessage()
        if record.exc_info and logging.getLogger().level <= logging.INFO:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        if record.levelno >= logging.WARNING:
            return f"vitray: {record.levelname.lower()}: {text}" if record.name.startswith("vitray") else \
                f"{record.name}: {record.levelname.lower()}: {text}"
        return text if record.name.startswith("vitray") else f"{record.name}: {text}"


def output_of(args: argparse.Namespace) -> str | None:
    return getattr(args, "output", None) or getattr(args, "out", None)


def failed(args: argparse.Namespace, exc: BaseException, line: str, code: int) -> int:
    """One line on stderr naming the log file that holds the traceback (also shown with --verbose)."""
    import traceback

    from vitray.faults import write_log

    output = output_of(args)
    log = write_log(output if isinstance(output, str) else None, args.command, exc)
    if getattr(args, "verbose", False):
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    where = f"; traceback in {log}" if log else ""
    sys.stderr.write(f"vitray: error: {line}{where}\n")
    return code
