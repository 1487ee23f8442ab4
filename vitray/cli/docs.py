"""The option tables of docs/cli.md, written from the commands' config dataclasses (`vitray.options`).

    python -m vitray.cli.docs [--check] [FILE ...]   (default: docs/cli.md, docs/pretrain.md)

Each table sits between `<!-- options: COMMAND -->` and `<!-- /options -->`; `--check` exits 1
when one differs from its config (the test suite runs it), without it the file is rewritten.
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Any

DOCS = ("docs/cli.md", "docs/pretrain.md")  # the files with option tables
MARKER = re.compile(r"(<!-- options: (?P<command>[a-z]+) -->\n)(?P<table>.*?)(<!-- /options -->)", re.S)


def configs() -> dict[str, tuple[Any, tuple[str, ...]]]:
    """Command → (its config dataclass, option fields its table leaves to the shared Ray options)."""
    from vitray.anomaly.config import AnomalyConfig
    from vitray.decisions.calibrate import CalibrateConfig
    from vitray.evaluate import EvaluateConfig
    from vitray.explain import ExplainConfig
    from vitray.export import ExportConfig
    from vitray.score.config import ScoreConfig
    from vitray.train.config import TrainConfig
    from vitray.train.pretrain import PretrainConfig

    return {"calibrate": (CalibrateConfig, ()), "anomaly": (AnomalyConfig, ()), "score": (ScoreConfig, ()),
            "explain": (ExplainConfig, ()), "export": (ExportConfig, ()), "train": (TrainConfig, ()),
            "evaluate": (EvaluateConfig, ()), "pretrain": (PretrainConfig, ())}


def tables(text: str) -> str:
    """`text` with every marked table written from its command's config."""
    from vitray.options import docs_rows

    known = configs()

    def table(match: re.Match) -> str:
        command = match.group("command")
        if command not in known:
            raise KeyError(f"docs/cli.md names options of an unknown command {command!r}")
        cls, skip = known[command]
        return match.group(1) + "\n".join(docs_rows(cls, skip)) + "\n" + match.group(4)

    return MARKER.sub(table, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=list(DOCS))
    parser.add_argument("--check", action="store_true", help="exit 1 when a table differs, write nothing")
    args = parser.parse_args(argv)
    differ = []
    for path in args.paths:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        written = tables(text)
        if written == text:
            continue
        differ.append(path)
        if not args.check:
            with open(path, "w", encoding="utf-8") as f:
                f.write(written)
    if args.check and differ:
        print(f"{', '.join(differ)}: option tables differ from the commands' options; run python -m vitray.cli.docs",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
