"""Record kind: lots (being written)."""
