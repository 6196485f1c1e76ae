"""Cell cards and invite codes: round trips, and every kind of bad code refused."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import msgpack
import nacl.signing
import pytest
from hypothesis import given
from hypothesis import strategies as st

from archipel.crdt import encode
from archipel.daemon.invite import (
    CARD_DOMAIN,
    CARD_PREFIX,
    DEFAULT_LIFETIME_MS,
    INVITE_DOMAIN,
    INVITE_PREFIX,
    MAX_ADDR_CHARS,
    MAX_BOOTSTRAP,
    MAX_BOOTSTRAP_ADDRS,
    MAX_KEYS,
    CellCard,
    InvalidCode,
    Invite,
    decode_card,
    encode_card,
    make_invite,
    read_invite,
)

NOW = 1_700_000_000_000
KEY = nacl.signing.SigningKey(b"k" * 32)


def k(i: int) -> bytes:
    return i.to_bytes(32, "big")


def b32(data: bytes) -> str:
    return base64.b32encode(data).decode().rstrip("=").lower()


def invite_args(**changes: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "federation": k(1),
        "federation_name": "Fédération des jardins",
        "secret": k(2),
        "bootstrap": [(k(3), ["/ip4/203.0.113.5/tcp/4001", "/dns4/node.example.org/tcp/4001"])],
        "admission": k(4),
        "expires_ms": NOW + DEFAULT_LIFETIME_MS,
    }
    args.update(changes)
    return args


def code(**changes: Any) -> str:
    return make_invite(KEY, **invite_args(**changes))


def signed(body: dict[str, Any], key: nacl.signing.SigningKey = KEY) -> str:
    """An invite code built by hand: any body, correctly signed (for shape tests)."""
    data = encode(body)
    return INVITE_PREFIX + b32(data + key.sign(INVITE_DOMAIN + data).signature)


def body(**changes: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "fed": k(1),
        "name": "F",
        "secret": k(2),
        "boot": [[k(3), ["/ip4/203.0.113.5/tcp/4001"]]],
        "admission": k(4),
        "expires": NOW + 1,
        "by": bytes(KEY.verify_key),
    }
    out.update(changes)
    return {key: value for key, value in out.items() if value is not None}


# -- round trips ----------------------------------------------------------------------------

keys = st.binary(min_size=32, max_size=32)
names = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Co", "Cn")),
    min_size=1,
    max_size=100,
).filter(str.isprintable)
cards = st.builds(
    lambda name, pool, split: CellCard(name, tuple(pool[:split]), tuple(pool[split:])),
    names,
    st.lists(keys, min_size=1, max_size=10, unique=True),
    st.integers(1, 10),
)
multiaddrs = st.from_regex(r"/[a-z0-9]{1,6}(/[a-zA-Z0-9.:_-]{1,20}){1,5}", fullmatch=True)
bootstraps = st.lists(
    st.tuples(keys, st.lists(multiaddrs, min_size=1, max_size=8, unique=True).map(tuple)),
    max_size=MAX_BOOTSTRAP,
    unique_by=lambda peer: peer[0],
).map(tuple)


@given(cards)
def test_cards_round_trip(card: CellCard) -> None:
    text = encode_card(card)
    assert text.startswith(CARD_PREFIX)
    assert decode_card(text) == card


@given(
    st.binary(min_size=32, max_size=32),
    keys,
    names.map(lambda n: n[:100]),
    keys,
    bootstraps,
    keys,
    st.integers(NOW + 1, 2**63 - 1),
)
def test_invites_round_trip(
    seed: bytes,
    federation: bytes,
    name: str,
    secret: bytes,
    bootstrap: tuple[tuple[bytes, tuple[str, ...]], ...],
    admission: bytes,
    expires_ms: int,
) -> None:
    key = nacl.signing.SigningKey(seed)
    text = make_invite(
        key,
        federation=federation,
        federation_name=name,
        secret=secret,
        bootstrap=bootstrap,
        admission=admission,
        expires_ms=expires_ms,
    )
    assert text.startswith(INVITE_PREFIX)
    assert read_invite(text, NOW) == Invite(
        federation, name, secret, bootstrap, admission, expires_ms, bytes(key.verify_key)
    )


def test_a_code_survives_chat_and_terminal_mangling() -> None:
    text = code()
    wrapped = "\n".join(text[i : i + 60] for i in range(0, len(text), 60))
    for mangled in (
        f"  {text}\n",
        wrapped,
        text.upper(),
        f"\t{wrapped}\r\n",
        text.replace("-", "-\n"),
    ):
        assert read_invite(mangled, NOW) == read_invite(text, NOW)
    card = encode_card(CellCard("Les Tilleuls", (k(5),), (k(6),)))
    assert decode_card(f"\n {card.upper()} \n") == decode_card(card)


def test_text_is_plain_and_chat_safe() -> None:
    for text in (code(), encode_card(CellCard("c", (k(5),), (k(6),)))):
        payload = text.split("-")[-1]
        assert set(payload) <= set("abcdefghijklmnopqrstuvwxyz234567")
        assert text.isascii()


def test_cards_sort_their_keys_and_refuse_bad_ones() -> None:
    assert CellCard("c", (k(2), k(1)), ()) == CellCard("c", (k(1), k(2)), ())
    for members, devices, reason in [
        ((), (), "members"),
        ((k(1), k(1)), (), "repeated"),
        ((k(1),), (k(1),), "both"),
        ((b"short",), (), "32 bytes"),
        (tuple(k(i) for i in range(MAX_KEYS + 1)), (), "members"),
        ("not a tuple", (), "members"),
    ]:
        with pytest.raises(InvalidCode, match=reason):
            CellCard("c", members, devices)  # type: ignore[arg-type]
    for name in ("", "x" * 101, "line\nbreak", 7):
        with pytest.raises(InvalidCode, match="cell name"):
            CellCard(name, (k(1),), ())  # type: ignore[arg-type]


def test_the_invite_repr_hides_the_secret() -> None:
    invite = read_invite(code(secret=b"\xab" * 32), NOW)
    assert "ab" * 4 not in repr(invite)
    assert "hidden" in repr(invite)


# -- tampering ------------------------------------------------------------------------------


@given(st.data())
def test_changing_any_character_of_an_invite_is_refused(data: st.DataObject) -> None:
    text = code()
    index = data.draw(st.integers(0, len(text) - 1), label="index")
    replacement = data.draw(
        st.sampled_from("abcz27-x9 ").filter(lambda c: c != text[index].lower()), label="with"
    )
    tampered = text[:index] + replacement + text[index + 1 :]
    with pytest.raises(InvalidCode):
        read_invite(tampered, NOW)


@given(st.data())
def test_changing_any_byte_of_a_signed_invite_is_refused(data: st.DataObject) -> None:
    text = code()
    payload = text[len(INVITE_PREFIX) :]
    raw = base64.b32decode(payload.upper() + "=" * (-len(payload) % 8))
    index = data.draw(st.integers(0, len(raw) - 1), label="index")
    flip = data.draw(st.integers(1, 255), label="xor")
    tampered = raw[:index] + bytes([raw[index] ^ flip]) + raw[index + 1 :]
    with pytest.raises(InvalidCode):
        read_invite(INVITE_PREFIX + b32(tampered), NOW)


@given(st.data())
def test_changing_any_byte_of_a_card_is_refused(data: st.DataObject) -> None:
    text = encode_card(CellCard("Les Tilleuls", (k(5), k(7)), (k(6),)))
    payload = text[len(CARD_PREFIX) :]
    raw = base64.b32decode(payload.upper() + "=" * (-len(payload) % 8))
    index = data.draw(st.integers(0, len(raw) - 1), label="index")
    flip = data.draw(st.integers(1, 255), label="xor")
    tampered = raw[:index] + bytes([raw[index] ^ flip]) + raw[index + 1 :]
    with pytest.raises(InvalidCode):
        decode_card(CARD_PREFIX + b32(tampered))


def test_a_stray_last_character_is_refused() -> None:
    # The last base32 character may carry unused bits: a code whose unused bits
    # differ decodes to the same bytes, and must still be refused.
    text = code()
    payload = text[len(INVITE_PREFIX) :]
    assert len(payload) % 8 in (2, 4, 5, 7)
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    last = alphabet.index(payload[-1])
    other = alphabet[last ^ 1]
    with pytest.raises(InvalidCode, match="altered"):
        read_invite(text[:-1] + other, NOW)


def test_a_signature_by_another_key_is_refused() -> None:
    forged = signed(body(), key=nacl.signing.SigningKey(b"x" * 32))
    with pytest.raises(InvalidCode, match="signature"):
        read_invite(forged, NOW)


def test_a_signature_without_the_domain_is_refused() -> None:
    data = encode(body())
    text = INVITE_PREFIX + b32(data + KEY.sign(data).signature)
    with pytest.raises(InvalidCode, match="signature"):
        read_invite(text, NOW)


# -- expiry, prefixes, sizes ----------------------------------------------------------------


def test_an_expired_invite_is_refused_with_its_date() -> None:
    text = code(expires_ms=NOW)
    assert read_invite(text, NOW - 1).expires_ms == NOW
    with pytest.raises(InvalidCode, match=r"expired on 2023-11-14 22:13 UTC"):
        read_invite(text, NOW)
    with pytest.raises(InvalidCode, match="expired"):
        read_invite(text, NOW + 10**9)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "not an invite code: it should start with 'archipel-invite1-'"),
        ("hello", "should start"),
        ("archipel-invite2-aaaa", "should start"),
        ("archipel-invite1", "should start"),
        ("archipel-invite1-", "too short"),
        ("archipel-invite1-aa", "too short"),
        ("archipel-invite1-a", "cut off"),
        ("archipel-invite1-abc", "cut off"),
        ("archipel-invite1-aaaa1aaa", "do not belong"),
        ("archipel-invite1-aaaa=aaa", "do not belong"),
        ("archipel-invite1-aaaa_aaa", "do not belong"),
        ("archipel-invite1-" + "a" * 20_000, "too long"),
        ("x" * 70_000, "far too long"),
    ],
)
def test_bad_invite_texts_are_refused(text: str, reason: str) -> None:
    with pytest.raises(InvalidCode, match=reason):
        read_invite(text, NOW)


def test_a_card_is_not_an_invite_and_an_invite_is_not_a_card() -> None:
    card = encode_card(CellCard("c", (k(5),), ()))
    with pytest.raises(InvalidCode, match="this is a cell card, not an invite code"):
        read_invite(card, NOW)
    with pytest.raises(InvalidCode, match="this is an invite code, not a cell card"):
        decode_card(code())


def test_a_truncated_code_is_refused() -> None:
    text = code()
    for cut in (1, 2, 5, 8, 13, 50, 100, len(text) - len(INVITE_PREFIX) - 1):
        with pytest.raises(InvalidCode):
            read_invite(text[:-cut], NOW)
    card = encode_card(CellCard("c", (k(5),), (k(6),)))
    for cut in (1, 2, 8, 13, 40):
        with pytest.raises(InvalidCode):
            decode_card(card[:-cut])


def test_an_oversized_payload_is_refused_before_decoding() -> None:
    huge = signed(body(name="n" * 10_000))
    with pytest.raises(InvalidCode, match="too long"):
        read_invite(huge, NOW)
    card_body = encode({"name": "c", "members": [k(i) for i in range(700)], "devices": []})
    checksum = hashlib.blake2b(CARD_DOMAIN + card_body, digest_size=8).digest()
    with pytest.raises(InvalidCode, match="too long"):
        decode_card(CARD_PREFIX + b32(card_body + checksum))


def test_now_must_be_an_int() -> None:
    with pytest.raises(TypeError):
        read_invite(code(), float(NOW))  # type: ignore[arg-type]


# -- well-signed codes with the wrong fields or types ---------------------------------------


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"fed": "a str"}, "federation id"),
        ({"fed": k(1)[:31]}, "federation id"),
        ({"name": b"bytes"}, "federation name"),
        ({"name": ""}, "federation name"),
        ({"name": "x" * 201}, "federation name"),
        ({"name": "bell\x07"}, "control"),
        ({"secret": k(2)[:31]}, "secret"),
        ({"secret": k(2) + b"\0"}, "damaged"),
        ({"secret": None}, "expected fields"),
        ({"admission": 4}, "admission"),
        ({"by": None}, "expected fields"),
        ({"extra": 1}, "expected fields"),
        ({"expires": "soon"}, "expiry"),
        ({"expires": True}, "expiry"),
        ({"expires": 0}, "expiry"),
        ({"expires": -5}, "expiry"),
        ({"expires": 2**63}, "expiry"),
        ({"boot": {"a": 1}}, "not a list"),
        ({"boot": [k(3)]}, "not \\[key, addresses\\]"),
        ({"boot": [[k(3)]]}, "not \\[key, addresses\\]"),
        ({"boot": [[k(3), "/ip4/1.2.3.4/tcp/1"]]}, "not \\[key, addresses\\]"),
        ({"boot": [[k(3)[:5], ["/ip4/1.2.3.4/tcp/1"]]]}, "peer's key"),
        ({"boot": [[k(3), []]]}, "1 to 8 addresses"),
        ({"boot": [[k(3), [f"/{i}" for i in range(9)]]]}, "damaged"),  # over the array limit
        ({"boot": [[k(3), ["no-slash"]]]}, "multiaddr"),
        ({"boot": [[k(3), ["/with space"]]]}, "multiaddr"),
        ({"boot": [[k(3), ["/" + "a" * 128]]]}, "multiaddr"),
        ({"boot": [[k(3), ["/é"]]]}, "multiaddr"),
        ({"boot": [[k(3), [7]]]}, "multiaddr"),
        ({"boot": [[k(3), ["/a", "/a"]]]}, "repeated"),
        ({"boot": [[k(3), ["/a"]], [k(3), ["/b"]]]}, "twice"),
        ({"boot": [[k(i), ["/a"]] for i in range(9)]}, "damaged"),  # over the array limit
        ({"by": k(9)}, "signature"),  # a well-formed key that did not sign
    ],
)
def test_signed_codes_with_wrong_fields_are_refused(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidCode, match=reason):
        read_invite(signed(body(**changes)), NOW)


def test_non_canonical_bodies_are_refused() -> None:
    # The same fields with the map's keys in reverse order: msgpack, but not canonical.
    fields = body()
    data = msgpack.packb({key: fields[key] for key in sorted(fields, reverse=True)})
    assert data != encode(fields)
    text = INVITE_PREFIX + b32(data + KEY.sign(INVITE_DOMAIN + data).signature)
    with pytest.raises(InvalidCode, match="damaged"):
        read_invite(text, NOW)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ([1, 2], "expected fields"),
        ({"name": "c", "members": [k(1)]}, "expected fields"),
        ({"name": "c", "members": [k(2), k(1)], "devices": []}, "sorted"),
        ({"name": "c", "members": [k(1)], "devices": [k(1)]}, "both"),
        ({"name": "c", "members": [], "devices": []}, "members"),
        ({"name": 5, "members": [k(1)], "devices": []}, "cell name"),
        ({"name": "c", "members": [k(1)], "devices": "x"}, "devices"),
        ({"name": "c", "members": [[k(1)]], "devices": []}, "damaged"),  # nested too deep
    ],
)
def test_cards_with_wrong_fields_are_refused(value: Any, reason: str) -> None:
    data = encode(value)
    checksum = hashlib.blake2b(CARD_DOMAIN + data, digest_size=8).digest()
    with pytest.raises(InvalidCode, match=reason):
        decode_card(CARD_PREFIX + b32(data + checksum))


def test_a_damaged_card_names_its_checksum() -> None:
    text = encode_card(CellCard("c", (k(5),), (k(6),)))
    index = len(CARD_PREFIX) + 3
    tampered = text[:index] + ("b" if text[index] != "b" else "c") + text[index + 1 :]
    with pytest.raises(InvalidCode, match="checksum"):
        decode_card(tampered)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"federation": b"x"}, "federation id"),
        ({"secret": "s" * 32}, "secret"),
        ({"federation_name": ""}, "federation name"),
        ({"bootstrap": [(k(3), [])]}, "addresses"),
        ({"bootstrap": [(k(3), [f"/{i}" for i in range(9)])]}, "1 to 8 addresses"),
        ({"bootstrap": [(k(i), ["/a"]) for i in range(MAX_BOOTSTRAP + 1)]}, "at most"),
        ({"admission": None}, "admission"),
        ({"expires_ms": 0}, "expiry"),
    ],
)
def test_make_invite_refuses_values_that_cannot_travel(
    changes: dict[str, Any], reason: str
) -> None:
    with pytest.raises(InvalidCode, match=reason):
        code(**changes)
    with pytest.raises(InvalidCode, match="signing key"):
        make_invite(b"k" * 32, **invite_args())  # type: ignore[arg-type]


@given(st.text(max_size=300))
def test_arbitrary_text_raises_only_invalid_code(text: str) -> None:
    with pytest.raises(InvalidCode):
        read_invite(text, NOW)
    with pytest.raises(InvalidCode):
        decode_card(text)


@given(st.binary(max_size=400))
def test_arbitrary_payloads_raise_only_invalid_code(raw: bytes) -> None:
    with pytest.raises(InvalidCode):
        read_invite(INVITE_PREFIX + b32(raw), NOW)
    with pytest.raises(InvalidCode):
        decode_card(CARD_PREFIX + b32(raw))


def test_the_largest_invite_allowed_round_trips() -> None:
    bootstrap = tuple(
        (
            k(100 + p),
            tuple(f"/{a:02d}" + "x" * (MAX_ADDR_CHARS - 3) for a in range(MAX_BOOTSTRAP_ADDRS)),
        )
        for p in range(MAX_BOOTSTRAP)
    )
    name = "\U0001f33b" * 200  # 4 bytes each in UTF-8
    text = code(bootstrap=bootstrap, federation_name=name, expires_ms=2**63 - 1)
    invite = read_invite(text, NOW)
    assert invite.bootstrap == bootstrap
    assert invite.federation_name == name
