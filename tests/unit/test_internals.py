"""Canaries: one test per private internal of another library that policyd relies on.

Each names the internal and the module that needs it, so that a dependency upgrade that
removes or renames it fails here with that name, instead of somewhere deep in a store or
resolver test (docs/decisions.md, "Private internals"). The locks pin what CI installs; a
bump (`make lock`) that breaks one of these says exactly what to rework.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import sys

import pytest


def test_task_takes_over_a_coroutine_stepped_by_hand() -> None:
    """policyd/server.py runs a question's first step in the read callback
    (``coroutine.send(None)``) and, when it suspended, hands the rest to a Task through
    ``_Resumed``, whose first yield is the future the coroutine suspended on. That relies on
    asyncio's Task waiting on a future yielded to it that ``Future.__await__`` marked as
    awaited (no policyd code reads or writes that mark), and on bare yields as usual."""
    from policyd.server import _Resumed

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        first: asyncio.Future[bytes] = loop.create_future()

        async def question() -> bytes:
            part = await first
            await asyncio.sleep(0)  # a bare yield, handled by the Task
            return part + b" answered"

        answering = question()
        rest = _Resumed(answering, answering.send(None))

        async def run() -> bytes:
            return await rest

        task = loop.create_task(run())
        await asyncio.sleep(0)
        assert rest.started and not task.done(), "the Task waits on the re-yielded future"
        first.set_result(b"ok")
        assert await asyncio.wait_for(task, 1.0) == b"ok answered"

    asyncio.run(scenario())


def test_hiredis_reader_options() -> None:
    """policyd/stores/redis_wire.py parses replies with hiredis' public ``Reader``, given a
    function (not a class) as ``replyError`` and a sentinel as ``notEnoughData``: both
    documented options, checked here because the store's wire stands on them."""
    hiredis = importlib.import_module("hiredis")
    sentinel = object()

    def as_error(text: str) -> Exception:  # a function, as policyd's error_reply is
        return KeyError(text)

    reader = hiredis.Reader(replyError=as_error, notEnoughData=sentinel)
    assert reader.gets() is sentinel
    reader.feed(b"-ERR x\r\n:1\r\n$-1\r\n")
    error = reader.gets()
    assert isinstance(error, KeyError) and error.args == ("ERR x",)
    assert reader.gets() == 1
    assert reader.gets() is None  # a nil reply, told from "not enough data"
    assert reader.gets() is sentinel


def test_pycares_cffi_layer() -> None:
    """policyd/dns.py switches off the c-ares query cache by building a channel through
    pycares' private cffi layer (``pycares._ffi``, ``pycares._lib``) and swapping it into
    ``aiodns.DNSResolver._channel`` (``Channel._channel`` under ``Channel._lock``)."""
    pycares = importlib.import_module("pycares")
    ffi, lib = pycares._ffi, pycares._lib
    for name in (
        "ares_init_options",
        "ares_destroy",
        "ARES_SUCCESS",
        "ARES_EVSYS_DEFAULT",
        "ARES_OPT_TIMEOUTMS",
        "ARES_OPT_TRIES",
        "ARES_OPT_EVENT_THREAD",
    ):
        assert hasattr(lib, name), f"pycares._lib.{name}"
    options = ffi.new("struct ares_options *")
    for field in ("timeout", "tries", "qcache_max_ttl", "evsys"):
        assert hasattr(options, field), f"struct ares_options.{field} in pycares._ffi"


def test_aiodns_resolver_channel() -> None:
    """policyd/dns.py: ``aiodns.DNSResolver._channel`` (a pycares Channel with ``_channel``
    and ``_lock``) and ``DNSResolver._event_thread``."""
    aiodns = importlib.import_module("aiodns")

    async def build() -> None:
        resolver = aiodns.DNSResolver(nameservers=["127.0.0.1"])
        try:
            assert getattr(resolver, "_event_thread", False), "aiodns DNSResolver._event_thread"
            channel = resolver._channel
            assert hasattr(channel, "_channel"), "pycares Channel._channel"
            assert hasattr(channel, "_lock"), "pycares Channel._lock"
        finally:
            await resolver.close()

    asyncio.run(build())


def test_pyspf_dns_driver_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """policyd/checks/spf_eval.py hides ``dns`` (dnspython) from pyspf's import so that it
    takes py3dns (``DNS``): pyspf must still import when ``import dns`` fails."""
    for name in [m for m in sys.modules if m == "spf" or m == "dns" or m.startswith("dns.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "dns", None)
    spf = importlib.import_module("spf")
    assert "DNS" in sys.modules, "pyspf imports py3dns when dnspython is hidden"
    for name in ("query", "TempError", "PermError", "MAX_VOID_LOOKUPS"):
        assert hasattr(spf, name), f"spf.{name}"


def test_pyspf_query_methods_overridden() -> None:
    """policyd/checks/spf_eval.py subclasses ``spf.query`` and replaces its DNS methods; the
    names it overrides and the attributes it reads must still be pyspf's."""
    spf = importlib.import_module("spf")
    for name in ("dns", "dns_mx", "dns_a", "dns_ptr", "validated_ptrs", "cidrmatch", "check"):
        assert callable(getattr(spf.query, name, None)), f"spf.query.{name}"
    query = spf.query(i="192.0.2.1", s="a@example.org", h="mx.example.org", strict=True)
    for name in ("void_lookups", "A", "i", "cidrmax"):
        assert hasattr(query, name), f"spf.query().{name}"
    # Set by check() to the mechanism that matched; read after the evaluation.
    assert "self.mechanism = " in inspect.getsource(spf.query), "spf.query.mechanism"


def test_re_parser_parse_tree() -> None:
    """policyd/host_patterns.py compiles whitelist host patterns from the parse tree of the private
    ``re._parser.parse`` (opcodes from ``re._constants``) into a linear-time automaton."""
    parser = importlib.import_module("re._parser")
    constants = importlib.import_module("re._constants")
    parsed = parser.parse(r"^a[0-9]+(b|c)*$", 0)
    ops = [op for op, _ in parsed]
    assert ops == [
        constants.AT,
        constants.LITERAL,
        constants.MAX_REPEAT,
        constants.MAX_REPEAT,
        constants.AT,
    ], "re._parser.parse() items are (opcode, argument)"
    assert hasattr(parsed, "state") and hasattr(parsed.state, "flags")
    for name in ("GROUPREF", "ASSERT", "ATOMIC_GROUP", "POSSESSIVE_REPEAT", "MAXREPEAT"):
        assert hasattr(constants, name), f"re._constants.{name}"


def test_argparse_parser_structure() -> None:
    """policyd/manpages.py lists options and sub-commands through argparse's private
    ``ArgumentParser._actions``, ``_SubParsersAction`` (``choices``, ``_choices_actions``)
    and ``_HelpAction``: argparse has no public API for walking a parser."""
    import argparse

    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--flag", help="a flag")
    subs = parser.add_subparsers(dest="command")
    subs.add_parser("run", help="run it")
    kinds = [type(a) for a in parser._actions]
    assert argparse._HelpAction in kinds and argparse._SubParsersAction in kinds
    (sub_action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert list(sub_action.choices) == ["run"]
    assert [(c.dest, c.help) for c in sub_action._choices_actions] == [("run", "run it")]
