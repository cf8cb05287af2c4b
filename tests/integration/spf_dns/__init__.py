"""SPF through the real async DNS path (a loopback DNS server). Not named ``spf``: that would
shadow pyspf's module of the same name once this folder's parent is on sys.path."""
