"""The daemon's administrative side: the admin socket and its commands (``server``), and
``explain``, the dispatcher run over a read-only view of the store."""
