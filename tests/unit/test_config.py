"""
One source of truth for the settings: L{Config}'s fields carry their
defaults, checks and command-line form; L{Options} is derived from them.
"""

from __future__ import annotations

import attr
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from twisted_closewatch.config import Config, parseBytes, parseSeconds, parseSize, settings
from twisted_closewatch.options import Options


def parse(*args: str) -> Config:
    options = Options()
    options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", *args, "--", "/bin/true"])
    config: Config = options["config"]
    return config


class DerivedOptionsTests(SynchronousTestCase):
    """
    The options are the settings.
    """

    def test_shownDefaultsAreTheDefaults(self) -> None:
        """
        The default C{--help} shows for an option, given to it, is the
        default: what the help says is what one gets.
        """
        for field, setting in settings():
            if isinstance(field.default, attr.Factory):  # type: ignore[arg-type]
                continue  # derived from other settings, and said so
            shown = setting.showDefault(field.default)
            config = parse(f"--{setting.option}", shown)
            self.assertEqual(getattr(config, field.name), field.default, setting.option)

    def test_defaultsAreConfigs(self) -> None:
        """
        Options given no value leave every default to L{Config}.
        """
        self.assertEqual(attr.evolve(parse(), argv=Config().argv), Config())

    def test_helpShowsDefaults(self) -> None:
        helps = {spec[0]: spec[3] for spec in Options.optParameters}
        self.assertIn("[default: 256k]", helps["read-ahead"])
        self.assertIn("[default: \\n]", helps["heartbeat-data"])
        self.assertIn("[default: 1000]", helps["max-workers"])

    def test_valuesReachConfig(self) -> None:
        config = parse("--max-lifetime", "2.5", "--grace", "1", "--max-per-peer", "3")
        self.assertEqual((config.maxLifetime, config.grace, config.maxPerPeer), (2.5, 1, 3))


class ValidationTests(SynchronousTestCase):
    """
    A value is checked once, by its field: the library and the command line
    refuse the same values, naming the option.
    """

    def test_libraryRefuses(self) -> None:
        error = self.assertRaises(ValueError, Config, keepaliveCount=500)
        self.assertEqual(str(error), "500: --keepalive-count must be between 1 and 127")

    def test_commandLineRefusesTheSame(self) -> None:
        error = self.assertRaises(usage.UsageError, parse, "--keepalive-count", "500")
        self.assertEqual(str(error), "'500': --keepalive-count must be between 1 and 127")

    def test_unparsableNamesTheOption(self) -> None:
        error = self.assertRaises(usage.UsageError, parse, "--heartbeat", "often")
        self.assertEqual(str(error), "--heartbeat: 'often' is not a number of seconds")

    def test_checkedAsGiven(self) -> None:
        """
        A value the field refuses is refused as it is given, with the text
        that was given.
        """
        error = self.assertRaises(usage.UsageError, parse, "--grace", "-1")
        self.assertEqual(str(error), "--grace: '-1': seconds must be a finite number >= 0")
        error = self.assertRaises(usage.UsageError, parse, "--handshake-timeout", "0")
        self.assertEqual(str(error), "--handshake-timeout '0': at least 0.1 seconds")

    def test_halfClose(self) -> None:
        self.assertEqual(parse("--half-close", "forward").halfClose, "forward")
        self.assertRaises(ValueError, Config, halfClose="KILL")

    def test_readAheadBounds(self) -> None:
        self.assertRaises(ValueError, Config, readAhead=4095)
        self.assertRaises(ValueError, Config, readAhead=1024**3 + 1)
        self.assertEqual(Config(readAhead=4096).readAhead, 4096)

    def test_secondsBounds(self) -> None:
        self.assertRaises(ValueError, Config, grace=3601)
        self.assertRaises(ValueError, Config, idleTimeout=float("nan"))
        self.assertRaises(ValueError, Config, maxLifetime=-1)

    def test_heartbeatNeedsData(self) -> None:
        """
        A check across fields: a heartbeat of nothing is refused.
        """
        self.assertRaises(ValueError, Config, heartbeat=1, heartbeatData=b"")
        self.assertEqual(Config(heartbeat=0, heartbeatData=b"").heartbeatData, b"")

    def test_wholeNumbersOnly(self) -> None:
        self.assertRaises(ValueError, Config, maxWorkers=2.0)
        self.assertRaises(ValueError, Config, keepaliveIdle=True)


class ParserTests(SynchronousTestCase):
    def test_sizes(self) -> None:
        self.assertEqual(
            [parseSize(t) for t in ("65536", "256k", "4m", "1g", "8KiB")],
            [65536, 256 * 1024, 4 * 1024**2, 1024**3, 8 * 1024],
        )
        self.assertRaises(ValueError, parseSize, "1.5k")

    def test_seconds(self) -> None:
        self.assertEqual(parseSeconds("0.25"), 0.25)
        self.assertRaises(ValueError, parseSeconds, "soon")
        for bad in (float("inf"), -1):
            self.assertRaises(ValueError, Config, heartbeat=bad)

    def test_bytes(self) -> None:
        self.assertEqual(parseBytes("\\r\\n\\x00"), b"\r\n\x00")
        self.assertRaises(ValueError, parseBytes, "\\x4")
