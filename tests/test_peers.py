"""Peer selection (protocol/peers.py): the overlay forms, stays symmetric and
connected, refills after failures, and every view and input is bounded.

The N-node tests run the real :class:`PeerSelection` objects on the
in-memory network of ``gossipnet.py`` (50 ms links, failures noticed after 1 s).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from gossipnet import PeerNet, connected, index_of, node_id, peer_info
from hypothesis import given
from hypothesis import strategies as st

from archipel.protocol.errors import LocalProtocolError, RemoteProtocolError
from archipel.protocol.messages import (
    Disconnect,
    ForwardJoin,
    Join,
    Message,
    Neighbor,
    NeighborReply,
    PeerInfo,
    Prune,
    Shuffle,
    ShuffleReply,
)
from archipel.protocol.peers import (
    TRANSITIONS,
    Close,
    Connect,
    LinkState,
    NeighborDown,
    NeighborUp,
    PeerLimits,
    PeerSelection,
    Send,
)

LIMITS = PeerLimits()


def check_views(net: PeerNet) -> None:
    """Bounded views, never self, never a peer in both views, only allowed peers."""
    for node in net.live():
        active, passive = node.selection.active, node.selection.passive
        me = node_id(node.index)
        assert len(active) <= LIMITS.active_size
        assert len(passive) <= LIMITS.passive_size
        assert me not in active
        assert me not in passive
        assert not set(active) & set(passive)
        assert all(info.id == peer for peer, info in (*active.items(), *passive.items()))


def check_symmetric(net: PeerNet) -> None:
    edges = set(net.active_edges())
    assert {(b, a) for a, b in edges} == edges


def grow(n: int, seed: int, contacts: int = 3) -> PeerNet:
    """``n`` nodes join one after the other, each through one of the first few."""
    net = PeerNet(n, seed=seed)
    for i in range(1, n):
        net.join_at(i * 200, i, random.Random(seed + i).randrange(min(i, contacts)))
    net.quiesce(200 * n + 4 * LIMITS.shuffle_interval_ms)
    return net


def resume(net: PeerNet) -> None:
    """Start the timers again after :meth:`PeerNet.quiesce`."""
    net.frozen = False
    for node in net.live():
        node.timer_at = None
        net._arm(node)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fifty_nodes_form_a_connected_symmetric_bounded_overlay(seed: int) -> None:
    net = grow(50, seed)
    check_views(net)
    check_symmetric(net)
    edges = net.active_edges()
    assert connected(range(50), edges)
    sizes = [len(node.selection.active) for node in net.nodes]
    assert min(sizes) >= 2
    assert sum(sizes) / len(sizes) >= 4.5  # views are close to full, not just non-empty
    assert sum(len(node.selection.passive) for node in net.nodes) / 50 >= 20  # shuffles spread
    assert net.errors == []
    assert net.lost_sends == 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_after_killing_thirty_percent_the_survivors_refill_and_stay_connected(seed: int) -> None:
    net = grow(50, seed)
    resume(net)
    victims = set(random.Random(seed).sample(range(50), 15))
    for victim in sorted(victims):
        net.kill(victim)
    net.quiesce(net.loop.now + 3 * LIMITS.shuffle_interval_ms)
    check_views(net)
    check_symmetric(net)
    edges = net.active_edges()
    assert not [edge for edge in edges if edge[1] in victims]
    survivors = [node.index for node in net.live()]
    assert connected(survivors, edges)
    sizes = [len(node.selection.active) for node in net.live()]
    assert min(sizes) >= 2
    assert sum(sizes) / len(sizes) >= 4.5
    failures = sum(node.selection.counters.failures for node in net.live())
    assert failures >= 15  # the dead were active somewhere, and were replaced
    assert net.errors == []


@given(
    n=st.integers(2, 14),
    order=st.randoms(use_true_random=False),
    kills=st.lists(st.tuples(st.integers(0, 13), st.integers(0, 60_000)), max_size=6),
    seed=st.integers(0, 1_000),
)
def test_random_joins_and_failures_keep_views_bounded(
    n: int, order: random.Random, kills: list[tuple[int, int]], seed: int
) -> None:
    net = PeerNet(n, seed=seed)
    joiners = list(range(1, n))
    order.shuffle(joiners)
    for k, index in enumerate(joiners):
        net.join_at(k * order.randrange(1, 400), index, order.choice([0, *joiners[:k]]))
    for index, time in kills:
        if index % n:
            net.loop.at(time, lambda index=index % n: net.kill(index))  # type: ignore[misc]
    for until in range(10_000, 130_001, 10_000):
        net.loop.run(until)
        check_views(net)
    net.quiesce(net.loop.now)
    check_views(net)
    check_symmetric(net)
    assert net.errors == []


# -- single node ----------------------------------------------------------------------


ME, A, B, C = (peer_info(n) for n in range(4))


def selection(limits: PeerLimits = LIMITS, **kwargs: object) -> PeerSelection:
    return PeerSelection(ME, random.Random(0), 0, limits=limits, **kwargs)  # type: ignore[arg-type]


def with_active(*peers: PeerInfo, limits: PeerLimits = LIMITS) -> PeerSelection:
    ps = selection(limits)
    for info in peers:
        ps.receive(info.id, Neighbor(info, high_priority=True), 0)
    return ps


def sends(actions: Sequence[object]) -> list[tuple[bytes, Message]]:
    return [(a.peer, a.message) for a in actions if isinstance(a, Send)]


def test_the_transition_table_misses_only_unsolicited_replies() -> None:
    membership = {Join, ForwardJoin, Neighbor, NeighborReply, Disconnect, Shuffle, ShuffleReply}
    missing = {(s, m) for s in LinkState for m in membership} - set(TRANSITIONS)
    assert missing == {(LinkState.DIALING, NeighborReply), (LinkState.OPEN, NeighborReply)}
    ps = selection()
    with pytest.raises(RemoteProtocolError, match="NeighborReply is not expected"):
        ps.receive(A.id, NeighborReply(True), 0)


def test_join_goes_through_the_contact_and_walks_on() -> None:
    newcomer = selection()
    assert newcomer.join(A, 0) == [Connect(A)]
    actions = newcomer.connected(A.id, 50)
    assert actions == [NeighborUp(A), Send(A.id, Join(ME))]
    assert set(newcomer.active) == {A.id}
    contact = with_active(B, C)
    actions = contact.receive(ME.id, Join(ME), 0)
    assert NeighborUp(ME) in actions
    assert sorted(sends(actions)) == [(B.id, ForwardJoin(ME, LIMITS.arwl)),
                                      (C.id, ForwardJoin(ME, LIMITS.arwl))]  # fmt: skip


def test_a_forward_join_ends_in_a_high_priority_neighbor_request() -> None:
    ps = with_active(A)  # a single active peer: the walk ends here
    assert ps.receive(A.id, ForwardJoin(B, 5), 0) == [Connect(B)]
    assert sends(ps.connected(B.id, 10)) == [(B.id, Neighbor(ME, high_priority=True))]
    assert ps.receive(B.id, NeighborReply(True), 20) == [NeighborUp(B)]
    assert set(ps.active) == {A.id, B.id}


def test_a_forward_join_at_prwl_lands_in_the_passive_view_and_goes_on() -> None:
    ps = with_active(A, B)
    actions = ps.receive(A.id, ForwardJoin(C, LIMITS.prwl), 0)
    assert sends(actions) == [(B.id, ForwardJoin(C, LIMITS.prwl - 1))]
    assert C.id in ps.passive
    assert ps.receive(A.id, ForwardJoin(ME, 3), 0) == []  # never ourselves


def test_a_full_node_refuses_low_priority_and_evicts_for_high_priority() -> None:
    limits = PeerLimits(active_size=2)
    ps = with_active(A, B, limits=limits)
    assert ps.receive(C.id, Neighbor(C, False), 0) == [Send(C.id, NeighborReply(False)),
                                                        Close(C.id)]  # fmt: skip
    actions = ps.receive(C.id, Neighbor(C, True), 0)
    (evicted,) = [a.peer for a in actions if isinstance(a, NeighborDown)]
    assert actions == [NeighborDown(evicted), Send(evicted, Disconnect()), Close(evicted),
                       NeighborUp(C), Send(C.id, NeighborReply(True))]  # fmt: skip
    assert evicted in ps.passive
    assert len(ps.active) == 2


def test_a_failed_neighbour_is_replaced_from_the_passive_view() -> None:
    ps = with_active(A)
    ps.add_known([B, C])
    actions = ps.disconnected(A.id, 0)
    assert actions[0] == NeighborDown(A.id)
    dials = [a.peer for a in actions if isinstance(a, Connect)]
    assert {info.id for info in dials} == {B.id, C.id}
    # Left with no neighbour, the request has high priority.
    first = dials[0]
    assert sends(ps.connected(first.id, 10)) == [(first.id, Neighbor(ME, True))]
    assert A.id not in ps.passive  # failed, not merely disconnected
    # A dead candidate is forgotten; one that does not answer too.
    other = dials[1]
    ps.connect_failed(other.id, 20)
    assert other.id not in ps.passive
    assert ps.handle_timer(10 + LIMITS.ask_timeout_ms) == [Close(first.id)]
    assert ps.passive == {}
    assert ps.isolated


def test_disconnect_moves_the_peer_to_the_passive_view() -> None:
    ps = with_active(A, B)
    assert ps.receive(A.id, Disconnect(), 0)[0] == NeighborDown(A.id)
    assert A.id in ps.passive
    assert set(ps.active) == {B.id}


def test_shuffle_walks_then_replies_and_merges() -> None:
    ps = with_active(A, B)
    ps.add_known([peer_info(n) for n in range(10, 14)])
    sample = tuple(peer_info(n) for n in range(20, 23))
    # With hops left it walks on, never back to the sender or the origin.
    assert sends(ps.receive(A.id, Shuffle(C, sample, 3), 0)) == [(B.id, Shuffle(C, sample, 2))]
    # At the end of the walk: answer the origin over a new connection, merge.
    actions = ps.receive(A.id, Shuffle(C, sample, 1), 0)
    assert actions == [Connect(C)]
    assert set(sample_id.id for sample_id in sample) <= set(ps.passive)
    (reply,) = sends(ps.connected(C.id, 10)[:-1])
    assert reply[0] == C.id
    assert isinstance(reply[1], ShuffleReply)
    assert len(reply[1].peers) == 3


def test_the_shuffle_timer_has_jitter_and_a_reply_is_merged_once() -> None:
    deadlines = {PeerSelection(ME, random.Random(s), 0).next_deadline() for s in range(20)}
    assert len(deadlines) > 10
    low = LIMITS.shuffle_interval_ms - LIMITS.shuffle_jitter_ms
    high = LIMITS.shuffle_interval_ms + LIMITS.shuffle_jitter_ms
    assert all(d is not None and low <= d <= high for d in deadlines)
    ps = with_active(A)
    deadline = ps.next_deadline()
    assert deadline is not None
    (shuffle,) = sends(ps.handle_timer(deadline))
    assert shuffle[0] == A.id
    assert isinstance(shuffle[1], Shuffle)
    assert shuffle[1].origin == ME
    ps.receive(B.id, ShuffleReply((C,)), deadline + 10)
    assert C.id in ps.passive
    ps.receive(B.id, ShuffleReply((peer_info(9),)), deadline + 20)  # unsolicited
    assert node_id(9) not in ps.passive


def test_the_passive_view_is_bounded_and_shuffles_are_limited() -> None:
    limits = PeerLimits(passive_size=5, max_shuffle_peers=6)
    ps = with_active(A, B, limits=limits)
    ps.add_known([peer_info(n) for n in range(10, 30)])
    assert len(ps.passive) == 5
    with pytest.raises(RemoteProtocolError, match="7 peers in a shuffle"):
        ps.receive(A.id, Shuffle(C, tuple(peer_info(n) for n in range(40, 47)), 0), 0)
    ps.receive(A.id, Shuffle(C, tuple(peer_info(n) for n in range(40, 46)), 0), 0)
    assert len(ps.passive) == 5


def test_malformed_peer_infos_are_remote_errors() -> None:
    ps = with_active(A)
    with pytest.raises(RemoteProtocolError, match="addresses"):
        ps.receive(A.id, ForwardJoin(PeerInfo(b"x", ("a",) * 9), 1), 0)
    with pytest.raises(RemoteProtocolError, match="peer id of 65 bytes"):
        ps.receive(A.id, ForwardJoin(PeerInfo(b"x" * 65, ()), 1), 0)
    with pytest.raises(RemoteProtocolError, match="longer than 256"):
        ps.receive(A.id, ForwardJoin(PeerInfo(b"x", ("a" * 257,)), 1), 0)
    with pytest.raises(RemoteProtocolError, match="names another peer"):
        ps.receive(B.id, Join(C), 0)


def test_peers_not_allowed_are_never_admitted() -> None:
    banned = C.id
    ps = PeerSelection(ME, random.Random(0), 0, is_allowed=lambda peer: peer != banned)
    assert ps.receive(C.id, Join(C), 0) == [Close(C.id)]
    assert ps.receive(C.id, Neighbor(C, True), 0) == [Send(C.id, NeighborReply(False)),
                                                       Close(C.id)]  # fmt: skip
    ps.receive(A.id, Neighbor(A, True), 0)
    assert ps.receive(A.id, ForwardJoin(C, 0), 0) == []
    ps.receive(A.id, Shuffle(B, (C, peer_info(9)), 0), 0)
    ps.add_known([C])
    assert C.id not in ps.passive
    assert node_id(9) in ps.passive
    assert C.id not in ps.active
    assert ps.counters.not_allowed >= 3


def test_connections_are_bounded_and_misuse_is_local() -> None:
    ps = selection(PeerLimits(max_connections=3))
    for n in range(3):
        ps.receive(node_id(n + 10), Neighbor(peer_info(n + 10), True), 0)
    with pytest.raises(RemoteProtocolError, match="more than 3 connections"):
        ps.receive(node_id(20), Neighbor(peer_info(20), False), 0)
    with pytest.raises(LocalProtocolError, match="not a membership message"):
        ps.receive(node_id(10), Prune(), 0)
    with pytest.raises(LocalProtocolError, match="through itself"):
        ps.join(ME, 0)


def test_crossing_neighbor_requests_end_symmetric() -> None:
    ps = selection()
    ps.add_known([A])
    (connect,) = ps.handle_timer(ps.next_deadline() or 0)
    assert connect == Connect(A)
    ps.connected(A.id, 10)  # we asked A ...
    actions = ps.receive(A.id, Neighbor(A, False), 20)  # ... while A asked us
    assert NeighborUp(A) in actions
    assert ps.receive(A.id, NeighborReply(True), 30) == []
    assert set(ps.active) == {A.id}
    assert index_of(A.id) == 1


def test_a_turned_down_request_pauses_requests_until_the_next_tick_when_half_full() -> None:
    limits = PeerLimits(active_size=3)
    ps = with_active(A, B, limits=limits)  # one short
    ps.add_known([C, peer_info(4)])
    (connect,) = [a for a in ps.handle_timer(1) if isinstance(a, Connect)]
    ps.connected(connect.peer.id, 2)
    assert ps.receive(connect.peer.id, NeighborReply(False), 3) == [Close(connect.peer.id)]
    # The other candidate is not asked: full peers turn requests down, each a connection.
    assert [a for a in ps.handle_timer(4) if isinstance(a, Connect)] == []
    assert ps.counters.asks_rejected == 1
    tick = ps.next_deadline() or 0
    asked = [a.peer.id for a in ps.handle_timer(tick) if isinstance(a, Connect)]
    assert len(asked) == 1  # the next tick asks again


def test_a_node_far_below_its_view_size_keeps_asking_after_a_refusal() -> None:
    limits = PeerLimits(active_size=4)
    ps = with_active(A, limits=limits)  # three short
    ps.add_known([B, C, peer_info(4)])
    dials = [a.peer.id for a in ps.handle_timer(1) if isinstance(a, Connect)]
    assert len(dials) == 3
    ps.connected(dials[0], 2)
    ps.receive(dials[0], NeighborReply(False), 3)
    ps.add_known([peer_info(5)])
    assert [a.peer.id for a in ps.handle_timer(4) if isinstance(a, Connect)] == [node_id(5)]


def test_a_probe_opens_a_connection_that_lingers_then_closes() -> None:
    ps = with_active(A)
    assert ps.probe(B, 0) == [Connect(B)]
    assert ps.probe(B, 1) == []  # already linked
    assert ps.probe(ME, 1) == []
    assert ps.connected(B.id, 10) == []  # no membership message: it stays open
    assert B.id not in ps.active
    assert ps.handle_timer(10 + LIMITS.probe_linger_ms - 1) == []
    assert Close(B.id) in ps.handle_timer(10 + LIMITS.probe_linger_ms)
    # A probe that fails forgets nothing: the peer may be across a partition.
    ps.add_known([C])
    ps.probe(C, 20_000)
    ps.connect_failed(C.id, 20_010)
    assert C.id in ps.passive
    assert ps.counters.probes == 2


def test_a_probe_that_finds_a_split_overlay_becomes_a_neighbour() -> None:
    ps = with_active(A, B, C, peer_info(4), peer_info(5))  # full
    other = peer_info(6)
    ps.probe(other, 0)
    ps.connected(other.id, 10)
    assert sends(ps.merge(other.id, 20)) == [(other.id, Neighbor(ME, True))]
    actions = ps.receive(other.id, NeighborReply(True), 30)
    assert NeighborUp(other) in actions
    assert len([a for a in actions if isinstance(a, NeighborDown)]) == 1  # one made room
    assert other.id in ps.active
    assert ps.merge(node_id(7), 40) == []  # no such probe
    assert ps.counters.merges == 1
