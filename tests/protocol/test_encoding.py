"""Canonical encoding: round trips, and every way bytes can be wrong is rejected with a reason."""

import random

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.encoding import MESSAGE_TYPES, Amount, FieldError, decode, pack, unpack_canonical
from protocol.errors import DecodeError, LocalProtocolError
from protocol.messages import (
    GpuMetrics,
    Heartbeat,
    Offer,
    OfferWithdrawal,
    UsageReceipt,
)
from protocol.samples import make_offer, make_provider

RNG = random.Random(7)
PEER, WALLET_KEY, BINDING = make_provider(RNG)


def sample_offer(**kw) -> Offer:
    return make_offer(PEER, BINDING, random.Random(1), 1_700_000_000_000, **kw)


def test_encoding__offer_round_trips_exactly():
    offer = sample_offer(gpu_count=4)
    data = offer.encode()
    assert decode(data) == offer
    assert decode(data).encode() == data


def test_encoding__same_value_gives_same_bytes():
    assert sample_offer(gpu_count=2).encode() == sample_offer(gpu_count=2).encode()


def test_encoding__wire_layout_is_type_version_then_fields():
    data = sample_offer().encode()
    value = msgpack.unpackb(data)
    assert value[0] == Offer.TYPE and value[1] == Offer.VERSION
    assert len(value) == 2 + 12  # ... addrs, images, interruptible, signature


@pytest.mark.parametrize(
    "mutate, code",
    [
        (lambda v: v + b"\x00", "trailing_bytes"),
        (lambda v: v[:-1], "truncated"),
        (lambda v: b"", "truncated"),
        (lambda v: pack({"a": 1}), "malformed"),
        (lambda v: pack([99, 1]), "unknown_type"),
        (lambda v: pack([1, 2]), "unsupported_version"),
        (lambda v: pack(["1", 1]), "malformed"),
        (lambda v: pack(1.5), "malformed"),
        (lambda v: pack([1]), "malformed"),
    ],
)
def test_encoding__bad_bytes_rejected_with_reason(mutate, code):
    data = mutate(sample_offer().encode())
    with pytest.raises(DecodeError) as err:
        decode(data)
    assert err.value.code == code


def test_encoding__padded_integer_is_non_canonical():
    # 2 encoded as uint32 (0xce 00 00 00 02) instead of a positive fixint.
    data = bytearray(OfferWithdrawal(b"\x01" * 32, 2, 5, b"\x00" * 64).encode())
    fixed = data.replace(b"\x02\x05", b"\xce\x00\x00\x00\x02\x05", 1)
    with pytest.raises(DecodeError) as err:
        decode(bytes(fixed))
    assert err.value.code == "non_canonical"


def test_encoding__float_or_map_anywhere_is_malformed_not_bad_field():
    withdrawal = OfferWithdrawal(b"\x01" * 32, 2, 5, b"\x00" * 64).encode()
    value = msgpack.unpackb(withdrawal)
    for bad in (2.0, {}, {1: 2}, msgpack.ExtType(1, b"x")):
        value[3] = bad
        with pytest.raises(DecodeError) as err:
            decode(msgpack.packb(value, use_bin_type=True))
        assert err.value.code == "malformed", bad
    # float32 re-packs as float64 (non-canonical), but a float is malformed first
    float32 = withdrawal.replace(b"\x02\x05", b"\xca\x40\x00\x00\x00\x05", 1)
    with pytest.raises(DecodeError) as err:
        decode(float32)
    assert err.value.code == "malformed"
    # ... even when another field fails first, or the type is unknown
    value = msgpack.unpackb(withdrawal)
    value[2], value[4] = b"short", 1.5
    for data in (msgpack.packb(value, use_bin_type=True), msgpack.packb([99, 1, 1.5])):
        with pytest.raises(DecodeError) as err:
            decode(data)
        assert err.value.code == "malformed"


def test_encoding__a_map_before_a_truncation_is_truncated():
    # parsing comes first: the input ends inside the array
    with pytest.raises(DecodeError) as err:
        decode(b"\x93\x01\x80")
    assert err.value.code == "truncated"
    with pytest.raises(DecodeError) as err:
        decode(b"\x92\x01\x80\x00")  # ... and a forbidden value before trailing bytes
    assert err.value.code == "malformed"


