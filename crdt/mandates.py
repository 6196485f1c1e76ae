"""Record kind: mandates (being written)."""
