"""PROXY protocol v1/v2 codec (HAProxy's doc/proxy-protocol.txt), sans-IO.

Nothing here touches a socket or an event loop: the encoders return bytes for the
caller to write, and :class:`ProxyDecoder` is fed bytes as they arrive and says
when a complete header has been seen, keeping every byte after it in
:attr:`ProxyDecoder.remainder` for the session.

Decoding is strict: a byte sequence that does not exactly match the
specification raises :class:`ProxyProtocolError`, as early as the bytes seen so
far allow, so that a bad or hostile peer is dropped before it can make us
buffer anything. The decoder never holds more than one maximal header
(107 bytes for v1, ``max_v2_length`` for v2).

What the sender must respect (the receivers we forward to are less forgiving
than the specification):

* Write the whole header in one ``write()``, together with nothing that has to
  wait for it. nginx parses the header out of the first ``recv()`` only and
  drops the connection if it is cut short; Postfix peeks once with
  ``MSG_PEEK`` and does the same. The specification allows this ("the receiver
  may [...] simply drop the connection when receiving a partial header").
* Postfix (smtpd and postscreen, ``global/haproxy_srvr.c``) rejects
  ``PROXY UNKNOWN`` outright, because it would sidestep address-based access
  control; send a real TCP4/TCP6 line (the specification itself now advises
  against UNKNOWN on connections expected to be accepted). For v2 (Postfix
  3.5 and later) it accepts LOCAL, and PROXY only over TCP4/TCP6: UDP, UNIX
  and UNSPEC are "unsupported network protocol". It peeks at most 536 bytes
  (``HAPROXY_HEADER_MAX_LEN``, the minimum IPv4 MSS), so a v2 header with
  TLVs must stay within 536 bytes: 484 bytes of TLVs with IPv6 addresses.
* nginx limits a v1 line to 107 bytes (``NGX_PROXY_PROTOCOL_V1_MAX_HEADER``)
  and, since 1.13.11 (so 1.22 too), reads v2 headers up to 4096 bytes
  (``NGX_PROXY_PROTOCOL_MAX_HEADER``), but on a plain HTTP listener the header
  must also fit in the first ``client_header_buffer_size`` read (1k by
  default). The 107-byte limit therefore only bites v1, which this encoder
  can never exceed (104 bytes at most).
* Receivers differ on IPv4-mapped IPv6 addresses (Postfix rewrites
  ``::ffff:a.b.c.d`` to IPv4, others keep it), so :func:`encode_v1` never
  converts between families: both addresses must be of the same family.

Addresses come back in :mod:`ipaddress`'s canonical text (``str(ip_address(...))``)
whatever spelling the peer used, so decoded headers compare equal to the
headers the encoders were given in canonical form.

The ``family`` of a header uses v1's names for the address family: "TCP4" is
AF_INET and "TCP6" is AF_INET6 whether the transport is "STREAM" (TCP) or
"DGRAM" (UDP).
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from .vocabulary import HostPort

__all__ = [
    "DEFAULT_MAX_V2_LENGTH",
    "MAX_V2_LENGTH",
    "SSL_CLIENT_CERT_CONN",
    "SSL_CLIENT_CERT_SESS",
    "SSL_CLIENT_SSL",
    "TLV",
    "TLV_ALPN",
    "TLV_AUTHORITY",
    "TLV_CRC32C",
    "TLV_NETNS",
    "TLV_NOOP",
    "TLV_SSL",
    "TLV_SUBTYPE_SSL_CIPHER",
    "TLV_SUBTYPE_SSL_CN",
    "TLV_SUBTYPE_SSL_KEY_ALG",
    "TLV_SUBTYPE_SSL_SIG_ALG",
    "TLV_SUBTYPE_SSL_VERSION",
    "TLV_UNIQUE_ID",
    "UNIQUE_ID_MAX_LENGTH",
    "UNIX_PATH_MAX_LENGTH",
    "V1_MAX_LENGTH",
    "V2_HEADER_LENGTH",
    "V2_SIGNATURE",
    "HeaderAddress",
    "Command",
    "Family",
    "ProxyDecoder",
    "ProxyHeader",
    "ProxyProtocolError",
    "SSLInfo",
    "Transport",
    "crc32c",
    "decode",
    "encode",
    "encode_v1",
    "encode_v1_unknown",
    "encode_v2",
]

Command = Literal["PROXY", "LOCAL"]
Family = Literal["TCP4", "TCP6", "UNIX", "UNSPEC"]
Transport = Literal["STREAM", "DGRAM", "UNSPEC"]
#: ``(ip, port)`` for TCP4/TCP6, a path for UNIX.
HeaderAddress = HostPort | str

V1_MAX_LENGTH: Final = 107
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_LENGTH: Final = 16
#: The 16-bit length field bounds every v2 header.
MAX_V2_LENGTH: Final = V2_HEADER_LENGTH + 0xFFFF
#: Generous for addresses plus the usual TLVs, small enough that a peer cannot
#: make us hold much per pending connection.
DEFAULT_MAX_V2_LENGTH: Final = 1536
UNIQUE_ID_MAX_LENGTH: Final = 128
UNIX_PATH_MAX_LENGTH: Final = 108

TLV_ALPN: Final = 0x01
TLV_AUTHORITY: Final = 0x02
TLV_CRC32C: Final = 0x03
TLV_NOOP: Final = 0x04
TLV_UNIQUE_ID: Final = 0x05
TLV_SSL: Final = 0x20
TLV_SUBTYPE_SSL_VERSION: Final = 0x21
TLV_SUBTYPE_SSL_CN: Final = 0x22
TLV_SUBTYPE_SSL_CIPHER: Final = 0x23
TLV_SUBTYPE_SSL_SIG_ALG: Final = 0x24
TLV_SUBTYPE_SSL_KEY_ALG: Final = 0x25
TLV_NETNS: Final = 0x30

SSL_CLIENT_SSL: Final = 0x01
SSL_CLIENT_CERT_CONN: Final = 0x02
SSL_CLIENT_CERT_SESS: Final = 0x04

_V1_PREFIX: Final = b"PROXY "
_V2_VERSION: Final = 0x2
_V2_COMMANDS: Final[dict[int, Command]] = {0x0: "LOCAL", 0x1: "PROXY"}
_V2_COMMAND_BITS: Final[dict[Command, int]] = {"LOCAL": 0x0, "PROXY": 0x1}

# The only family/transport bytes the specification lists ("in practice, the
# following protocol bytes are expected"), with the size of their address block.
_V2_FAMILIES: Final[dict[int, tuple[Family, Transport, int]]] = {
    0x00: ("UNSPEC", "UNSPEC", 0),
    0x11: ("TCP4", "STREAM", 12),
    0x12: ("TCP4", "DGRAM", 12),
    0x21: ("TCP6", "STREAM", 36),
    0x22: ("TCP6", "DGRAM", 36),
    0x31: ("UNIX", "STREAM", 216),
    0x32: ("UNIX", "DGRAM", 216),
}
_V2_FAMILY_BYTES: Final[dict[tuple[Family, Transport], int]] = {
    (fam, transport): byte for byte, (fam, transport, _) in _V2_FAMILIES.items()
}

_TLV_HEADER: Final = struct.Struct("!BH")
_V2_FIXED: Final = struct.Struct("!12sBBH")
_SSL_HEADER: Final = struct.Struct("!BI")
_CRC32C_LENGTH: Final = 4
_SSL_STRING_SUBTYPES: Final = frozenset(
    {
        TLV_SUBTYPE_SSL_VERSION,
        TLV_SUBTYPE_SSL_CN,
        TLV_SUBTYPE_SSL_CIPHER,
        TLV_SUBTYPE_SSL_SIG_ALG,
        TLV_SUBTYPE_SSL_KEY_ALG,
    }
)

# The spec forbids heading zeroes so that no receiver mistakes a port for octal.
_V1_PORT: Final = re.compile(rb"0|[1-9][0-9]{0,4}")
# Every byte the address and port fields of a TCP4/TCP6 line may hold, checked
# as bytes arrive so that junk is refused long before the 107th byte.
_V1_ADDRESS_BYTES: Final = frozenset(b"0123456789abcdefABCDEF:.")
_V1_PROTOCOLS: Final = (b"TCP4", b"TCP6", b"UNKNOWN")


class ProxyProtocolError(ValueError):
    """Bytes that are not a valid PROXY header, or arguments that cannot be encoded."""


@dataclass(frozen=True, slots=True)
class TLV:
    """One v2 type-length-value vector; ``value`` excludes the 3-byte type/length."""

    type: int
    value: bytes


@dataclass(frozen=True, slots=True)
class SSLInfo:
    """The value of a ``TLV_SSL`` vector: what the proxy knows of the client's TLS.

    ``client`` is a bit field of ``SSL_CLIENT_*``; ``verify`` is zero when the
    client presented a certificate that was successfully verified.
    """

    client: int
    verify: int
    tlvs: tuple[TLV, ...] = ()

    @classmethod
    def from_value(cls, value: bytes) -> SSLInfo:
        if len(value) < _SSL_HEADER.size:
            raise ProxyProtocolError(
                f"v2: SSL TLV of {len(value)} bytes is shorter than its 5-byte client/verify part"
            )
        client, verify = _SSL_HEADER.unpack_from(value)
        sub_tlvs = _parse_tlvs(value, _SSL_HEADER.size, "SSL sub-TLV")
        for tlv in sub_tlvs:
            if tlv.type in _SSL_STRING_SUBTYPES:
                _require_utf8(tlv, f"SSL sub-TLV 0x{tlv.type:02x}")
        return cls(client=client, verify=verify, tlvs=sub_tlvs)

    def to_tlv(self) -> TLV:
        if not 0 <= self.client <= 0xFF:
            raise ProxyProtocolError(f"v2: SSL client field {self.client} is not one byte")
        if not 0 <= self.verify <= 0xFFFFFFFF:
            raise ProxyProtocolError(f"v2: SSL verify field {self.verify} is not 32 bits")
        for tlv in self.tlvs:
            if tlv.type in _SSL_STRING_SUBTYPES:
                _require_utf8(tlv, f"SSL sub-TLV 0x{tlv.type:02x}")
        body = _SSL_HEADER.pack(self.client, self.verify) + _pack_tlvs(self.tlvs)
        return TLV(TLV_SSL, body)

    def _text(self, subtype: int) -> str | None:
        for tlv in self.tlvs:
            if tlv.type == subtype:
                return tlv.value.decode("utf-8")
        return None

    @property
    def version(self) -> str | None:
        return self._text(TLV_SUBTYPE_SSL_VERSION)

    @property
    def cn(self) -> str | None:
        return self._text(TLV_SUBTYPE_SSL_CN)

    @property
    def cipher(self) -> str | None:
        return self._text(TLV_SUBTYPE_SSL_CIPHER)

    @property
    def sig_alg(self) -> str | None:
        return self._text(TLV_SUBTYPE_SSL_SIG_ALG)

    @property
    def key_alg(self) -> str | None:
        return self._text(TLV_SUBTYPE_SSL_KEY_ALG)


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A decoded PROXY header, or the description of one to encode with :func:`encode`.

    ``source``/``destination`` are ``(ip, port)`` for TCP4/TCP6, a path for
    UNIX, and None for LOCAL and UNSPEC (v1 ``UNKNOWN`` decodes as LOCAL: in
    both cases the receiver must use the real connection's endpoints).
    ``tlvs`` are in wire order and include a CRC32C vector when one was sent
    (it has been verified by then).
    """

    version: int
    command: Command
    family: Family
    transport: Transport
    source: HeaderAddress | None
    destination: HeaderAddress | None
    tlvs: tuple[TLV, ...] = ()

    def get_tlv(self, tlv_type: int) -> bytes | None:
        """The value of the first vector of this type, if any."""
        for tlv in self.tlvs:
            if tlv.type == tlv_type:
                return tlv.value
        return None

    @property
    def unique_id(self) -> bytes | None:
        return self.get_tlv(TLV_UNIQUE_ID)

    @property
    def authority(self) -> str | None:
        value = self.get_tlv(TLV_AUTHORITY)
        # The decoder has checked it is UTF-8; a hand-built header may not be.
        return None if value is None else value.decode("utf-8", "replace")

    @property
    def alpn(self) -> bytes | None:
        return self.get_tlv(TLV_ALPN)

    def ssl_info(self) -> SSLInfo | None:
        """Parse the SSL vector; raises ProxyProtocolError if it is malformed.

        The decoder keeps SSL vectors opaque, as HAProxy does, so that a peer's
        odd SSL details never cost the connection unless someone asks for them.
        """
        value = self.get_tlv(TLV_SSL)
        return None if value is None else SSLInfo.from_value(value)


