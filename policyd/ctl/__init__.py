"""``policyctl``: the command line (``main``), its commands (``commands``), the admin-socket
client (``client``), whitelist importers (``importers``) and the Exim hook (``exim``)."""
