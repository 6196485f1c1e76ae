"""Sync protocol: session (being written)."""
