"""
Address rules and the per-client rate limit, with a fake clock.
"""

from __future__ import annotations

import ipaddress

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from twisted_closewatch.access import (
    AccessPolicy,
    AccessRules,
    RateLimiter,
    parseNetwork,
)
from twisted_closewatch.addresses import clientIP, peerKey
from twisted_closewatch.config import Config

ip = ipaddress.ip_address


class ParseNetworkTests(TestCase):
    def test_networks(self) -> None:
        self.assertEqual(parseNetwork("10.0.0.0/8"), ipaddress.ip_network("10.0.0.0/8"))
        self.assertEqual(parseNetwork("2001:db8::/32"), ipaddress.ip_network("2001:db8::/32"))

    def test_bareAddress(self) -> None:
        self.assertEqual(parseNetwork("127.0.0.2").prefixlen, 32)
        self.assertEqual(parseNetwork("::1").prefixlen, 128)

    def test_bad(self) -> None:
        for text in ("10.0.0.1/8", "300.0.0.0/8", "10.0.0.0/33", "example.com", ""):
            self.assertRaises(ValueError, parseNetwork, text)


class ClientIPTests(TestCase):
    def test_tcp(self) -> None:
        self.assertEqual(clientIP(IPv4Address("TCP", "127.0.0.2", 1)), ip("127.0.0.2"))
        self.assertEqual(clientIP(IPv6Address("TCP", "::1", 1)), ip("::1"))

    def test_mappedIPv4(self) -> None:
        self.assertEqual(clientIP(IPv6Address("TCP", "::ffff:10.1.2.3", 1)), ip("10.1.2.3"))

    def test_unix(self) -> None:
        self.assertIsNone(clientIP(UNIXAddress(b"/tmp/x")))


class PeerKeyTests(TestCase):
    """
    The per-peer limit counts one IPv4 address, or one IPv6 /64, as a
    client, as the rate limit does.
    """

    def test_keys(self) -> None:
        self.assertEqual(peerKey(IPv4Address("TCP", "192.0.2.1", 1)), "192.0.2.1")
        self.assertEqual(peerKey(IPv6Address("TCP", "::ffff:192.0.2.1", 1)), "192.0.2.1")
        self.assertEqual(peerKey(IPv6Address("TCP", "2001:db8::5:6", 1)), "2001:db8::/64")
        self.assertEqual(peerKey(IPv6Address("TCP", "fe80::1%lo", 1)), "fe80::/64")
        self.assertIsNone(peerKey(UNIXAddress(b"/tmp/x")))


class AccessRulesTests(TestCase):
    def test_noRules(self) -> None:
        rules = AccessRules()
        self.assertFalse(rules)
        self.assertTrue(rules.permits(ip("192.0.2.1")))

    def test_denyOnly(self) -> None:
        rules = AccessRules(deny=[parseNetwork("127.0.0.2")])
        self.assertFalse(rules.permits(ip("127.0.0.2")))
        self.assertTrue(rules.permits(ip("127.0.0.3")))

    def test_allowDeniesTheRest(self) -> None:
        rules = AccessRules(allow=[parseNetwork("127.0.0.0/30"), parseNetwork("2001:db8::/32")])
        self.assertTrue(rules.permits(ip("127.0.0.3")))
        self.assertFalse(rules.permits(ip("127.0.0.4")))
        self.assertTrue(rules.permits(ip("2001:db8::5")))
        self.assertFalse(rules.permits(ip("::1")))

    def test_denyWins(self) -> None:
        rules = AccessRules(allow=[parseNetwork("127.0.0.0/8")], deny=[parseNetwork("127.0.0.2")])
        self.assertFalse(rules.permits(ip("127.0.0.2")))
        self.assertTrue(rules.permits(ip("127.0.0.1")))


class RateLimiterTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)

    def test_burstThenRate(self) -> None:
        """
        A burst of C{rate} connections, then one per C{1/rate} seconds.
        """
        limiter = RateLimiter(4, self.clock)
        client = ip("192.0.2.1")
        self.assertEqual([limiter.allow(client) for _ in range(5)], [True] * 4 + [False])
        self.clock.advance(0.2)
        self.assertFalse(limiter.allow(client))
        self.clock.advance(0.05)
        self.assertTrue(limiter.allow(client))
        self.assertFalse(limiter.allow(client))
        self.clock.advance(1)
        self.assertEqual([limiter.allow(client) for _ in range(5)], [True] * 4 + [False])

    def test_refusedDoNotCount(self) -> None:
        """
        A client hammering while over its rate gets back in as soon as its
        rate allows, not later.
        """
        limiter = RateLimiter(1, self.clock)
        client = ip("192.0.2.1")
        self.assertTrue(limiter.allow(client))
        for _ in range(10):
            self.clock.advance(0.09)
            self.assertFalse(limiter.allow(client))
        self.clock.advance(0.1)
        self.assertTrue(limiter.allow(client))

    def test_clientsApart(self) -> None:
        limiter = RateLimiter(1, self.clock)
        self.assertTrue(limiter.allow(ip("192.0.2.1")))
        self.assertTrue(limiter.allow(ip("192.0.2.2")))
        self.assertFalse(limiter.allow(ip("192.0.2.1")))

    def test_ipv6By64(self) -> None:
        limiter = RateLimiter(1, self.clock)
        self.assertTrue(limiter.allow(ip("2001:db8::1")))
        self.assertFalse(limiter.allow(ip("2001:db8::ffff:2")))
        self.assertTrue(limiter.allow(ip("2001:db8:0:1::1")))

    def test_forgottenWhenFull(self) -> None:
        """
        A client is forgotten once its bucket is full again.
        """
        limiter = RateLimiter(10, self.clock)
        for n in range(100):
            limiter.allow(ip(f"192.0.2.{n}"))
        self.assertEqual(len(limiter), 100)
        self.clock.advance(1)
        limiter.allow(ip("198.51.100.1"))
        self.assertEqual(len(limiter), 1)

    def test_tableBounded(self) -> None:
        """
        Past the table's size, the client heard from longest ago is
        forgotten.
        """
        limiter = RateLimiter(1, self.clock, maxClients=10)
        for n in range(25):
            self.assertTrue(limiter.allow(ip(f"192.0.2.{n}")))
            self.clock.advance(0.001)
        self.assertEqual(len(limiter), 10)
        self.assertFalse(limiter.allow(ip("192.0.2.24")))
        self.assertTrue(limiter.allow(ip("192.0.2.0")))


class AccessPolicyTests(TestCase):
    def test_refusals(self) -> None:
        clock = Clock()
        policy = AccessPolicy(
            Config(argv=["/bin/true"], deny=[parseNetwork("127.0.0.2")], maxRatePerPeer=1), clock
        )
        self.assertEqual(policy.refusal(IPv4Address("TCP", "127.0.0.2", 1)), "denied")
        self.assertIsNone(policy.refusal(IPv4Address("TCP", "127.0.0.3", 1)))
        self.assertEqual(policy.refusal(IPv4Address("TCP", "127.0.0.3", 2)), "rate")
        self.assertIsNone(policy.refusal(UNIXAddress(b"/tmp/x")))
        self.assertIsNone(policy.refusal(UNIXAddress(b"/tmp/x")))

    def test_deniedDoNotCount(self) -> None:
        clock = Clock()
        policy = AccessPolicy(
            Config(argv=["/bin/true"], allow=[parseNetwork("10.0.0.0/8")], maxRatePerPeer=1),
            clock,
        )
        for _ in range(3):
            self.assertEqual(policy.refusal(IPv4Address("TCP", "192.0.2.1", 1)), "denied")
        self.assertIsNone(policy.refusal(IPv4Address("TCP", "10.0.0.1", 1)))
