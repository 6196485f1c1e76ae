"""Sync protocol: negentropy (being written)."""
