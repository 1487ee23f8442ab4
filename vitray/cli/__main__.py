"""`python -m vitray.cli` is `vitray`."""
from vitray.cli.main import run

run()
