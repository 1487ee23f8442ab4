"""The `vitray` command line: parse, check, call the library.

Every command checks its inputs before any work starts and reports problems as one
line `vitray: error: ...` (exit 2). Heavy imports happen inside commands so that
`vitray --help` answers at once. `main` builds the parser from one module per family
of commands (`data`, `training`, `search`, `scoring`); `config` reads `--config YAML`;
`logs` is how a command speaks and fails; `options` what they share.
"""
from vitray.cli.main import build_parser, main, parse

__all__ = ["build_parser", "main", "parse"]
