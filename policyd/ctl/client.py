"""The client side of the admin protocol (docs/admin.md): one connection to the admin
socket, one JSON line per request, and socket failures turned into policyctl's exit codes.
"""

from __future__ import annotations

import json
import socket
from typing import Any, Final, NoReturn

EXIT_OK: Final = 0
EXIT_DAEMON_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_NOT_RUNNING: Final = 3
EXIT_PERMISSION: Final = 4
#: Seconds to wait for the daemon's answer to one request.
DEFAULT_TIMEOUT: Final = 10.0
#: The longest answer line read (a listing of the whole whitelist fits with room to spare).
MAX_ANSWER: Final = 64 << 20


class CtlError(Exception):
    """Ends the command with ``code`` after printing the message."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def usage_error(message: str) -> NoReturn:
    raise CtlError(message, EXIT_USAGE)


class Session:
    """One connection to the admin socket, opened at the first request."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._reader: Any = None

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise CtlError(
                f"policyd is not running: cannot connect to the admin socket {self.path} "
                f"({exc.strerror})",
                EXIT_NOT_RUNNING,
            ) from None
        except PermissionError:
            sock.close()
            raise CtlError(
                f"permission denied on the admin socket {self.path}: run policyctl as the "
                "socket's owner or a member of its group ([admin] socket_group)",
                EXIT_PERMISSION,
            ) from None
        except TimeoutError:
            sock.close()
            raise CtlError(
                f"policyd is not answering on {self.path} (timeout {self.timeout:g}s)",
                EXIT_NOT_RUNNING,
            ) from None
        except OSError as exc:
            sock.close()
            raise CtlError(
                f"cannot connect to the admin socket {self.path}: {exc.strerror or exc}",
                EXIT_NOT_RUNNING,
            ) from None
        self._sock = sock
        self._reader = sock.makefile("rb")

    def call(self, command: str, **fields: Any) -> Any:
        """Send one request; the result, or CtlError with the daemon's message."""
        if self._sock is None:
            self._connect()
        assert self._sock is not None
        request = {"cmd": command, **{k: v for k, v in fields.items() if v is not None}}
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
            line = self._reader.readline(MAX_ANSWER)
        except TimeoutError:
            raise CtlError(
                f"policyd did not answer within {self.timeout:g}s", EXIT_DAEMON_ERROR
            ) from None
        except OSError as exc:
            raise CtlError(f"admin connection failed: {exc}", EXIT_DAEMON_ERROR) from None
        try:
            answer = json.loads(line)
        except ValueError:
            raise CtlError(
                "policyd closed the connection without a valid answer", EXIT_DAEMON_ERROR
            ) from None
        if not isinstance(answer, dict) or not answer.get("ok"):
            error = answer.get("error") if isinstance(answer, dict) else None
            raise CtlError(f"policyd: {error or 'request refused'}", EXIT_DAEMON_ERROR)
        return answer.get("result")

    def close(self) -> None:
        if self._sock is not None:
            self._reader.close()
            self._sock.close()
            self._sock = None
