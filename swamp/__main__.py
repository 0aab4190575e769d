"""``python -m swamp`` is the ``swamp`` command."""
import sys

from swamp.cli import main

sys.exit(main())
