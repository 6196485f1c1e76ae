"""Record kind: councils (being written)."""
