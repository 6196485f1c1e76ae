"""Joining a federation with an invite code (what ``archipel join`` does).

The new cell ran ``archipel init --cell NAME`` and sent its cell card; a
member of the federation answered with an invite code (``archipel invite
CARD``), after authoring the ``cell.admit`` op for the card's keys. Joining
stores what the code carries — the federation's id, name and secret, the
inviter's addresses, the admission op — so that ``archipel run`` can connect
and fetch the federation's ops. The new cell's keys may act once the
admission is complete (backed by ``admission_endorsements`` cells).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from archipel.crdt import Op
from archipel.crdt._hlc import ts_from_ms
from archipel.crdt.genesis import Params, make_genesis

from .identity import Identity, IdentityError, load, save
from .invite import Invite, read_invite
from .paths import Home, NodeLock
from .storage import Store
from .transport import peer_id_of


def join(home: Home, code: str, now_ms: int) -> tuple[Identity, Invite]:
    """Check ``code`` and make this node a member of its federation. Raises
    :class:`InvalidCode` or :class:`IdentityError`; nothing changes on error."""
    ident = load(home.identity)
    invite = read_invite(code, now_ms)
    if ident.joined:
        raise IdentityError(
            f"this node already belongs to the federation {ident.federation_name!r}:"
            " one node per federation (use another --home)"
        )
    card_keys = {ident.member_public, ident.device_public}
    bootstrap = []
    for key, addrs in invite.bootstrap:
        suffix = f"/p2p/{peer_id_of(key)}"
        bootstrap += [a if a.endswith(suffix) else a.rstrip("/") + suffix for a in addrs]
    if card_keys & {key for key, _ in invite.bootstrap}:
        raise IdentityError("this invite names this very node as its bootstrap: it is our own")
    joined = ident.with_federation(
        invite.federation,
        invite.federation_name,
        invite.secret,
        bootstrap=tuple(bootstrap),
        admission=invite.admission,
    )
    with NodeLock(home):
        Store.open(home.database, snapshot_key=joined.snapshot_key()).close()
        save(home.identity, joined)
    return joined, invite


def found_on_disk(
    homes: Sequence[Home],
    cells: Sequence[str],
    federation_name: str,
    now_ms: int,
    *,
    secret: bytes | None = None,
    admission_endorsements: int = 1,
) -> tuple[Op, list[Identity]]:
    """Create a federation whose founding cells each have a node, all at once,
    with no daemon running: for test harnesses and benchmarks (a real cell runs
    ``archipel init`` and joins by invite). Each home is created empty; returns
    the genesis op and each node's identity."""
    if len(homes) != len(cells) or not cells:
        raise IdentityError("one home per founding cell, and at least one cell")
    fresh = [Identity.generate(name) for name in cells]
    genesis = make_genesis(
        fresh[0].member,
        name=federation_name,
        cells=[
            {"name": i.cell, "members": [i.member_public], "devices": [i.device_public]}
            for i in fresh
        ],
        ts=ts_from_ms(now_ms),
        params=Params(admission_endorsements=admission_endorsements),
    )
    secret = secret if secret is not None else os.urandom(32)
    joined = []
    for home, new in zip(homes, fresh, strict=True):
        home.create()
        ident = new.with_federation(genesis.federation, federation_name, secret)
        save(home.identity, ident)
        with Store.open(home.database, snapshot_key=ident.snapshot_key()) as store:
            store.write_now([genesis])
        joined.append(ident)
    return genesis, joined
