"""What every job script does: run one `vitray` command with the job's arguments.

A job takes exactly its command's options, `--config YAML` included (keys are option
names; flags given override the file), so a job and the CLI cannot disagree.
"""
from __future__ import annotations

import sys
from typing import Sequence


def run(command: str, argv: Sequence[str] | None = None) -> int:
    """Run `vitray COMMAND` as a job's driver; the exit code is the job's."""
    from vitray.cli import main

    return main([command, *(sys.argv[1:] if argv is None else argv)])
