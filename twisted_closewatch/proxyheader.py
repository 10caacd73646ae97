"""
The PROXY protocol header (v1 and v2), parsed strictly.

A load balancer that speaks the PROXY protocol starts every connection with
a header naming the original client.  Whatever follows is the client's own
bytes.  L{parse} is a pure function over the bytes received so far: it
answers "need more" (C{None}), a L{ProxyHeader} (whose C{length} says
exactly how many bytes the header took, so a caller can read, or peek,
precisely that much), or raises L{ProxyHeaderError}.  It never reads past
what the header's own framing allows: a v1 line ends within
L{V1_MAX_LENGTH} bytes, a v2 header within 16 + 65535.

What is refused: anything but the two signatures; a v1 line that is too
long, holds a control or non-ASCII character, has a field too many or too
few, an address that C{ipaddress} does not take for the protocol named, or
a port outside 0-65535; a v2 header of another version, an unknown
command, a datagram or unknown transport for a proxied connection, an
address block shorter than its family needs, or TLVs that overrun the
header.  What is accepted without addresses, so that the connection's own
are used: v1 C{UNKNOWN}, v2 C{LOCAL} (a health check from the balancer) and
v2 C{UNSPEC} or C{UNIX} families.

See U{https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt}.
"""

from __future__ import annotations

import ipaddress
import re
import struct

import attr
from twisted.internet.address import IPv4Address, IPv6Address

#: The longest v1 line, "\\r\\n" included (the specification's own bound).
V1_MAX_LENGTH = 107
#: What a v1 header starts with.
V1_SIGNATURE = b"PROXY "
#: What a v2 header starts with.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: The fixed part of a v2 header: signature, version and command, family
#: and protocol, and the length of what follows.
V2_FIXED_LENGTH = 16
#: The longest v2 header.
V2_MAX_LENGTH = V2_FIXED_LENGTH + 0xFFFF
#: The longest header of either version.
MAX_LENGTH = V2_MAX_LENGTH

_V1_PORT = re.compile(rb"[0-9]{1,5}")
_V1_PRINTABLE = re.compile(rb"[\x20-\x7e]*")
_V2_INET = 0x1
_V2_INET6 = 0x2
_V2_UNIX = 0x3
_V2_STREAM = 0x1
#: The size of a v2 AF_UNIX address block: two 108-byte paths.
_V2_UNIX_BLOCK = 216
#: v2 IP families: (address type, address block size, struct format, parser).
_V2_BLOCKS = {
    _V2_INET: (IPv4Address, 12, "!4s4sHH", ipaddress.IPv4Address),
    _V2_INET6: (IPv6Address, 36, "!16s16sHH", ipaddress.IPv6Address),
}


class ProxyHeaderError(ValueError):
    """
    The bytes received are not a valid PROXY header; the message says why,
    in one line, without echoing more than a few of the client's bytes.
    """


@attr.s(frozen=True, auto_attribs=True)
class ProxyHeader:
    """
    A parsed PROXY header.

    @ivar version: 1 or 2.
    @ivar length: how many bytes the header took.
    @ivar source: the original client's address, or C{None} when the header
        names none (v1 C{UNKNOWN}, v2 C{LOCAL}, a family other than IP):
        then the connection's own addresses stand.
    @ivar destination: the address the client connected to, or C{None}
        alongside C{source}.
    """

    version: int
    length: int
    source: IPv4Address | IPv6Address | None = None
    destination: IPv4Address | IPv6Address | None = None


def parse(data: bytes | bytearray | memoryview) -> ProxyHeader | None:
    """
    Parse the PROXY header at the start of C{data}.

    @return: the header, or C{None} if C{data} is a valid beginning of one
        and more bytes are needed.
    @raise ProxyHeaderError: C{data} does not start with a valid header.
    """
    data = memoryview(data)
    v2Prefix = bytes(data[: len(V2_SIGNATURE)])
    if v2Prefix and V2_SIGNATURE.startswith(v2Prefix):
        return _parseV2(data) if len(v2Prefix) == len(V2_SIGNATURE) else None
    v1Prefix = bytes(data[: len(V1_SIGNATURE)])
    if V1_SIGNATURE.startswith(v1Prefix):
        return _parseV1(data) if len(v1Prefix) == len(V1_SIGNATURE) else None
    raise ProxyHeaderError(f"not a PROXY header (starts with {v1Prefix[:8]!r})")


