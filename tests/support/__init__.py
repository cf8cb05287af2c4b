"""What the tests share: real servers they start (``redis_server``, ``dns_server``), the
daemon as a process (``policyd_process``), an Exim-like client (``exim_client``), and strict
header grammars (``header_grammar``). Imported as ``support.*`` (tests/ is on sys.path)."""
