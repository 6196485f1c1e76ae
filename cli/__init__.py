"""The ``archipel`` command line. Built by the RPC/CLI issue."""
