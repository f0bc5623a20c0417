"""``python -m craft_cli``: the ``craft`` command."""

import sys

from .app import main

sys.exit(main())
