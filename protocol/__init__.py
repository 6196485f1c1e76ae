"""Sync protocol (sans-I/O): wire messages, push and reconciliation sessions.

Pure like ``archipel.crdt``: no trio, sockets, time, random or logging.
Built by the sync-protocol issue.
"""
