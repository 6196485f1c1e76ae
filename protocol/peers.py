"""Sync protocol: peers (being written)."""
