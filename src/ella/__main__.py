"""``python -m ella``: the ``ella`` command."""

import sys

from .cli import main

sys.exit(main())
