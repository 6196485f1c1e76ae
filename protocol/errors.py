"""Sync protocol: errors (being written)."""
