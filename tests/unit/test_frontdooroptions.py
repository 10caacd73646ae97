"""
The front doors' options: parsed into the config, bad values one-line
usage errors naming the option, unix socket modes, the TLS gate.
"""

from __future__ import annotations

import ipaddress
import os

from twisted.python import usage
from twisted.trial.unittest import TestCase

from tests.test_production import makeCertificate
from twisted_closewatch.handshake import FrontDoorEndpoint
from twisted_closewatch.options import Options


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions([*args, "--", "/bin/true"])
    return options


class FrontDoorOptionsTests(TestCase):
    def test_defaults(self) -> None:
        config = parse()["config"]
        self.assertEqual(
            (config.handshakeTimeout, config.maxHandshakes, config.maxRatePerPeer),
            (10, 1000, 0),
        )
        self.assertEqual((config.allow, config.deny), ((), ()))

    def test_values(self) -> None:
        config = parse(
            "--handshake-timeout", "2.5",
            "--max-handshakes", "50",
            "--max-rate-per-peer", "20",
            "--allow", "10.0.0.0/8",
            "--allow", "2001:db8::1",
            "--deny", "10.0.0.7",
        )["config"]  # fmt: skip
        self.assertEqual(config.handshakeTimeout, 2.5)
        self.assertEqual(config.maxHandshakes, 50)
        self.assertEqual(config.maxRatePerPeer, 20)
        self.assertEqual(
            config.allow,
            (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::1/128")),
        )
        self.assertEqual(config.deny, (ipaddress.ip_network("10.0.0.7/32"),))

    def assertUsageError(self, args: list[str], message: str) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            parse(*args)
        self.assertIn(message, str(caught.exception))
        self.assertNotIn("\n", str(caught.exception))

    def test_badValues(self) -> None:
        self.assertUsageError(["--handshake-timeout", "0"], "--handshake-timeout '0'")
        self.assertUsageError(["--handshake-timeout", "soon"], "not a number of seconds")
        self.assertUsageError(["--max-handshakes", "-1"], "--max-handshakes must be")
        self.assertUsageError(["--max-rate-per-peer", "1.5"], "--max-rate-per-peer must be")
        self.assertUsageError(["--allow", "10.0.0.1/8"], "--allow '10.0.0.1/8'")
        self.assertUsageError(["--deny", "localhost"], "--deny 'localhost'")

    def test_tlsBehindProxy(self) -> None:
        self.assertUsageError(
            ["--listen", "haproxy:ssl:0:privateKey=k.pem"], "TLS behind the PROXY protocol"
        )

    def test_unixSocketMode(self) -> None:
        [endpoint] = parse("--listen", "unix:/tmp/cw.sock")["endpoints"]
        self.assertEqual(endpoint._mode, 0o600)
        [endpoint] = parse("--listen", "unix:/tmp/cw.sock:mode=660")["endpoints"]
        self.assertEqual(endpoint._mode, 0o660)
        [endpoint] = parse("--listen", "haproxy:unix:/tmp/cw.sock")["endpoints"]
        self.assertEqual(endpoint._wrappedEndpoint._mode, 0o600)

    def test_tlsGate(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        keyPath, certPath = makeCertificate(directory)
        [endpoint] = parse("--listen", f"ssl:0:privateKey={keyPath}:certKey={certPath}")[
            "endpoints"
        ]
        self.assertIsInstance(endpoint, FrontDoorEndpoint)
