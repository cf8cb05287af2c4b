"""``python -m policyd``: run the daemon."""

from __future__ import annotations

import sys

from .daemon import main

sys.exit(main())
