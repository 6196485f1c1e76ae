"""Record kind: ledger (being written)."""
