"""Record kind: alerts (being written)."""
