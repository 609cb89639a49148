"""``python -m recscale``: the same as the ``recscale`` command."""

import sys

from recscale.cli import main

sys.exit(main())
