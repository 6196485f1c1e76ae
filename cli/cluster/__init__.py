"""``archipel cluster``: real daemons on loopback under faults (docs/cluster.md)."""
