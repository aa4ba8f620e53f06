"""The PROXY protocol codec's contract: the spec's examples, round trips, fuzzing, errors."""

from __future__ import annotations

import dataclasses
import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcpfwd.proxy_protocol import (
    DEFAULT_MAX_V2_LENGTH,
    MAX_V2_LENGTH,
    SSL_CLIENT_CERT_CONN,
    SSL_CLIENT_SSL,
    TLV,
    TLV_ALPN,
    TLV_AUTHORITY,
    TLV_CRC32C,
    TLV_NETNS,
    TLV_NOOP,
    TLV_SSL,
    TLV_SUBTYPE_SSL_CIPHER,
    TLV_SUBTYPE_SSL_CN,
    TLV_SUBTYPE_SSL_VERSION,
    TLV_UNIQUE_ID,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyDecoder,
    ProxyHeader,
    ProxyProtocolError,
    SSLInfo,
    crc32c,
    decode,
    encode,
    encode_v1,
    encode_v1_unknown,
    encode_v2,
)

# ----------------------------------------------------------------------------- helpers


def reference_crc32c(data: bytes) -> int:
    """Bit-at-a-time CRC32C (reflected polynomial 0x82F63B78), independent of the module's."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def tlv_bytes(tlv_type: int, value: bytes) -> bytes:
    return struct.pack("!BH", tlv_type, len(value)) + value


def v2_fixed(ver_cmd: int, fam: int, length: int) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", ver_cmd, fam, length)


def split(blob: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(cuts), len(blob)]
    return [blob[a:b] for a, b in itertools.pairwise(points)]


def feed_until_header(decoder: ProxyDecoder, chunks: list[bytes]) -> tuple[ProxyHeader | None, int]:
    """Feed chunks until a header comes out: (header or None, chunks consumed)."""
    for index, chunk in enumerate(chunks):
        header = decoder.feed(chunk)
        if header is not None:
            return header, index + 1
    return None, len(chunks)


def strip_crc(header: ProxyHeader) -> ProxyHeader:
    assert header.tlvs
    assert header.tlvs[-1].type == TLV_CRC32C
    return dataclasses.replace(header, tlvs=header.tlvs[:-1])


# ----------------------------------------------------------------------------- strategies

ports = st.integers(0, 65535)
ipv4_endpoints = st.tuples(st.ip_addresses(v=4).map(str), ports)
ipv6_endpoints = st.tuples(st.ip_addresses(v=6).map(str), ports)
transports = st.sampled_from(["STREAM", "DGRAM"])

# Filesystem paths have no NUL; abstract names (leading NUL) must not end with one.
unix_paths = st.one_of(
    st.binary(max_size=108).map(lambda b: b.replace(b"\x00", b"/")),
    st.builds(
        lambda body, last: b"\x00" + body + bytes([last]),
        st.binary(max_size=106),
        st.integers(1, 255),
    ),
).map(lambda raw: raw.decode("utf-8", "surrogateescape"))

ssl_infos = st.builds(
    SSLInfo,
    client=st.integers(0, 7),
    verify=st.integers(0, 0xFFFFFFFF),
    tlvs=st.lists(
        st.builds(
            TLV,
            st.sampled_from([TLV_SUBTYPE_SSL_VERSION, TLV_SUBTYPE_SSL_CN, TLV_SUBTYPE_SSL_CIPHER]),
            st.text(max_size=30).map(str.encode),
        ),
        max_size=3,
    ).map(tuple),
)

_RESTRICTED = {TLV_CRC32C, TLV_UNIQUE_ID, TLV_AUTHORITY}
tlvs = st.one_of(
    st.builds(TLV, st.just(TLV_ALPN), st.binary(max_size=32)),
    st.builds(TLV, st.just(TLV_AUTHORITY), st.text(max_size=40).map(str.encode)),
    st.builds(TLV, st.just(TLV_NOOP), st.binary(max_size=16)),
    st.builds(TLV, st.just(TLV_UNIQUE_ID), st.binary(max_size=128)),
    st.builds(TLV, st.just(TLV_NETNS), st.text("abcxyz-_0123", max_size=20).map(str.encode)),
    ssl_infos.map(SSLInfo.to_tlv),
    st.builds(
        TLV, st.integers(0, 255).filter(lambda t: t not in _RESTRICTED), st.binary(max_size=64)
    ),
)
tlv_tuples = st.lists(tlvs, max_size=6).map(tuple)

v1_headers = st.one_of(
    st.builds(
        lambda s, d: ProxyHeader(1, "PROXY", "TCP4", "STREAM", s, d),
        ipv4_endpoints,
        ipv4_endpoints,
    ),
    st.builds(
        lambda s, d: ProxyHeader(1, "PROXY", "TCP6", "STREAM", s, d),
        ipv6_endpoints,
        ipv6_endpoints,
    ),
    st.just(ProxyHeader(1, "LOCAL", "UNSPEC", "UNSPEC", None, None)),
)

v2_headers = st.one_of(
    st.builds(
        lambda s, d, t, x: ProxyHeader(2, "PROXY", "TCP4", t, s, d, x),
        ipv4_endpoints,
        ipv4_endpoints,
        transports,
        tlv_tuples,
    ),
    st.builds(
        lambda s, d, t, x: ProxyHeader(2, "PROXY", "TCP6", t, s, d, x),
        ipv6_endpoints,
        ipv6_endpoints,
        transports,
        tlv_tuples,
    ),
    st.builds(
        lambda s, d, t, x: ProxyHeader(2, "PROXY", "UNIX", t, s, d, x),
        unix_paths,
        unix_paths,
        transports,
        tlv_tuples,
    ),
    st.builds(lambda x: ProxyHeader(2, "PROXY", "UNSPEC", "UNSPEC", None, None, x), tlv_tuples),
    st.builds(lambda x: ProxyHeader(2, "LOCAL", "UNSPEC", "UNSPEC", None, None, x), tlv_tuples),
)


@st.composite
def wires(draw: st.DrawFn) -> tuple[ProxyHeader, bytes]:
    """A header (as decoding must give it back) and its encoding, v1 or v2, CRC or not."""
    if draw(st.booleans()):
        header = draw(v1_headers)
        return header, encode(header)
    header = draw(v2_headers)
    wire = encode_v2(
        header.source,
        header.destination,
        command=header.command,
        tlvs=header.tlvs,
        crc32c=draw(st.booleans()),
        transport=header.transport,
    )
    return header, wire


def normalise(header: ProxyHeader) -> ProxyHeader:
    """The header minus a trailing CRC32C vector, which the encoder adds on request."""
    if header.tlvs and header.tlvs[-1].type == TLV_CRC32C:
        return strip_crc(header)
    return header


@st.composite
def mutated_wires(draw: st.DrawFn) -> bytes:
    _, wire = draw(wires())
    blob = bytearray(wire + draw(st.binary(max_size=16)))
    for _ in range(draw(st.integers(1, 4))):
        if not blob:
            break
        index = draw(st.integers(0, len(blob) - 1))
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if kind == "flip":
            blob[index] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            blob.insert(index, draw(st.integers(0, 255)))
        elif kind == "delete":
            del blob[index]
        else:
            del blob[index:]
    return bytes(blob)


# Random bytes rarely start like a header, so half the time they are given a real start.
arbitrary_bytes = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda prefix, tail: prefix + tail,
        st.sampled_from([b"P", b"PROXY ", b"PROXY TCP4 ", b"PROXY UNKNOWN", V2_SIGNATURE]),
        st.binary(max_size=300),
    ),
)


# ----------------------------------------------------------------------------- CRC32C


def test_crc32c_of_the_standard_check_string_is_e3069283() -> None:
    assert crc32c(b"123456789") == 0xE3069283


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0x00000000),
        (bytes(32), 0x8A9136AA),
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
    ],
    ids=["empty", "32-zeros", "32-ones", "32-incrementing"],
)
def test_crc32c_matches_rfc3720_test_vectors(data: bytes, expected: int) -> None:
    assert crc32c(data) == expected


@given(st.binary(max_size=600))
def test_crc32c_agrees_with_a_bitwise_reference(data: bytes) -> None:
    assert crc32c(data) == reference_crc32c(data)


# ----------------------------------------------------------------------------- v1 vectors


def test_v1_tcp4_example_from_the_spec_decodes_and_leaves_the_request() -> None:
    request = b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"
    header, rest = decode(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n" + request)
    assert header == ProxyHeader(
        1, "PROXY", "TCP4", "STREAM", ("192.168.0.1", 56324), ("192.168.0.11", 443)
    )
    assert rest == request


def test_encode_v1_produces_the_spec_example_line() -> None:
    line = encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert line == b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"


def test_v1_longest_tcp4_line_is_56_bytes_and_decodes() -> None:
    line = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"
    assert len(line) == 56
    assert encode_v1(("255.255.255.255", 65535), ("255.255.255.255", 65535)) == line
    header, rest = decode(line)
    assert header.source == ("255.255.255.255", 65535)
    assert rest == b""


def test_v1_longest_tcp6_line_is_104_bytes_and_decodes() -> None:
    full = ":".join(["ffff"] * 8)
    line = f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
    assert len(line) == 104
    header, _ = decode(line)
    assert header == ProxyHeader(1, "PROXY", "TCP6", "STREAM", (full, 65535), (full, 65535))
    assert encode_v1((full, 65535), (full, 65535)) == line


def test_v1_unknown_short_form_decodes_as_local_without_addresses() -> None:
    header, rest = decode(b"PROXY UNKNOWN\r\nHELO x\r\n")
    assert header == ProxyHeader(1, "LOCAL", "UNSPEC", "UNSPEC", None, None)
    assert rest == b"HELO x\r\n"


def test_encode_v1_unknown_is_the_short_form() -> None:
    assert encode_v1_unknown() == b"PROXY UNKNOWN\r\n"


def test_v1_unknown_worst_case_line_of_107_bytes_is_accepted_and_its_fields_ignored() -> None:
    full = ":".join(["ffff"] * 8)
    line = f"PROXY UNKNOWN {full} {full} 65535 65535\r\n".encode()
    assert len(line) == V1_MAX_LENGTH == 107
    header, rest = decode(line + b"data")
    assert header.command == "LOCAL"
    assert header.source is None
    assert rest == b"data"


def test_v1_tcp6_addresses_come_back_in_canonical_form() -> None:
    header, _ = decode(b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::FFFF:1.2.3.4 1 2\r\n")
    assert header.source == ("2001:db8::1", 1)
    assert header.destination is not None
    assert header.destination[0] in ("::ffff:1.2.3.4", "::ffff:102:304")


def test_encode_v1_never_exceeds_the_107_bytes_receivers_accept() -> None:
    full = ":".join(["ffff"] * 8)
    assert len(encode_v1((full, 65535), (full, 65535))) <= V1_MAX_LENGTH


# ----------------------------------------------------------------------------- v2 vectors

# Captured from HAProxy's send-proxy-v2 (TCP4 172.19.0.1:42578 -> 172.19.0.3:80),
# followed by the client's first bytes.
HAPROXY_V2_TCP4 = bytes.fromhex(
    "0d0a0d0a000d0a515549540a"  # signature
    "21"  # version 2, PROXY
    "11"  # AF_INET, STREAM
    "000c"  # 12 bytes follow
    "ac130001"  # 172.19.0.1
    "ac130003"  # 172.19.0.3
    "a652"  # 42578
    "0050"  # 80
)


def test_v2_tcp4_header_from_haproxy_decodes_byte_for_byte() -> None:
    header, rest = decode(HAPROXY_V2_TCP4 + b"GET / HTTP/1.1\r\n")
    assert header == ProxyHeader(
        2, "PROXY", "TCP4", "STREAM", ("172.19.0.1", 42578), ("172.19.0.3", 80)
    )
    assert rest == b"GET / HTTP/1.1\r\n"


def test_encode_v2_reproduces_haproxys_tcp4_header() -> None:
    assert encode_v2(("172.19.0.1", 42578), ("172.19.0.3", 80)) == HAPROXY_V2_TCP4


def test_encode_v2_tcp6_with_tlvs_and_crc32c_matches_a_hand_built_header() -> None:
    src = bytes.fromhex("20010db8000000000000000000000001")
    dst = bytes.fromhex("20010db8000000000000000000000002")
    body = (
        src
        + dst
        + struct.pack("!HH", 1234, 443)
        + tlv_bytes(TLV_AUTHORITY, b"example.com")
        + tlv_bytes(TLV_UNIQUE_ID, b"\x01\x02")
        + tlv_bytes(TLV_CRC32C, bytes(4))
    )
    zeroed = v2_fixed(0x21, 0x21, len(body)) + body
    expected = zeroed[:-4] + struct.pack("!I", reference_crc32c(zeroed))

    wire = encode_v2(
        ("2001:db8::1", 1234),
        ("2001:db8::2", 443),
        tlvs=[TLV(TLV_AUTHORITY, b"example.com"), TLV(TLV_UNIQUE_ID, b"\x01\x02")],
        crc32c=True,
    )

    assert wire == expected
    header, _ = decode(wire)
    assert header.authority == "example.com"
    assert header.unique_id == b"\x01\x02"


def test_encode_v2_local_is_the_16_byte_fixed_part_with_unspec_family() -> None:
    assert encode_v2(command="LOCAL") == V2_SIGNATURE + b"\x20\x00\x00\x00"
    header, _ = decode(V2_SIGNATURE + b"\x20\x00\x00\x00")
    assert header == ProxyHeader(2, "LOCAL", "UNSPEC", "UNSPEC", None, None)


def test_encode_v2_unix_paths_are_nul_padded_to_108_bytes_each() -> None:
    wire = encode_v2("/run/client.sock", "/run/server.sock")
    assert wire[12:16] == b"\x21\x31\x00\xd8"
    assert wire[16:124] == b"/run/client.sock".ljust(108, b"\x00")
    assert wire[124:232] == b"/run/server.sock".ljust(108, b"\x00")


def test_v2_udp4_header_decodes_with_dgram_transport() -> None:
    wire = (
        v2_fixed(0x21, 0x12, 12) + bytes([10, 0, 0, 1, 10, 0, 0, 2]) + struct.pack("!HH", 53, 5353)
    )
    header, _ = decode(wire)
    assert (header.family, header.transport) == ("TCP4", "DGRAM")
    assert header.source == ("10.0.0.1", 53)


def test_v2_local_header_skips_its_address_block_and_keeps_its_tlvs() -> None:
    body = bytes(12) + tlv_bytes(TLV_NOOP, b"pad")
    header, rest = decode(v2_fixed(0x20, 0x11, len(body)) + body + b"x")
    assert header == ProxyHeader(
        2, "LOCAL", "UNSPEC", "UNSPEC", None, None, (TLV(TLV_NOOP, b"pad"),)
    )
    assert rest == b"x"


def test_v2_proxy_with_unspec_family_is_accepted_without_addresses() -> None:
    header, _ = decode(v2_fixed(0x21, 0x00, 0))
    assert header == ProxyHeader(2, "PROXY", "UNSPEC", "UNSPEC", None, None)


def test_v2_unnamed_and_abstract_unix_sockets_survive_the_nul_padding() -> None:
    header, _ = decode(encode_v2("", "\x00tcpfwd\x00admin"))
    assert header.source == ""
    assert header.destination == "\x00tcpfwd\x00admin"


def test_ssl_tlv_with_sub_tlvs_round_trips_through_a_header() -> None:
    info = SSLInfo(
        client=SSL_CLIENT_SSL | SSL_CLIENT_CERT_CONN,
        verify=0,
        tlvs=(
            TLV(TLV_SUBTYPE_SSL_VERSION, b"TLSv1.3"),
            TLV(TLV_SUBTYPE_SSL_CN, b"client.example"),
            TLV(TLV_SUBTYPE_SSL_CIPHER, b"TLS_AES_128_GCM_SHA256"),
        ),
    )
    header, _ = decode(encode_v2(("1.1.1.1", 1), ("2.2.2.2", 2), tlvs=[info.to_tlv()]))
    parsed = header.ssl_info()
    assert parsed == info
    assert parsed.version == "TLSv1.3"
    assert parsed.cn == "client.example"
    assert parsed.cipher == "TLS_AES_128_GCM_SHA256"


def test_header_without_tlvs_has_no_unique_id_authority_or_ssl() -> None:
    header, _ = decode(HAPROXY_V2_TCP4)
    assert header.unique_id is None
    assert header.authority is None
    assert header.alpn is None
    assert header.ssl_info() is None


def test_malformed_ssl_tlv_is_kept_opaque_and_rejected_only_when_parsed() -> None:
    header, _ = decode(encode_v2(("1.1.1.1", 1), ("2.2.2.2", 2), tlvs=[TLV(TLV_SSL, b"\x01")]))
    with pytest.raises(ProxyProtocolError, match="v2: SSL TLV of 1 bytes"):
        header.ssl_info()


# ----------------------------------------------------------------------------- round trips


@given(v2_headers, st.booleans(), st.binary(max_size=64))
def test_v2_round_trip_for_every_family_with_and_without_crc32c(
    header: ProxyHeader, with_crc: bool, trailing: bytes
) -> None:
    wire = encode_v2(
        header.source,
        header.destination,
        command=header.command,
        tlvs=header.tlvs,
        crc32c=with_crc,
        transport=header.transport,
    )
    decoded, rest = decode(wire + trailing, max_v2_length=MAX_V2_LENGTH)
    assert (strip_crc(decoded) if with_crc else decoded) == header
    assert rest == trailing


@given(v1_headers, st.binary(max_size=64))
def test_v1_round_trip_for_tcp4_tcp6_and_unknown(header: ProxyHeader, trailing: bytes) -> None:
    decoded, rest = decode(encode(header) + trailing)
    assert decoded == header
    assert rest == trailing


@given(wires())
def test_encoding_a_decoded_header_reproduces_the_wire(case: tuple[ProxyHeader, bytes]) -> None:
    _, wire = case
    decoded, _ = decode(wire, max_v2_length=MAX_V2_LENGTH)
    assert encode(decoded) == wire


@given(wires(), st.binary(max_size=32))
def test_header_split_at_every_position_decodes_the_same_and_keeps_every_byte(
    case: tuple[ProxyHeader, bytes], trailing: bytes
) -> None:
    expected, wire = case
    stream = wire + trailing
    for cut in range(len(stream) + 1):
        decoder = ProxyDecoder(max_v2_length=MAX_V2_LENGTH)
        chunks = [stream[:cut], stream[cut:]]
        header, used = feed_until_header(decoder, chunks)
        assert header is not None
        assert normalise(header) == expected
        assert decoder.header_length == len(wire)
        assert decoder.remainder + b"".join(chunks[used:]) == trailing


@given(wires(), st.binary(max_size=32), st.data())
def test_header_fed_in_random_chunks_decodes_the_same_and_keeps_every_byte(
    case: tuple[ProxyHeader, bytes], trailing: bytes, data: st.DataObject
) -> None:
    expected, wire = case
    stream = wire + trailing
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    chunks = split(stream, cuts)
    decoder = ProxyDecoder(max_v2_length=MAX_V2_LENGTH)
    header, used = feed_until_header(decoder, chunks)
    assert header is not None
    assert normalise(header) == expected
    assert decoder.remainder + b"".join(chunks[used:]) == trailing


@given(wires())
def test_header_fed_one_byte_at_a_time_completes_on_its_last_byte(
    case: tuple[ProxyHeader, bytes],
) -> None:
    expected, wire = case
    decoder = ProxyDecoder(max_v2_length=MAX_V2_LENGTH)
    for index in range(len(wire) - 1):
        assert decoder.feed(wire[index : index + 1]) is None
    header = decoder.feed(wire[-1:])
    assert header is not None
    assert normalise(header) == expected
    assert decoder.remainder == b""


# ----------------------------------------------------------------------------- fuzzing


def assert_decoder_is_well_behaved(blob: bytes, cuts: list[int], max_v2_length: int) -> None:
    """Only header / None / ProxyProtocolError, bounded buffering, and no byte lost."""
    decoder = ProxyDecoder(max_v2_length=max_v2_length)
    fed = 0
    for chunk in split(blob, cuts):
        try:
            header = decoder.feed(chunk)
        except ProxyProtocolError:
            with pytest.raises(ProxyProtocolError):
                decoder.feed(b"\r")
            return
        fed += len(chunk)
        assert decoder.buffered <= max(V1_MAX_LENGTH, max_v2_length)
        if header is not None:
            assert decoder.header_length + len(decoder.remainder) == fed
            assert decoder.remainder == blob[decoder.header_length : fed]
            again, rest = decode(blob[: decoder.header_length], max_v2_length=max_v2_length)
            assert (again, rest) == (header, b"")
            return
    assert decoder.buffered == fed
    with pytest.raises(ProxyProtocolError):
        decoder.feed_eof()


@given(arbitrary_bytes, st.data())
def test_arbitrary_bytes_give_only_a_header_need_more_or_a_protocol_error(
    blob: bytes, data: st.DataObject
) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=8))
    assert_decoder_is_well_behaved(blob, cuts, DEFAULT_MAX_V2_LENGTH)


@given(mutated_wires(), st.data())
def test_mutated_headers_give_only_a_header_need_more_or_a_protocol_error(
    blob: bytes, data: st.DataObject
) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(blob)), max_size=8))
    max_v2_length = data.draw(st.sampled_from([DEFAULT_MAX_V2_LENGTH, MAX_V2_LENGTH, 64]))
    assert_decoder_is_well_behaved(blob, cuts, max_v2_length)


@given(st.sampled_from(["TCP4", "TCP6", "UNIX"]), st.data())
def test_any_bit_flip_in_the_addresses_of_a_crc32c_header_is_rejected(
    family: str, data: st.DataObject
) -> None:
    endpoints = {"TCP4": ipv4_endpoints, "TCP6": ipv6_endpoints, "UNIX": unix_paths}[family]
    wire = bytearray(encode_v2(data.draw(endpoints), data.draw(endpoints), crc32c=True))
    block = {"TCP4": 12, "TCP6": 36, "UNIX": 216}[family]
    index = data.draw(st.integers(16, 16 + block - 1))
    wire[index] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(ProxyProtocolError, match="v2: bad CRC32C"):
        decode(bytes(wire))


# ----------------------------------------------------------------------------- decoder contract


def test_decoder_returns_none_while_the_header_is_incomplete() -> None:
    decoder = ProxyDecoder()
    assert decoder.feed(b"PROXY TCP4 1.2.3.4 ") is None
    assert decoder.header is None
    assert decoder.remainder == b""


def test_decoder_leaves_session_bytes_in_remainder_when_fed_in_one_chunk() -> None:
    session = bytes(range(256)) * 256
    decoder = ProxyDecoder()
    header = decoder.feed(HAPROXY_V2_TCP4 + session)
    assert header is not None
    assert decoder.header_length == len(HAPROXY_V2_TCP4)
    assert decoder.remainder == session
    assert decoder.buffered == 0


def test_decoder_never_buffers_more_than_a_v1_line_while_waiting() -> None:
    decoder = ProxyDecoder()
    decoder.feed(b"PROXY UNKNOWN ")
    for _ in range(V1_MAX_LENGTH - 16):
        decoder.feed(b"x")
        assert decoder.buffered <= V1_MAX_LENGTH


def test_decoder_never_buffers_more_than_max_v2_length() -> None:
    body = bytes(12) + tlv_bytes(TLV_NOOP, bytes(100))
    wire = v2_fixed(0x21, 0x11, len(body)) + body
    decoder = ProxyDecoder(max_v2_length=len(wire))
    for index in range(len(wire) - 1):
        decoder.feed(wire[index : index + 1])
        assert decoder.buffered <= len(wire)
    assert decoder.feed(wire[-1:]) is not None


def test_feeding_after_the_header_is_a_usage_error() -> None:
    decoder = ProxyDecoder()
    decoder.feed(HAPROXY_V2_TCP4)
    with pytest.raises(RuntimeError, match="already decoded"):
        decoder.feed(b"more")


def test_decoder_error_is_sticky() -> None:
    decoder = ProxyDecoder()
    with pytest.raises(ProxyProtocolError, match="first byte 0x47"):
        decoder.feed(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ProxyProtocolError, match="first byte 0x47"):
        decoder.feed(b"PROXY UNKNOWN\r\n")


def test_eof_after_a_complete_header_is_fine() -> None:
    decoder = ProxyDecoder()
    decoder.feed(b"PROXY UNKNOWN\r\n")
    decoder.feed_eof()


def test_eof_before_any_byte_is_an_incomplete_header() -> None:
    with pytest.raises(ProxyProtocolError, match="incomplete header: no bytes received"):
        ProxyDecoder().feed_eof()


def test_eof_inside_a_v2_header_says_how_much_was_missing() -> None:
    decoder = ProxyDecoder()
    decoder.feed(HAPROXY_V2_TCP4[:20])
    with pytest.raises(ProxyProtocolError, match=r"v2: truncated header \(20 of 28 bytes\)"):
        decoder.feed_eof()


def test_decode_of_a_partial_header_raises() -> None:
    with pytest.raises(ProxyProtocolError, match=r"v2: truncated header \(10 of at least 16"):
        decode(HAPROXY_V2_TCP4[:10])


def test_decoder_with_v1_disallowed_rejects_a_v1_line_at_its_first_byte() -> None:
    with pytest.raises(ProxyProtocolError, match="v1: version 1 headers are not accepted"):
        ProxyDecoder(allow_v1=False).feed(b"P")


def test_decoder_with_v2_disallowed_rejects_a_v2_header_at_its_first_byte() -> None:
    with pytest.raises(ProxyProtocolError, match="v2: version 2 headers are not accepted"):
        ProxyDecoder(allow_v2=False).feed(b"\r")


def test_eof_after_an_error_repeats_the_error() -> None:
    decoder = ProxyDecoder()
    with pytest.raises(ProxyProtocolError, match="v2: bad signature"):
        decoder.feed(b"\r\r")
    with pytest.raises(ProxyProtocolError, match="v2: bad signature"):
        decoder.feed_eof()


def test_decoder_must_accept_at_least_one_version() -> None:
    with pytest.raises(ValueError, match="allow at least one of v1 and v2"):
        ProxyDecoder(allow_v1=False, allow_v2=False)


@pytest.mark.parametrize("limit", [15, MAX_V2_LENGTH + 1])
def test_decoder_refuses_a_max_v2_length_outside_what_the_format_allows(limit: int) -> None:
    with pytest.raises(ValueError, match=r"max_v2_length must be in 16\.\.65551"):
        ProxyDecoder(max_v2_length=limit)


# ----------------------------------------------------------------------------- precise errors


def test_first_byte_neither_p_nor_cr_is_rejected_at_once() -> None:
    with pytest.raises(ProxyProtocolError, match="first byte 0x16 is neither 'P'"):
        ProxyDecoder().feed(b"\x16")


def test_v2_bad_signature_is_rejected_at_the_first_wrong_byte() -> None:
    decoder = ProxyDecoder()
    assert decoder.feed(V2_SIGNATURE[:7]) is None
    with pytest.raises(ProxyProtocolError, match="v2: bad signature"):
        decoder.feed(b"X")


def test_v2_version_3_is_rejected() -> None:
    with pytest.raises(ProxyProtocolError, match="v2: unsupported version 3"):
        ProxyDecoder().feed(V2_SIGNATURE + b"\x31")


def test_v2_unknown_command_is_rejected() -> None:
    with pytest.raises(ProxyProtocolError, match="v2: unknown command 0x2"):
        ProxyDecoder().feed(V2_SIGNATURE + b"\x22")


def test_v2_unknown_address_family_is_rejected() -> None:
    with pytest.raises(ProxyProtocolError, match="v2: unknown address family 0x4"):
        ProxyDecoder().feed(V2_SIGNATURE + b"\x21\x41")


def test_v2_unknown_transport_protocol_is_rejected() -> None:
    with pytest.raises(ProxyProtocolError, match="v2: unknown transport protocol 0x3"):
        ProxyDecoder().feed(V2_SIGNATURE + b"\x21\x13")


def test_v2_family_without_transport_is_rejected() -> None:
    with pytest.raises(ProxyProtocolError, match="v2: unsupported family/transport byte 0x10"):
        ProxyDecoder().feed(V2_SIGNATURE + b"\x21\x10")


@pytest.mark.parametrize(
    ("fam", "length", "family", "needed"),
    [(0x11, 11, "TCP4", 12), (0x21, 12, "TCP6", 36), (0x31, 215, "UNIX", 216)],
)
def test_v2_declared_length_too_short_for_the_familys_addresses_is_rejected(
    fam: int, length: int, family: str, needed: int
) -> None:
    message = rf"v2: declared length {length} too short for {family} addresses \({needed} bytes\)"
    with pytest.raises(ProxyProtocolError, match=message):
        ProxyDecoder().feed(v2_fixed(0x21, fam, length))


def test_v2_length_above_max_v2_length_is_rejected_before_the_body_arrives() -> None:
    decoder = ProxyDecoder(max_v2_length=100)
    with pytest.raises(ProxyProtocolError, match="v2: header of 117 bytes exceeds the 100-byte"):
        decoder.feed(v2_fixed(0x21, 0x11, 101))


def test_v2_default_limit_rejects_a_header_of_65535_declared_bytes() -> None:
    with pytest.raises(ProxyProtocolError, match="exceeds the 1536-byte limit"):
        ProxyDecoder().feed(v2_fixed(0x21, 0x11, 0xFFFF))


def test_v2_header_with_bad_crc32c_is_rejected() -> None:
    wire = bytearray(encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), crc32c=True))
    wire[-1] ^= 0xFF
    with pytest.raises(ProxyProtocolError, match="v2: bad CRC32C"):
        decode(bytes(wire))


def test_v2_crc32c_tlv_of_the_wrong_size_is_rejected() -> None:
    body = bytes(12) + tlv_bytes(TLV_CRC32C, bytes(3))
    with pytest.raises(ProxyProtocolError, match="v2: CRC32C TLV has 3 bytes instead of 4"):
        decode(v2_fixed(0x21, 0x11, len(body)) + body)


def test_v2_two_crc32c_tlvs_are_rejected() -> None:
    body = bytes(12) + tlv_bytes(TLV_CRC32C, bytes(4)) * 2
    with pytest.raises(ProxyProtocolError, match="v2: more than one CRC32C TLV"):
        decode(v2_fixed(0x21, 0x11, len(body)) + body)


def test_v2_unique_id_longer_than_128_bytes_is_rejected() -> None:
    body = bytes(12) + tlv_bytes(TLV_UNIQUE_ID, bytes(129))
    with pytest.raises(ProxyProtocolError, match="v2: UNIQUE_ID TLV of 129 bytes exceeds 128"):
        decode(v2_fixed(0x21, 0x11, len(body)) + body)


def test_v2_tlv_running_past_the_declared_length_is_rejected() -> None:
    body = bytes(12) + struct.pack("!BH", TLV_NOOP, 10) + b"abc"
    with pytest.raises(ProxyProtocolError, match="v2: TLV 0x04 declares 10 bytes but 3 remain"):
        decode(v2_fixed(0x21, 0x11, len(body)) + body)


def test_v2_trailing_bytes_too_short_for_a_tlv_are_rejected() -> None:
    body = bytes(12) + b"\x04\x00"
    with pytest.raises(ProxyProtocolError, match="v2: 2 trailing bytes are too short for a TLV"):
        decode(v2_fixed(0x21, 0x11, len(body)) + body)


def test_v2_authority_that_is_not_utf8_is_rejected() -> None:
    body = bytes(12) + tlv_bytes(TLV_AUTHORITY, b"\xff\xfe")
    with pytest.raises(ProxyProtocolError, match="v2: AUTHORITY TLV is not valid UTF-8"):
        decode(v2_fixed(0x21, 0x11, len(body)) + body)


def test_v1_without_crlf_is_rejected_when_the_connection_ends() -> None:
    with pytest.raises(ProxyProtocolError, match="v1: missing CRLF"):
        decode(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2")


def test_v1_ending_in_a_bare_lf_is_rejected() -> None:
    with pytest.raises(ProxyProtocolError, match=r"v1: missing CRLF \(line ends with a bare LF\)"):
        decode(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\nGET")


def test_v1_cr_not_followed_by_lf_is_rejected() -> None:
    with pytest.raises(ProxyProtocolError, match="v1: CR not followed by LF"):
        ProxyDecoder().feed(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX")


def test_v1_longer_than_107_bytes_is_rejected_without_waiting_for_more() -> None:
    decoder = ProxyDecoder()
    line = b"PROXY UNKNOWN " + b"x" * 200
    with pytest.raises(ProxyProtocolError, match="v1: header longer than 107 bytes"):
        decoder.feed(line)
    assert decoder.buffered == 0


def test_v1_with_crlf_at_bytes_107_and_108_is_rejected() -> None:
    line = b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n"
    assert len(line) == 108
    with pytest.raises(ProxyProtocolError, match="v1: header longer than 107 bytes"):
        decode(line)


def test_v1_junk_is_rejected_long_before_107_bytes() -> None:
    with pytest.raises(ProxyProtocolError, match="v1: unexpected byte b'x' in TCP4 line"):
        ProxyDecoder().feed(b"PROXY TCP4 1.2.3.4 x")


def test_v1_unknown_protocol_is_rejected_as_soon_as_it_is_spelled() -> None:
    with pytest.raises(ProxyProtocolError, match="v1: unknown protocol 'UDP'"):
        ProxyDecoder().feed(b"PROXY UDP")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 2\r\n", "v1: bad source port '70000'"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "v1: bad destination port '65536'"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n", "v1: bad source port '080'"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 2\r\n", r"v1: unexpected byte b'\+' in TCP4 line"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 0x50 2\r\n", r"v1: unexpected byte b'x' in TCP4 line"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n", "v1: fields must be separated by exactly one space"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8  2\r\n", "v1: fields must be separated by exactly one space"),
    ],
    ids=["port-70000", "port-65536", "leading-zero", "leading-plus", "hex", "empty", "double-sp"],
)
def test_v1_bad_port_is_rejected(line: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message):
        decode(line)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"PROXY TCP4 256.1.1.1 5.6.7.8 1 2\r\n", "v1: bad source address '256.1.1.1' for TCP4"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "v1: bad source address '01.2.3.4' for TCP4"),
        (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "v1: bad source address '1.2.3' for TCP4"),
        (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", "v1: bad destination address '::1' for TCP4"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "v1: bad source address '1.2.3.4' for TCP6"),
        (b"PROXY TCP6 ::1 1:2:3:4:5:6:7:8:9 1 2\r\n", "v1: bad destination address"),
    ],
    ids=["octet-256", "leading-zero", "three-octets", "v6-in-tcp4", "v4-in-tcp6", "nine-groups"],
)
def test_v1_bad_ip_is_rejected(line: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message):
        decode(line)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "v1: unknown protocol 'TCP5'"),
        (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "v1: unknown protocol 'tcp4'"),
        (b"PROXY UNKNOWNX\r\n", "v1: unknown protocol 'UNKNOWNX'"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "v1: expected 4 fields after TCP4, got 3"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "v1: too many fields after TCP4"),
        (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "v1: unknown protocol ''"),
        (b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n", "v1: line does not start with 'PROXY '"),
    ],
    ids=["tcp5", "lowercase", "unknownx", "missing-port", "extra-field", "double-space", "no-sp"],
)
def test_v1_malformed_line_is_rejected(line: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message):
        decode(line)


# ----------------------------------------------------------------------------- encoder errors


def test_encode_v1_rejects_addresses_of_different_families() -> None:
    with pytest.raises(ProxyProtocolError, match="source is IPv4 but destination is IPv6"):
        encode_v1(("1.2.3.4", 1), ("::ffff:5.6.7.8", 2))


def test_encode_v1_rejects_port_70000() -> None:
    with pytest.raises(ProxyProtocolError, match="v1: bad source port 70000"):
        encode_v1(("1.2.3.4", 70000), ("5.6.7.8", 2))


def test_encode_v1_rejects_a_bad_ip() -> None:
    with pytest.raises(ProxyProtocolError, match=r"v1: bad destination address 'example\.com'"):
        encode_v1(("1.2.3.4", 1), ("example.com", 2))


def test_encode_v1_rejects_a_scoped_ipv6_address() -> None:
    with pytest.raises(ProxyProtocolError, match="has a scope id"):
        encode_v1(("fe80::1%eth0", 1), ("fe80::2", 2))


def test_encode_v2_rejects_unique_id_longer_than_128_bytes() -> None:
    with pytest.raises(ProxyProtocolError, match="v2: UNIQUE_ID TLV of 129 bytes exceeds 128"):
        encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs=[TLV(TLV_UNIQUE_ID, bytes(129))])


def test_encode_v2_rejects_tlvs_that_overflow_the_16_bit_length() -> None:
    big = [TLV(TLV_NOOP, bytes(40000)), TLV(TLV_NOOP, bytes(40000))]
    with pytest.raises(ProxyProtocolError, match="exceed the 65535 the length field holds"):
        encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs=big)


def test_encode_v2_rejects_a_tlv_value_over_65535_bytes() -> None:
    with pytest.raises(ProxyProtocolError, match="value of 65536 bytes exceeds 65535"):
        encode_v2(command="LOCAL", tlvs=[TLV(TLV_NOOP, bytes(65536))])


def test_encode_v2_rejects_a_tlv_type_outside_one_byte() -> None:
    with pytest.raises(ProxyProtocolError, match="v2: TLV type 256 is not one byte"):
        encode_v2(command="LOCAL", tlvs=[TLV(256, b"")])


def test_encode_v2_wants_the_crc32c_flag_rather_than_a_crc32c_tlv() -> None:
    with pytest.raises(ProxyProtocolError, match="pass crc32c=True"):
        encode_v2(command="LOCAL", tlvs=[TLV(TLV_CRC32C, bytes(4))])


def test_encode_v2_local_with_addresses_is_rejected() -> None:
    with pytest.raises(ProxyProtocolError, match="a LOCAL header carries no addresses"):
        encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), command="LOCAL")


def test_encode_v2_with_only_one_address_is_rejected() -> None:
    with pytest.raises(ProxyProtocolError, match="give both source and destination"):
        encode_v2(("1.2.3.4", 1), None)


def test_encode_v2_unix_path_over_108_bytes_is_rejected() -> None:
    with pytest.raises(ProxyProtocolError, match="source path of 109 bytes exceeds 108"):
        encode_v2("/" + "x" * 108, "/y")


def test_encode_v2_unix_path_with_nul_is_rejected() -> None:
    with pytest.raises(ProxyProtocolError, match="destination path contains NUL"):
        encode_v2("/x", "/y\x00z")


def test_encode_v2_mixing_unix_and_inet_addresses_is_rejected() -> None:
    with pytest.raises(ProxyProtocolError, match="destination must be a str path for UNIX"):
        encode_v2("/x", ("1.2.3.4", 1))


def test_encode_v2_rejects_unspec_transport_with_addresses() -> None:
    with pytest.raises(ProxyProtocolError, match="transport must be STREAM or DGRAM"):
        encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), transport="UNSPEC")


def test_encode_v2_rejects_addresses_of_different_families() -> None:
    with pytest.raises(ProxyProtocolError, match="v2: source is IPv6 but destination is IPv4"):
        encode_v2(("::1", 1), ("1.2.3.4", 2))


def test_encode_rejects_tlvs_on_a_v1_header() -> None:
    header = ProxyHeader(
        1, "PROXY", "TCP4", "STREAM", ("1.2.3.4", 1), ("5.6.7.8", 2), (TLV(TLV_NOOP, b""),)
    )
    with pytest.raises(ProxyProtocolError, match="v1: cannot carry TLVs"):
        encode(header)


def test_encode_rejects_a_header_whose_addresses_contradict_its_family() -> None:
    header = ProxyHeader(2, "PROXY", "TCP6", "STREAM", ("1.2.3.4", 1), ("5.6.7.8", 2))
    with pytest.raises(ProxyProtocolError, match="v2: addresses make family TCP4, not TCP6"):
        encode(header)


@pytest.mark.parametrize("name", ["\x00", "\x00abstract\x00"], ids=["empty", "trailing-nul"])
def test_encode_v2_abstract_unix_name_that_padding_would_eat_is_rejected(name: str) -> None:
    with pytest.raises(ProxyProtocolError, match="abstract source name must be non-empty"):
        encode_v2(name, "/y")


def test_encode_rejects_a_v1_header_over_dgram() -> None:
    header = ProxyHeader(1, "PROXY", "TCP4", "DGRAM", ("1.2.3.4", 1), ("5.6.7.8", 2))
    with pytest.raises(ProxyProtocolError, match="v1: can only describe TCP4/TCP6 over STREAM"):
        encode(header)


def test_encode_rejects_an_unknown_version() -> None:
    header = ProxyHeader(3, "LOCAL", "UNSPEC", "UNSPEC", None, None)
    with pytest.raises(ProxyProtocolError, match="unsupported version 3"):
        encode(header)


def test_ssl_info_with_verify_over_32_bits_cannot_be_encoded() -> None:
    with pytest.raises(ProxyProtocolError, match="v2: SSL verify field 4294967296 is not 32 bits"):
        SSLInfo(client=SSL_CLIENT_SSL, verify=1 << 32).to_tlv()