def crc32c(data: bytes) -> int:
    """CRC32C (Castagnoli, RFC 4960 appendix B) as the CRC32C TLV carries it."""
    # Imported when first needed: most daemons never send or check a CRC32C TLV.
    import google_crc32c  # noqa: PLC0415

    return int(google_crc32c.value(bytes(data)))


# encode_v2's crc32c flag shadows the function inside it.
_crc32c = crc32c


# --------------------------------------------------------------------------- encoding


def _ip(text: str, what: str, version: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyProtocolError(f"v{version}: bad {what} address {text!r}") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None:
        # Neither format has room for a zone; dropping it silently would
        # advertise a different address.
        raise ProxyProtocolError(f"v{version}: {what} address {text!r} has a scope id")
    return addr


def _port(port: object, what: str, version: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ProxyProtocolError(f"v{version}: bad {what} port {port!r} (must be 0..65535)")
    return port


_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _endpoint(addr: object, what: str, version: int) -> tuple[_IP, int]:
    if not (isinstance(addr, tuple) and len(addr) == 2 and isinstance(addr[0], str)):
        raise ProxyProtocolError(f"v{version}: {what} must be an (ip, port) tuple")
    return _ip(addr[0], what, version), _port(addr[1], what, version)


def _inet_pair(source: object, destination: object, version: int) -> tuple[_IP, int, _IP, int]:
    src_ip, src_port = _endpoint(source, "source", version)
    dst_ip, dst_port = _endpoint(destination, "destination", version)
    if src_ip.version != dst_ip.version:
        raise ProxyProtocolError(
            f"v{version}: source is IPv{src_ip.version} but destination is IPv{dst_ip.version}"
            " (IPv4-mapped IPv6 addresses are not converted)"
        )
    return src_ip, src_port, dst_ip, dst_port


def encode_v1(source: HostPort, destination: HostPort) -> bytes:
    """A v1 ``PROXY TCP4|TCP6 ...`` line; the family follows the addresses."""
    src_ip, src_port, dst_ip, dst_port = _inet_pair(source, destination, 1)
    family = "TCP4" if src_ip.version == 4 else "TCP6"
    return f"PROXY {family} {src_ip} {dst_ip} {src_port} {dst_port}\r\n".encode("ascii")


def encode_v1_unknown() -> bytes:
    """``PROXY UNKNOWN``: for when the addresses cannot be told (Postfix refuses it)."""
    return b"PROXY UNKNOWN\r\n"


def _unix_path(path: object, what: str) -> bytes:
    if not isinstance(path, str):
        raise ProxyProtocolError(f"v2: {what} must be a str path for UNIX")
    raw = path.encode("utf-8", "surrogateescape")
    if len(raw) > UNIX_PATH_MAX_LENGTH:
        raise ProxyProtocolError(
            f"v2: {what} path of {len(raw)} bytes exceeds {UNIX_PATH_MAX_LENGTH} bytes"
        )
    # The block is NUL-padded with no length, so a NUL must not be mistaken
    # for padding: a filesystem path ends at its first NUL; an abstract name
    # (leading NUL, Linux) ends at its last non-NUL byte.
    if raw.startswith(b"\x00"):
        if len(raw) < 2 or raw.endswith(b"\x00"):
            raise ProxyProtocolError(
                f"v2: abstract {what} name must be non-empty and not end with NUL"
            )
    elif b"\x00" in raw:
        raise ProxyProtocolError(f"v2: {what} path contains NUL")
    return raw.ljust(UNIX_PATH_MAX_LENGTH, b"\x00")


def _require_utf8(tlv: TLV, what: str) -> None:
    try:
        tlv.value.decode("utf-8")
    except UnicodeDecodeError:
        raise ProxyProtocolError(f"v2: {what} is not valid UTF-8") from None


def _check_tlv(tlv: TLV) -> None:
    if not isinstance(tlv, TLV):
        raise ProxyProtocolError(f"v2: expected a TLV, got {type(tlv).__name__}")
    if not isinstance(tlv.type, int) or not 0 <= tlv.type <= 0xFF:
        raise ProxyProtocolError(f"v2: TLV type {tlv.type!r} is not one byte")
    if not isinstance(tlv.value, bytes):
        raise ProxyProtocolError(f"v2: TLV 0x{tlv.type:02x} value must be bytes")
    if len(tlv.value) > 0xFFFF:
        raise ProxyProtocolError(
            f"v2: TLV 0x{tlv.type:02x} value of {len(tlv.value)} bytes exceeds 65535"
        )
    _check_tlv_value(tlv)


def _check_tlv_value(tlv: TLV) -> None:
    """Rules shared by the encoder and the decoder for registered types."""
    if tlv.type == TLV_UNIQUE_ID and len(tlv.value) > UNIQUE_ID_MAX_LENGTH:
        raise ProxyProtocolError(
            f"v2: UNIQUE_ID TLV of {len(tlv.value)} bytes exceeds {UNIQUE_ID_MAX_LENGTH} bytes"
        )
    if tlv.type == TLV_AUTHORITY:
        _require_utf8(tlv, "AUTHORITY TLV")


def _pack_tlvs(tlvs: Sequence[TLV]) -> bytes:
    return b"".join(_TLV_HEADER.pack(t.type, len(t.value)) + t.value for t in tlvs)


def encode_v2(
    source: HeaderAddress | None = None,
    destination: HeaderAddress | None = None,
    *,
    command: Command = "PROXY",
    tlvs: Sequence[TLV] = (),
    crc32c: bool = False,
    transport: Transport = "STREAM",
) -> bytes:
    """A v2 binary header.

    LOCAL takes no addresses (family UNSPEC). PROXY takes ``(ip, port)`` pairs
    (TCP4/TCP6 by their family), two str paths (UNIX, at most 108 bytes each),
    or no addresses at all (UNSPEC: "relayed, but from somewhere I cannot
    describe"). ``transport`` is "STREAM" or "DGRAM" and is ignored for
    LOCAL/UNSPEC. With ``crc32c=True`` a CRC32C vector is appended last and
    filled in.
    """
    if command not in _V2_COMMAND_BITS:
        raise ProxyProtocolError(f"v2: unknown command {command!r}")
    if (source is None) != (destination is None):
        raise ProxyProtocolError("v2: give both source and destination, or neither")
    family: Family
    if command == "LOCAL":
        if source is not None:
            raise ProxyProtocolError("v2: a LOCAL header carries no addresses")
        family, transport, block = "UNSPEC", "UNSPEC", b""
    elif source is None:
        family, transport, block = "UNSPEC", "UNSPEC", b""
    else:
        if transport not in ("STREAM", "DGRAM"):
            raise ProxyProtocolError(
                f"v2: transport must be STREAM or DGRAM with addresses, not {transport!r}"
            )
        if isinstance(source, str) or isinstance(destination, str):
            family = "UNIX"
            block = _unix_path(source, "source") + _unix_path(destination, "destination")
        else:
            src_ip, src_port, dst_ip, dst_port = _inet_pair(source, destination, 2)
            family = "TCP4" if src_ip.version == 4 else "TCP6"
            ports = struct.pack("!HH", src_port, dst_port)
            block = src_ip.packed + dst_ip.packed + ports

    for tlv in tlvs:
        _check_tlv(tlv)
        if tlv.type == TLV_CRC32C:
            raise ProxyProtocolError("v2: pass crc32c=True instead of a CRC32C TLV")
    all_tlvs = list(tlvs)
    if crc32c:
        all_tlvs.append(TLV(TLV_CRC32C, bytes(_CRC32C_LENGTH)))
    body = block + _pack_tlvs(all_tlvs)
    if len(body) > 0xFFFF:
        raise ProxyProtocolError(
            f"v2: {len(body)} bytes of addresses and TLVs exceed the 65535 the length field holds"
        )
    fixed = _V2_FIXED.pack(
        V2_SIGNATURE,
        (_V2_VERSION << 4) | _V2_COMMAND_BITS[command],
        _V2_FAMILY_BYTES[family, transport],
        len(body),
    )
    header = fixed + body
    if crc32c:
        # Computed with the value zeroed, then written in place; the CRC
        # vector is last, so its value is the last four bytes.
        header = header[:-_CRC32C_LENGTH] + struct.pack("!I", _crc32c(header))
    return header


def encode(header: ProxyHeader) -> bytes:
    """Encode a :class:`ProxyHeader` (e.g. one received, to pass it on).

    A CRC32C vector in ``header.tlvs`` asks for a checksum: it is recomputed
    and placed last.
    """
    if header.version == 1:
        if header.tlvs:
            raise ProxyProtocolError("v1: cannot carry TLVs")
        if header.command == "LOCAL":
            return encode_v1_unknown()
        if header.transport != "STREAM" or header.family not in ("TCP4", "TCP6"):
            raise ProxyProtocolError(
                f"v1: can only describe TCP4/TCP6 over STREAM, not "
                f"{header.family}/{header.transport}"
            )
        if not isinstance(header.source, tuple) or not isinstance(header.destination, tuple):
            raise ProxyProtocolError("v1: source and destination must be (ip, port) tuples")
        line = encode_v1(header.source, header.destination)
        if line[6:10].decode("ascii") != header.family:
            raise ProxyProtocolError(f"v1: addresses do not match family {header.family}")
        return line
    if header.version != 2:
        raise ProxyProtocolError(f"unsupported version {header.version}")
    want_crc = any(t.type == TLV_CRC32C for t in header.tlvs)
    tlvs = [t for t in header.tlvs if t.type != TLV_CRC32C]
    if header.command == "LOCAL":
        return encode_v2(command="LOCAL", tlvs=tlvs, crc32c=want_crc)
    wire = encode_v2(
        header.source,
        header.destination,
        command=header.command,
        tlvs=tlvs,
        crc32c=want_crc,
        transport=header.transport,
    )
    family, _, _ = _V2_FAMILIES[wire[13]]
    if family != header.family:
        raise ProxyProtocolError(f"v2: addresses make family {family}, not {header.family}")
    return wire


# --------------------------------------------------------------------------- decoding


def _parse_tlvs(data: bytes, start: int, what: str) -> tuple[TLV, ...]:
    tlvs: list[TLV] = []
    offset = start
    while offset < len(data):
        if len(data) - offset < _TLV_HEADER.size:
            raise ProxyProtocolError(
                f"v2: {len(data) - offset} trailing bytes are too short for a {what}"
            )
        tlv_type, length = _TLV_HEADER.unpack_from(data, offset)
        offset += _TLV_HEADER.size
        if offset + length > len(data):
            raise ProxyProtocolError(
                f"v2: {what} 0x{tlv_type:02x} declares {length} bytes but "
                f"{len(data) - offset} remain"
            )
        tlvs.append(TLV(tlv_type, data[offset : offset + length]))
        offset += length
    return tuple(tlvs)


def _decode_unix_path(raw: bytes) -> str:
    # See _unix_path; an all-NUL block (unnamed socket) strips to "".
    raw = raw.rstrip(b"\x00") if raw.startswith(b"\x00") else raw.split(b"\x00", 1)[0]
    return raw.decode("utf-8", "surrogateescape")


def _parse_v2(header: bytes) -> ProxyHeader:
    """Parse a complete v2 header whose fixed part the decoder already vetted."""
    _, ver_cmd, fam_byte, _ = _V2_FIXED.unpack_from(header)
    command = _V2_COMMANDS[ver_cmd & 0x0F]
    family, transport, block_len = _V2_FAMILIES[fam_byte]
    block = header[V2_HEADER_LENGTH : V2_HEADER_LENGTH + block_len]
    source: HeaderAddress | None = None
    destination: HeaderAddress | None = None
    if command == "LOCAL":
        # "discard the protocol block including the family which is ignored"
        family, transport = "UNSPEC", "UNSPEC"
    elif family == "TCP4":
        src_port, dst_port = struct.unpack_from("!HH", block, 8)
        source = (str(ipaddress.IPv4Address(block[0:4])), src_port)
        destination = (str(ipaddress.IPv4Address(block[4:8])), dst_port)
    elif family == "TCP6":
        src_port, dst_port = struct.unpack_from("!HH", block, 32)
        source = (str(ipaddress.IPv6Address(block[0:16])), src_port)
        destination = (str(ipaddress.IPv6Address(block[16:32])), dst_port)
    elif family == "UNIX":
        source = _decode_unix_path(block[:UNIX_PATH_MAX_LENGTH])
        destination = _decode_unix_path(block[UNIX_PATH_MAX_LENGTH:])

    tlvs = _parse_tlvs(header, V2_HEADER_LENGTH + block_len, "TLV")
    crc_offset: int | None = None
    offset = V2_HEADER_LENGTH + block_len
    for tlv in tlvs:
        _check_tlv_value(tlv)
        if tlv.type == TLV_CRC32C:
            if len(tlv.value) != _CRC32C_LENGTH:
                raise ProxyProtocolError(
                    f"v2: CRC32C TLV has {len(tlv.value)} bytes instead of {_CRC32C_LENGTH}"
                )
            if crc_offset is not None:
                raise ProxyProtocolError("v2: more than one CRC32C TLV")
            crc_offset = offset + _TLV_HEADER.size
        offset += _TLV_HEADER.size + len(tlv.value)
    if crc_offset is not None:
        (sent,) = struct.unpack_from("!I", header, crc_offset)
        end = crc_offset + _CRC32C_LENGTH
        zeroed = header[:crc_offset] + bytes(_CRC32C_LENGTH) + header[end:]
        if crc32c(zeroed) != sent:
            raise ProxyProtocolError("v2: bad CRC32C")
    return ProxyHeader(2, command, family, transport, source, destination, tlvs)


def _parse_v1_port(text: bytes, what: str) -> int:
    if _V1_PORT.fullmatch(text) is None or int(text) > 0xFFFF:
        raise ProxyProtocolError(
            f"v1: bad {what} port {text.decode('ascii', 'replace')!r} "
            "(must be 0..65535 without leading zeros)"
        )
    return int(text)


def _parse_v1_address(text: bytes, what: str, family: str) -> str:
    shown = text.decode("ascii", "replace")
    cls = ipaddress.IPv4Address if family == "TCP4" else ipaddress.IPv6Address
    try:
        # ipaddress refuses IPv4 heading zeroes, as the spec does; the byte
        # check keeps out scope ids and non-ASCII digits.
        if not set(text) <= _V1_ADDRESS_BYTES:
            raise ValueError(shown)
        addr = cls(text.decode("ascii"))
    except ValueError:
        raise ProxyProtocolError(f"v1: bad {what} address {shown!r} for {family}") from None
    return str(addr)


def _parse_v1(line: bytes) -> ProxyHeader:
    """Parse a complete v1 line, CRLF included."""
    body = line[:-2]
    if b"\r" in body or b"\n" in body:
        raise ProxyProtocolError("v1: stray CR or LF inside the line")
    if not body.startswith(_V1_PREFIX):
        raise ProxyProtocolError("v1: line does not start with 'PROXY '")
    fields = body.split(b" ")
    protocol = fields[1]
    if protocol == b"UNKNOWN":
        # "the receiver must ignore anything presented before the CRLF"
        return ProxyHeader(1, "LOCAL", "UNSPEC", "UNSPEC", None, None)
    if protocol not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError(
            f"v1: unknown protocol {protocol.decode('ascii', 'replace')!r} "
            "(expected TCP4, TCP6 or UNKNOWN)"
        )
    family: Family = "TCP4" if protocol == b"TCP4" else "TCP6"
    if b"" in fields:
        raise ProxyProtocolError("v1: fields must be separated by exactly one space")
    if len(fields) != 6:
        raise ProxyProtocolError(f"v1: expected 4 fields after {family}, got {len(fields) - 2}")
    source = _parse_v1_address(fields[2], "source", family)
    destination = _parse_v1_address(fields[3], "destination", family)
    src_port = _parse_v1_port(fields[4], "source")
    dst_port = _parse_v1_port(fields[5], "destination")
    return ProxyHeader(1, "PROXY", family, "STREAM", (source, src_port), (destination, dst_port))


def _check_v1_partial(buf: bytearray) -> None:
    """Refuse a v1 line as soon as its first bytes rule it out.

    Called with the bytes so far, none of which is LF (the decoder stops at the
    first LF); the full parse at CRLF has the last word.
    """
    head = bytes(buf[: len(_V1_PREFIX)])
    if not _V1_PREFIX.startswith(head):
        raise ProxyProtocolError("v1: line does not start with 'PROXY '")
    cr = buf.find(b"\r")
    if cr != -1 and cr != len(buf) - 1:
        raise ProxyProtocolError("v1: CR not followed by LF")
    if len(buf) >= V1_MAX_LENGTH - 1 and buf[V1_MAX_LENGTH - 2] != ord("\r"):
        # The CR of the CRLF can no longer come in time.
        raise ProxyProtocolError(f"v1: header longer than {V1_MAX_LENGTH} bytes (no CRLF)")
    rest = bytes(buf[len(_V1_PREFIX) :]).rstrip(b"\r")
    protocol, space, _ = rest.partition(b" ")
    if not space:
        if not any(p.startswith(protocol) for p in _V1_PROTOCOLS):
            raise ProxyProtocolError(
                f"v1: unknown protocol {protocol.decode('ascii', 'replace')!r} "
                "(expected TCP4, TCP6 or UNKNOWN)"
            )
        return
    if protocol == b"UNKNOWN":
        return
    if protocol not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError(
            f"v1: unknown protocol {protocol.decode('ascii', 'replace')!r} "
            "(expected TCP4, TCP6 or UNKNOWN)"
        )
    for byte in rest[len(protocol) + 1 :]:
        if byte not in _V1_ADDRESS_BYTES and byte != ord(" "):
            raise ProxyProtocolError(
                f"v1: unexpected byte {bytes([byte])!r} in {protocol.decode()} line"
            )
    if b"  " in rest:
        raise ProxyProtocolError("v1: fields must be separated by exactly one space")
    if rest.count(b" ") > 4:
        raise ProxyProtocolError(f"v1: too many fields after {protocol.decode()}")


def _check_v2_fixed(buf: bytearray, max_length: int) -> int | None:
    """Vet the 16-byte fixed part as it arrives; return the total length once known."""
    sig = bytes(buf[: len(V2_SIGNATURE)])
    if not V2_SIGNATURE.startswith(sig):
        raise ProxyProtocolError("v2: bad signature")
    if len(buf) > 12:
        version, command = buf[12] >> 4, buf[12] & 0x0F
        if version != _V2_VERSION:
            raise ProxyProtocolError(f"v2: unsupported version {version}")
        if command not in _V2_COMMANDS:
            raise ProxyProtocolError(f"v2: unknown command 0x{command:x}")
    if len(buf) > 13:
        fam = buf[13]
        if fam >> 4 > 0x3:
            raise ProxyProtocolError(f"v2: unknown address family 0x{fam >> 4:x}")
        if fam & 0x0F > 0x2:
            raise ProxyProtocolError(f"v2: unknown transport protocol 0x{fam & 0x0F:x}")
        if fam not in _V2_FAMILIES:
            raise ProxyProtocolError(f"v2: unsupported family/transport byte 0x{fam:02x}")
    if len(buf) < V2_HEADER_LENGTH:
        return None
    length = int.from_bytes(buf[14:16], "big")
    total = V2_HEADER_LENGTH + length
    if total > max_length:
        raise ProxyProtocolError(f"v2: header of {total} bytes exceeds the {max_length}-byte limit")
    # LOCAL too: its family, though ignored, still says where the TLVs start.
    family, _, block_len = _V2_FAMILIES[buf[13]]
    if length < block_len:
        raise ProxyProtocolError(
            f"v2: declared length {length} too short for {family} addresses ({block_len} bytes)"
        )
    return total


class ProxyDecoder:
    """Incremental decoder for one connection's PROXY header (v1 or v2).

    Call :meth:`feed` with each chunk received: it returns None while more
    bytes are needed, the :class:`ProxyHeader` once complete, or raises
    :class:`ProxyProtocolError` as soon as the bytes cannot be a valid header.
    After the header, :attr:`remainder` holds the bytes that followed it in
    the last chunk; they belong to the session. Errors are sticky: every later
    call raises again. Call :meth:`feed_eof` when the peer closes, to turn a
    truncated header into a precise error.
    """

    __slots__ = (
        "_allow_v1",
        "_allow_v2",
        "_buf",
        "_error",
        "_header",
        "_header_length",
        "_max_v2_length",
        "_remainder",
        "_v2_total",
        "_version",
    )

    def __init__(
        self,
        *,
        allow_v1: bool = True,
        allow_v2: bool = True,
        max_v2_length: int = DEFAULT_MAX_V2_LENGTH,
    ) -> None:
        if not (allow_v1 or allow_v2):
            raise ValueError("allow at least one of v1 and v2")
        if not V2_HEADER_LENGTH <= max_v2_length <= MAX_V2_LENGTH:
            raise ValueError(
                f"max_v2_length must be in {V2_HEADER_LENGTH}..{MAX_V2_LENGTH}, not {max_v2_length}"
            )
        self._allow_v1 = allow_v1
        self._allow_v2 = allow_v2
        self._max_v2_length = max_v2_length
        self._buf = bytearray()
        self._version: int | None = None
        self._v2_total: int | None = None
        self._header: ProxyHeader | None = None
        self._header_length = 0
        self._remainder = b""
        self._error: ProxyProtocolError | None = None

    @property
    def header(self) -> ProxyHeader | None:
        return self._header

    @property
    def header_length(self) -> int:
        """How many bytes the header took on the wire (0 until it is complete)."""
        return self._header_length

    @property
    def remainder(self) -> bytes:
        """The bytes after the header in the chunk that completed it (b"" before)."""
        return self._remainder

    @property
    def buffered(self) -> int:
        """Bytes held while waiting for the rest of the header."""
        return len(self._buf)

    def feed(self, data: bytes) -> ProxyHeader | None:
        if self._header is not None:
            raise RuntimeError("header already decoded: later bytes belong to the session")
        if self._error is not None:
            raise ProxyProtocolError(*self._error.args)
        try:
            return self._feed(data)
        except ProxyProtocolError as exc:
            self._error = exc
            self._buf.clear()
            raise

    def feed_eof(self) -> None:
        """The peer closed: raise if a header was started or expected but not finished."""
        if self._header is not None:
            return
        raise self._truncated()

    def _truncated(self) -> ProxyProtocolError:
        if self._error is not None:
            return ProxyProtocolError(*self._error.args)
        if self._version == 1:
            error = ProxyProtocolError(
                f"v1: missing CRLF (connection ended after {len(self._buf)} bytes)"
            )
        elif self._version == 2:
            need = self._v2_total if self._v2_total is not None else V2_HEADER_LENGTH
            qualifier = "" if self._v2_total is not None else "at least "
            error = ProxyProtocolError(
                f"v2: truncated header ({len(self._buf)} of {qualifier}{need} bytes)"
            )
        else:
            error = ProxyProtocolError("incomplete header: no bytes received")
        self._error = error
        self._buf.clear()
        return error

    def _feed(self, data: bytes) -> ProxyHeader | None:
        if not data:
            return None
        if self._version is None:
            self._version = self._detect(data[0])
        if self._version == 1:
            return self._feed_v1(data)
        return self._feed_v2(data)

    def _detect(self, first: int) -> int:
        if first == _V1_PREFIX[0]:
            if not self._allow_v1:
                raise ProxyProtocolError("v1: version 1 headers are not accepted here")
            return 1
        if first == V2_SIGNATURE[0]:
            if not self._allow_v2:
                raise ProxyProtocolError("v2: version 2 headers are not accepted here")
            return 2
        raise ProxyProtocolError(
            f"not a PROXY protocol header: first byte 0x{first:02x} is neither 'P' (v1) nor CR (v2)"
        )

    def _feed_v1(self, data: bytes) -> ProxyHeader | None:
        # Take bytes up to the first LF and never past the 107-byte limit, so
        # that nothing of the session's data is ever buffered here.
        room = V1_MAX_LENGTH - len(self._buf)
        lf = data.find(b"\n", 0, room)
        take = room if lf == -1 else lf + 1
        self._buf += data[:take]
        if lf == -1:
            _check_v1_partial(self._buf)
            if len(self._buf) >= V1_MAX_LENGTH:
                raise ProxyProtocolError(f"v1: header longer than {V1_MAX_LENGTH} bytes (no CRLF)")
            return None
        if len(self._buf) < 2 or self._buf[-2] != ord("\r"):
            raise ProxyProtocolError("v1: missing CRLF (line ends with a bare LF)")
        _check_v1_partial(self._buf[:-1])
        header = _parse_v1(bytes(self._buf))
        return self._done(header, data[take:])

    def _feed_v2(self, data: bytes) -> ProxyHeader | None:
        offset = 0
        if self._v2_total is None:
            take = min(V2_HEADER_LENGTH - len(self._buf), len(data))
            self._buf += data[:take]
            offset = take
            self._v2_total = _check_v2_fixed(self._buf, self._max_v2_length)
            if self._v2_total is None:
                return None
        take = min(self._v2_total - len(self._buf), len(data) - offset)
        self._buf += data[offset : offset + take]
        offset += take
        if len(self._buf) < self._v2_total:
            return None
        header = _parse_v2(bytes(self._buf))
        return self._done(header, data[offset:])

    def _done(self, header: ProxyHeader, rest: bytes) -> ProxyHeader:
        self._header = header
        self._header_length = len(self._buf)
        self._remainder = bytes(rest)
        self._buf = bytearray()
        return header


def decode(
    data: bytes,
    *,
    allow_v1: bool = True,
    allow_v2: bool = True,
    max_v2_length: int = DEFAULT_MAX_V2_LENGTH,
) -> tuple[ProxyHeader, bytes]:
    """Decode a header at the start of ``data``: ``(header, bytes after it)``.

    Raises ProxyProtocolError if ``data`` is invalid or holds only part of a header.
    """
    decoder = ProxyDecoder(allow_v1=allow_v1, allow_v2=allow_v2, max_v2_length=max_v2_length)
    header = decoder.feed(data)
    if header is None:
        raise decoder._truncated()
    return header, decoder.remainder
