"""Which configuration file ``policyd`` and ``policyctl`` read when none is named.

One lookup for both programs, so that ``policyctl`` with no options finds the admin socket of
the daemon that runs on this host: ``--config FILE`` if given, else ``$POLICYD_CONFIG`` if
set and not empty, else ``/etc/policyd/policyd.toml`` when that file exists (where the
operator guide and a Debian package install it), else none: the built-in defaults, which
work for a non-root user in a checkout (sockets and state under ``var/``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

#: Names the configuration file when ``--config`` is not given (e.g. set by an init script).
ENV_VAR: Final = "POLICYD_CONFIG"
#: The installed configuration (operator guide §1.3, the systemd unit's ``--config``). Read
#: through the module at each call, so a test can point it elsewhere.
SYSTEM_CONFIG = Path("/etc/policyd/policyd.toml")


@dataclass(frozen=True, slots=True)
class Choice:
    """The file to read (None: the built-in defaults) and how it was chosen, for messages."""

    path: str | None
    origin: str

    def describe(self) -> str:
        if self.path is None:
            return f"built-in defaults ({self.origin})"
        return f"{self.path} ({self.origin})"


def find(explicit: str | None, environ: Mapping[str, str] | None = None) -> Choice:
    """The configuration to use, by the rule in the module docstring."""
    if explicit:
        return Choice(explicit, "--config")
    env = os.environ if environ is None else environ
    named = env.get(ENV_VAR, "")
    if named:
        return Choice(named, f"${ENV_VAR}")
    if SYSTEM_CONFIG.exists():
        return Choice(str(SYSTEM_CONFIG), "installed default")
    return Choice(None, f"no --config, ${ENV_VAR} unset, no {SYSTEM_CONFIG}")
