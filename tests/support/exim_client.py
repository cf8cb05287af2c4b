"""An Exim-like client: one connection per question, the request written (in chunks if
asked), the write side shut down, the answer read until the daemon closes."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from .policyd_process import ANSWER_TIMEOUT

Address = str | tuple[str, int]


# --- the Exim-like client -------------------------------------------------------------------


class Question:
    """One connection driven step by step: connect, send (in chunks), then read the answer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    async def connect(cls, address: Address) -> Question:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def send(self, data: bytes, chunk: int | None = None) -> None:
        """Write ``data``; with ``chunk``, in pieces the server reads one at a time."""
        loop = asyncio.get_running_loop()
        step = chunk or max(1, len(data))
        for start in range(0, len(data), step):
            await loop.sock_sendall(self.sock, data[start : start + step])
            if chunk:
                # Two loop iterations: the server's read callback runs before the next piece.
                await asyncio.sleep(0)
                await asyncio.sleep(0)

    async def answer(self, *, half_close: bool = True) -> bytes:
        """Everything the server writes until it closes (after our half-close, if asked)."""
        loop = asyncio.get_running_loop()
        if half_close:
            self.sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while chunk := await loop.sock_recv(self.sock, 65536):
            received += chunk
        return bytes(received)

    def close(self) -> None:
        self.sock.close()


async def ask(
    address: Address,
    request: bytes,
    *,
    chunk: int | None = None,
    half_close: bool = True,
) -> bytes:
    """One question as Exim asks it; fails the test if the answer and the close do not come
    within ANSWER_TIMEOUT."""
    try:
        async with asyncio.timeout(ANSWER_TIMEOUT):
            question = await Question.connect(address)
            try:
                await question.send(request, chunk)
                return await question.answer(half_close=half_close)
            finally:
                question.close()
    except TimeoutError:
        pytest.fail(f"no answer (or no close) within {ANSWER_TIMEOUT}s for {request[:80]!r}")


def ask_blocking(address: Address, request: bytes, **kwargs: Any) -> bytes:
    """``ask`` for synchronous tests (the daemon runs in another process)."""
    return asyncio.run(ask(address, request, **kwargs))
