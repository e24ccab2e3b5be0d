"""``python -m v2p`` is the ``v2p`` command."""

import sys

from .cli import main

sys.exit(main())
