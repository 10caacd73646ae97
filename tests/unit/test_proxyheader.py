"""
The PROXY header parser: every valid form, every malformed one, headers
split at every byte, and arbitrary bytes (Hypothesis).
"""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.trial.unittest import TestCase

from twisted_closewatch.proxyheader import (
    MAX_LENGTH,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    parse,
)


def v2(
    command: int = 0x1,
    family: int = 0x1,
    protocol: int = 0x1,
    block: bytes | None = None,
    version: int = 2,
) -> bytes:
    """
    A v2 header; by default PROXY TCP4 1.2.3.4:1000 -> 5.6.7.8:2000.
    """
    if block is None:
        block = bytes([1, 2, 3, 4, 5, 6, 7, 8]) + struct.pack("!HH", 1000, 2000)
    return (
        V2_SIGNATURE
        + bytes([version << 4 | command, family << 4 | protocol])
        + struct.pack("!H", len(block))
        + block
    )


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


INET6_BLOCK = (
    ipaddress.IPv6Address("2001:db8::1").packed
    + ipaddress.IPv6Address("::1").packed
    + struct.pack("!HH", 65535, 0)
)


class ValidHeaderTests(TestCase):
    def test_v1TCP4(self) -> None:
        header = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"
        self.assertEqual(
            parse(header + b"data"),
            ProxyHeader(
                version=1,
                length=len(header),
                source=IPv4Address("TCP", "192.0.2.1", 56324),
                destination=IPv4Address("TCP", "198.51.100.2", 443),
            ),
        )

    def test_v1TCP6(self) -> None:
        header = b"PROXY TCP6 2001:db8::1 ::ffff:192.0.2.1 0 65535\r\n"
        parsed = parse(header)
        self.assertEqual(parsed.source, IPv6Address("TCP", "2001:db8::1", 0))
        self.assertEqual(parsed.destination, IPv6Address("TCP", "::ffff:c000:201", 65535))

    def test_v1Longest(self) -> None:
        """
        The longest valid v1 lines: 104 bytes for TCP6, 107 for UNKNOWN.
        """
        address = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        header = f"PROXY TCP6 {address} {address} 65535 65535\r\n".encode()
        self.assertEqual(parse(header).length, 104)
        header = f"PROXY UNKNOWN {address} {address} 65535 65535\r\n".encode()
        self.assertEqual(parse(header).length, V1_MAX_LENGTH)

    def test_v1Unknown(self) -> None:
        """
        UNKNOWN names no address, whatever follows it on the line.
        """
        for header in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n"):
            self.assertEqual(parse(header + b"x"), ProxyHeader(version=1, length=len(header)))

    def test_v2TCP4(self) -> None:
        self.assertEqual(
            parse(v2() + b"data"),
            ProxyHeader(
                version=2,
                length=28,
                source=IPv4Address("TCP", "1.2.3.4", 1000),
                destination=IPv4Address("TCP", "5.6.7.8", 2000),
            ),
        )

    def test_v2TCP6(self) -> None:
        parsed = parse(v2(family=0x2, block=INET6_BLOCK))
        self.assertEqual(parsed.source, IPv6Address("TCP", "2001:db8::1", 65535))
        self.assertEqual(parsed.destination, IPv6Address("TCP", "::1", 0))

    def test_v2Local(self) -> None:
        """
        LOCAL (a health check) names no address, and its block is skipped
        whatever it holds.
        """
        header = v2(command=0x0, family=0x0, protocol=0x0, block=b"\xff" * 7)
        self.assertEqual(parse(header + b"x"), ProxyHeader(version=2, length=len(header)))

    def test_v2Unspecified(self) -> None:
        header = v2(family=0x0, protocol=0x0, block=b"")
        self.assertEqual(parse(header), ProxyHeader(version=2, length=16))

    def test_v2Unix(self) -> None:
        header = v2(family=0x3, block=b"/a".ljust(108, b"\0") + b"/b".ljust(108, b"\0"))
        self.assertEqual(parse(header), ProxyHeader(version=2, length=16 + 216))

    def test_v2TLVsSkipped(self) -> None:
        block = v2()[16:] + tlv(0x01, b"h2") + tlv(0x04, b"\0" * 300) + tlv(0xE0, b"")
        parsed = parse(v2(block=block) + b"after")
        self.assertEqual(parsed.length, 16 + len(block))
        self.assertEqual(parsed.source, IPv4Address("TCP", "1.2.3.4", 1000))

    def test_v2Longest(self) -> None:
        block = v2()[16:] + tlv(0x04, b"\0" * (0xFFFF - 12 - 3))
        self.assertEqual(parse(v2(block=block)).length, MAX_LENGTH)


