"""policyd: a fast, small policy daemon for Exim (greylisting, flood limits, SPF)."""

from __future__ import annotations

__version__ = "0.1.0"
