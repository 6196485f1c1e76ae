"""Record kind: decisions (being written)."""
