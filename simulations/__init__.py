"""Deterministic discrete-event simulator driving the real protocol objects.

Built by the simulator issue. May import ``archipel.protocol`` and ``archipel.crdt``,
never ``archipel.daemon``.
"""
