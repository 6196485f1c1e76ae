"""Record kind: aid (being written)."""
