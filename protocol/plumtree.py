"""Sync protocol: plumtree (being written)."""
