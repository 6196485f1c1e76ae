"""Sync protocol: wire (being written)."""
