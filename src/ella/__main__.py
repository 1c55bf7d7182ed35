"""``python -m ella``: the ``ella`` command (``ella bench`` runs each run this way, in its own process)."""

import sys

from .cli import main

sys.exit(main())
