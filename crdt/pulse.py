"""Record kind: pulse (being written)."""
