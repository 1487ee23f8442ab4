"""`python -m vitray.cli` is `vitray`."""
import sys

from vitray.cli.main import main

sys.exit(main())
