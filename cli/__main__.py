"""``python -m craft_cli``: the ``craft`` command."""

import sys

from .main import main

sys.exit(main())