def test_encoding__str_where_bytes_expected_rejected_with_field_path():
    value = msgpack.unpackb(sample_offer(gpu_count=2).encode())
    value[6][1][1] = "not bytes"  # gpus[1].uuid_digest
    with pytest.raises(DecodeError) as err:
        decode(msgpack.packb(value, use_bin_type=True))
    assert err.value.code == "bad_field"
    assert "gpus[1].uuid_digest" in str(err.value)


def test_encoding__integer_above_2_53_rejected():
    value = msgpack.unpackb(OfferWithdrawal(b"\x01" * 32, 2, 5, b"\x00" * 64).encode())
    value[3] = 2**53
    with pytest.raises(DecodeError) as err:
        decode(msgpack.packb(value, use_bin_type=True))
    assert err.value.code == "bad_field"


def test_encoding__oversized_message_rejected_before_parsing():
    with pytest.raises(DecodeError) as err:
        decode(b"\x92" + b"\x00" * (Heartbeat.MAX_SIZE + 10), Heartbeat)
    assert err.value.code == "oversized"


def test_encoding__expected_type_enforced():
    data = OfferWithdrawal(b"\x01" * 32, 2, 5, b"\x00" * 64).encode()
    with pytest.raises(DecodeError) as err:
        decode(data, Offer)
    assert err.value.code == "unexpected_type"


def test_encoding__ext_type_rejected():
    data = msgpack.packb([1, 1, msgpack.ExtType(5, b"x")], use_bin_type=True)
    with pytest.raises(DecodeError) as err:
        decode(data)
    assert err.value.code == "malformed"


@pytest.mark.parametrize("char, ok", [
    ("\x1f", False), (" ", True), ("~", True), ("\x7f", False), ("\x80", False),
    ("\u00a0", False), ("\u3000", False), ("\u2028", False), ("\u202e", False),
    ("\U0001fae8", False), ("\u00e9", False), ("\ufeff", False),
])
def test_encoding__text_is_printable_ascii_only(char, ok):
    value = msgpack.unpackb(sample_offer().encode())
    value[7][4] = "eu" + char  # host.region
    data = msgpack.packb(value, use_bin_type=True)
    if ok:
        assert decode(data).host.region == "eu" + char
    else:
        with pytest.raises(DecodeError) as err:
            decode(data)
        assert err.value.code == "bad_field" and f"U+{ord(char):04X}" in str(err.value)


def test_encoding__control_characters_in_text_rejected():
    value = msgpack.unpackb(sample_offer().encode())
    value[7][4] = "eu\x1b[31m"  # host.region with an ANSI escape
    with pytest.raises(DecodeError) as err:
        decode(msgpack.packb(value, use_bin_type=True))
    assert err.value.code == "bad_field"


def test_encoding__deeply_nested_input_does_not_crash():
    data = b"\x91" * 100_000 + b"\x00"
    with pytest.raises(DecodeError):
        decode(data)


def test_encoding__local_misuse_is_a_local_error():
    bad = OfferWithdrawal(b"\x01" * 31, 2, 5, b"\x00" * 64)
    with pytest.raises(LocalProtocolError) as err:
        bad.encode()
    assert "provider" in str(err.value)


@pytest.mark.parametrize("value", [0, 1, 255, 256, 2**64, 2**256 - 1])
def test_amount__round_trips_minimal_big_endian(value):
    kind = Amount()
    wire = kind.to_wire(value)
    assert kind.from_wire(wire) == value
    assert wire[:1] != b"\x00"


def test_amount__leading_zero_and_overlong_rejected():
    with pytest.raises(FieldError):
        Amount().from_wire(b"\x00\x01")
    with pytest.raises(FieldError):
        Amount().from_wire(b"\x01" * 33)