class MalformedHeaderTests(TestCase):
    def assertMalformed(self, data: bytes, message: str) -> None:
        with self.assertRaises(ProxyHeaderError) as caught:
            parse(data)
        self.assertIn(message, str(caught.exception))
        self.assertNotIn("\n", str(caught.exception))

    def test_notAHeader(self) -> None:
        self.assertMalformed(b"GET / HTTP/1.1\r\n", "not a PROXY header")
        self.assertMalformed(b"\r\n\r\nX", "not a PROXY header")
        self.assertMalformed(b"proxy TCP4", "not a PROXY header")

    def test_v1BadAddresses(self) -> None:
        for address in (b"999.1.2.3", b"1.2.3", b"01.2.3.4", b"::1", b"1.2.3.4 ", b"a"):
            self.assertMalformed(
                b"PROXY TCP4 " + address + b" 1.2.3.4 1 2\r\n", "v1"
            )
        self.assertMalformed(b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "not a valid IPv6Address")
        self.assertMalformed(b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "not a valid IPv6Address")

    def test_v1BadPorts(self) -> None:
        for port in (b"99999", b"65536", b"-5", b"abc", b"+1", b"123456", b"1.0", b""):
            self.assertMalformed(
                b"PROXY TCP4 1.2.3.4 5.6.7.8 " + port + b" 2\r\n", "v1"
            )

    def test_v1ControlCharacters(self) -> None:
        for line in (
            b"PROXY TCP4 1.2.3.4\n5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\x00\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            b"PROXY UNKNOWN \x1b[31m\r\n",
            b"PROXY UNKNOWN \xff\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n",
        ):
            self.assertMalformed(line, "control or non-ASCII")

    def test_v1Fields(self) -> None:
        self.assertMalformed(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "5 fields")
        self.assertMalformed(b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "7 fields")
        self.assertMalformed(b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "not TCP4")
        self.assertMalformed(b"PROXY \r\n", "fields")

    def test_v1TooLong(self) -> None:
        self.assertMalformed(b"PROXY UNKNOWN " + b"x" * 200, "longer than 107")
        self.assertMalformed(b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", "longer than 107")

    def test_v2Version(self) -> None:
        self.assertMalformed(v2(version=1), "version 1")
        self.assertMalformed(v2(version=3), "version 3")

    def test_v2Command(self) -> None:
        self.assertMalformed(v2(command=0x2), "command 2")

    def test_v2Family(self) -> None:
        self.assertMalformed(v2(family=0x4), "family 4")

    def test_v2Protocol(self) -> None:
        self.assertMalformed(v2(protocol=0x2), "not a stream")
        self.assertMalformed(v2(protocol=0x0), "not a stream")

    def test_v2ShortBlocks(self) -> None:
        self.assertMalformed(v2(block=b"\0" * 11), "12 needed")
        self.assertMalformed(v2(family=0x2, block=b"\0" * 35), "36 needed")
        self.assertMalformed(v2(family=0x3, block=b"\0" * 215), "216 needed")

    def test_v2BadTLVs(self) -> None:
        base = v2()[16:]
        self.assertMalformed(v2(block=base + b"\x01\x00"), "cut short")
        self.assertMalformed(v2(block=base + b"\x01\x00\x05abc"), "overruns")


class SplitHeaderTests(TestCase):
    """
    A header arriving in pieces: every prefix asks for more, and the whole
    parses the same.
    """

    def assertEveryPrefixIncomplete(self, header: bytes) -> None:
        for cut in range(len(header)):
            self.assertIsNone(parse(header[:cut]), f"prefix of {cut} bytes")
        self.assertEqual(parse(header).length, len(header))

    def test_v1(self) -> None:
        self.assertEveryPrefixIncomplete(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n")

    def test_v1Unknown(self) -> None:
        self.assertEveryPrefixIncomplete(b"PROXY UNKNOWN\r\n")

    def test_v2(self) -> None:
        self.assertEveryPrefixIncomplete(v2(block=v2()[16:] + tlv(0x02, b"example.com")))

    def test_v2Local(self) -> None:
        self.assertEveryPrefixIncomplete(v2(command=0x0, family=0x0, protocol=0x0, block=b""))


ADDRESS_TYPES = (IPv4Address, IPv6Address)


class ArbitraryBytesTests(TestCase):
    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=300))
    def test_arbitraryBytes(self, data: bytes) -> None:
        self.assertParsesSafely(data)

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=120))
    def test_afterV1Signature(self, data: bytes) -> None:
        self.assertParsesSafely(b"PROXY " + data)

    @settings(max_examples=500, deadline=None)
    @given(
        st.sampled_from([b"TCP4 ", b"TCP6 ", b"UNKNOWN"]),
        st.text(alphabet="0123456789abcdef.:% -\r\n\x00", max_size=110),
    )
    def test_nearlyV1(self, proto: bytes, rest: str) -> None:
        self.assertParsesSafely(b"PROXY " + proto + rest.encode())

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=4), st.binary(max_size=300))
    def test_afterV2Signature(self, fixed: bytes, block: bytes) -> None:
        self.assertParsesSafely(V2_SIGNATURE + fixed + block)

    def assertParsesSafely(self, data: bytes) -> None:
        """
        C{data} parses to a header, to "need more", or to
        L{ProxyHeaderError}, nothing else; a header's length is within
        C{data} and the bounds, and its addresses are valid IPs and ports.
        """
        try:
            header = parse(data)
        except ProxyHeaderError as e:
            self.assertNotIn("\n", str(e))
            return
        if header is None:
            self.assertLess(len(data), MAX_LENGTH)
            return
        self.assertLessEqual(header.length, len(data))
        self.assertLessEqual(header.length, MAX_LENGTH)
        if header.version == 1:
            self.assertLessEqual(header.length, V1_MAX_LENGTH)
            line = data[: header.length - 2]
            self.assertTrue(all(0x20 <= b < 0x7F for b in line), line)
        for address in (header.source, header.destination):
            if address is None:
                continue
            self.assertIsInstance(address, ADDRESS_TYPES)
            ipaddress.ip_address(address.host)
            self.assertTrue(0 <= address.port <= 65535)