def _parseV1(data: memoryview) -> ProxyHeader | None:
    window = bytes(data[:V1_MAX_LENGTH])
    end = window.find(b"\r\n")
    if end >= 0:
        line = window[:end]
    else:  # a "\r" at the end may be the first half of the "\r\n" to come
        line = window.removesuffix(b"\r")
    if not _V1_PRINTABLE.fullmatch(line):
        raise ProxyHeaderError("v1 header holds a control or non-ASCII character")
    if end < 0:
        if len(window) >= V1_MAX_LENGTH:
            raise ProxyHeaderError(f"v1 header longer than {V1_MAX_LENGTH} bytes")
        return None
    length = end + 2
    fields = line.split(b" ")
    if fields[1:2] == [b"UNKNOWN"]:
        # The receiver must ignore whatever follows UNKNOWN on the line.
        return ProxyHeader(version=1, length=length)
    if len(fields) != 6:
        raise ProxyHeaderError(f"v1 header has {len(fields)} fields, not 6")
    _, proto, source, destination, sourcePort, destinationPort = fields
    if proto == b"TCP4":
        addressType: type[IPv4Address | IPv6Address] = IPv4Address
        parseIP: type[ipaddress.IPv4Address | ipaddress.IPv6Address] = ipaddress.IPv4Address
    elif proto == b"TCP6":
        addressType, parseIP = IPv6Address, ipaddress.IPv6Address
    else:
        raise ProxyHeaderError(f"v1 protocol {proto[:8]!r} is not TCP4, TCP6 or UNKNOWN")
    return ProxyHeader(
        version=1,
        length=length,
        source=addressType("TCP", _v1Address(source, parseIP), _v1Port(sourcePort)),
        destination=addressType(
            "TCP", _v1Address(destination, parseIP), _v1Port(destinationPort)
        ),
    )


def _v1Address(
    text: bytes, parseIP: type[ipaddress.IPv4Address | ipaddress.IPv6Address]
) -> str:
    try:
        if b"%" in text:  # a scope id names an interface of the sender's
            raise ValueError
        return str(parseIP(text.decode("ascii")))
    except ValueError:
        raise ProxyHeaderError(
            f"v1 address {text[:45]!r} is not a valid {parseIP.__name__}"
        ) from None


def _v1Port(text: bytes) -> int:
    if not _V1_PORT.fullmatch(text) or int(text) > 0xFFFF:
        raise ProxyHeaderError(f"v1 port {text[:8]!r} is not between 0 and 65535")
    return int(text)


def _parseV2(data: memoryview) -> ProxyHeader | None:
    if len(data) < V2_FIXED_LENGTH:
        return None
    versionCommand, familyProtocol, blockLength = struct.unpack_from("!BBH", data, 12)
    version, command = versionCommand >> 4, versionCommand & 0xF
    if version != 2:
        raise ProxyHeaderError(f"v2 header of version {version}")
    if command not in (0x0, 0x1):
        raise ProxyHeaderError(f"v2 command {command} is not LOCAL or PROXY")
    length = V2_FIXED_LENGTH + blockLength
    if len(data) < length:
        return None
    if command == 0x0:
        # LOCAL: the balancer's own connection (a health check); the block
        # is to be skipped whatever it holds.
        return ProxyHeader(version=2, length=length)
    family, protocol = familyProtocol >> 4, familyProtocol & 0xF
    if family not in (0x0, _V2_INET, _V2_INET6, _V2_UNIX):
        raise ProxyHeaderError(f"v2 address family {family} is unknown")
    if family and protocol != _V2_STREAM:
        raise ProxyHeaderError(f"v2 transport protocol {protocol} is not a stream")
    block = data[V2_FIXED_LENGTH:length]
    spec = _V2_BLOCKS.get(family)
    if spec is None:
        # UNSPEC or a unix socket: no IP address to give; the connection's
        # own addresses stand.
        _checkTLVs(block, _V2_UNIX_BLOCK if family == _V2_UNIX else 0)
        return ProxyHeader(version=2, length=length)
    addressType, size, layout, parseIP = spec
    if blockLength < size:
        raise ProxyHeaderError(f"v2 address block of {blockLength} bytes, {size} needed")
    _checkTLVs(block, size)
    source, destination, sourcePort, destinationPort = struct.unpack_from(layout, block)
    return ProxyHeader(
        version=2,
        length=length,
        source=addressType("TCP", str(parseIP(source)), sourcePort),
        destination=addressType("TCP", str(parseIP(destination)), destinationPort),
    )


def _checkTLVs(block: memoryview, offset: int) -> None:
    """
    Check that the TLVs after the address block (type, 16-bit length,
    value) tile the rest of the header exactly; their content is skipped.
    """
    if len(block) < offset:
        raise ProxyHeaderError(f"v2 address block of {len(block)} bytes, {offset} needed")
    while offset < len(block):
        if len(block) - offset < 3:
            raise ProxyHeaderError("v2 TLV cut short")
        (valueLength,) = struct.unpack_from("!H", block, offset + 1)
        offset += 3 + valueLength
        if offset > len(block):
            raise ProxyHeaderError("v2 TLV overruns the header")