def test_registry__every_type_has_limits_and_distinct_domains():
    domains = set()
    for type_id, cls in MESSAGE_TYPES.items():
        assert cls.TYPE == type_id and cls.MAX_SIZE > 0
        domain = getattr(cls, "DOMAIN", None)
        if domain is not None:
            assert domain.endswith(b"\x00") and domain not in domains
            domains.add(domain)


metrics_st = st.builds(
    GpuMetrics,
    uuid_digest=st.binary(min_size=32, max_size=32),
    util_pct=st.integers(0, 100),
    mem_used_mib=st.integers(0, 2**32 - 1),
    temp_c=st.integers(0, 255),
    power_mw=st.integers(0, 2**32 - 1),
)
heartbeat_st = st.builds(
    Heartbeat,
    agreement_id=st.binary(min_size=32, max_size=32),
    seq=st.integers(0, 2**32 - 1),
    sent_ms=st.integers(0, 2**53 - 1),
    nonce=st.binary(min_size=16, max_size=16),
    prev_hash=st.binary(min_size=32, max_size=32),
    metrics=st.lists(metrics_st, max_size=8).map(tuple),
    signature=st.binary(min_size=64, max_size=64),
)
receipt_st = st.builds(
    UsageReceipt,
    agreement_id=st.binary(min_size=32, max_size=32),
    acked_seconds=st.integers(0, 2**53 - 1),
    heartbeat_seq=st.integers(0, 2**32 - 1),
    heartbeat_hash=st.binary(min_size=32, max_size=32),
    next_nonce=st.binary(min_size=16, max_size=16),
    sent_ms=st.integers(0, 2**53 - 1),
    wallet_sig=st.binary(min_size=65, max_size=65),
    signature=st.binary(min_size=64, max_size=64),
)


@given(st.one_of(heartbeat_st, receipt_st))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_encoding__hypothesis_round_trip(msg):
    data = msg.encode()
    assert decode(data) == msg
    assert unpack_canonical(data) == msgpack.unpackb(data)


@given(st.binary(max_size=300))
@settings(max_examples=500)
def test_encoding__arbitrary_bytes_never_crash(data):
    try:
        decode(data)
    except DecodeError:
        pass


def _leaf_paths(value, path=()):
    """Every position in a nested wire list (containers too), as index paths."""
    yield path
    if isinstance(value, list):
        for i, item in enumerate(value):
            yield from _leaf_paths(item, path + (i,))


def _reference_decode(cls, values):
    """The plain decoder: each field through its kind's from_wire, in order (no generated code
    for the top-level class), for comparing error messages with the generated one."""
    from protocol.encoding import _schema

    if len(values) != len(_schema(cls)):
        raise FieldError(f"expected {len(_schema(cls))} fields, got {len(values)}")
    out = []
    for (name, kind), v in zip(_schema(cls), values):
        try:
            out.append(kind.from_wire(v))
        except FieldError as exc:
            raise exc.within(name) from None
    return cls(*out)


OFFER_WIRE = msgpack.unpackb(sample_offer(gpu_count=3).encode())
OFFER_PATHS = list(_leaf_paths(OFFER_WIRE[2:]))[1:]
BAD_VALUES = [None, -1, 0, 2**53, 2**64 - 1, "", "x" * 70, "a\x1b", b"", b"\x00" * 32,
              b"\x00" * 65, [], [0], [[]], [None] * 10, True]


@given(st.sampled_from(OFFER_PATHS), st.sampled_from(BAD_VALUES))
@settings(max_examples=400)
def test_encoding__generated_offer_decoder_fails_like_the_plain_one(path, bad):
    """Nested structs and lists of structs are inlined in the generated decoder: any value
    anywhere must give the same result or the same error (message and field path)."""
    import copy

    from protocol.encoding import _decoder

    values = copy.deepcopy(OFFER_WIRE[2:])
    target = values
    for i in path[:-1]:
        target = target[i]
    target[path[-1]] = bad
    try:
        want = _reference_decode(Offer, copy.deepcopy(values))
    except FieldError as exc:
        with pytest.raises(FieldError) as err:
            _decoder(Offer)(values)
        assert str(err.value) == str(exc)
    else:
        assert _decoder(Offer)(values) == want
