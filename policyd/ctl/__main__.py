"""``python3 -m policyd.ctl``: the same as ``policyctl``."""

from .main import main

raise SystemExit(main())
