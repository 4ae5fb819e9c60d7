"""``python -m backpack``: the ``backpack`` command line."""

import sys

from .cli import main

sys.exit(main())
