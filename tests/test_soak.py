"""
A reduced soak (C{bench/soak.py} at CI size): 600 connections in the full
mix of endings, one burst of 200 concurrent ones, then the leak checks.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from twisted.trial.unittest import TestCase

from tests.support import ROOT


def loadSoak():
    """
    C{bench/soak.py} as a module (C{bench} is a directory of scripts, not a
    package).
    """
    name = "closewatch_bench_soak"
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(ROOT, "bench", "soak.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: its dataclasses look their module up.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class SoakTests(TestCase):
    CONNECTIONS = int(os.environ.get("CLOSEWATCH_SOAK_CONNECTIONS", 600))
    BURST = int(os.environ.get("CLOSEWATCH_SOAK_BURST", 200))

    def test_soak(self) -> None:
        soak = loadSoak()
        report = soak.soak(
            soak.Params(
                connections=self.CONNECTIONS,
                burst=self.BURST,
                bursts=1,
                concurrency=12,
                warmupRounds=1,
            )
        )
        table = report.table()
        print(table)
        self.assertEqual(report.failures, [], table)
        # The figures the soak promises, checked here too so that a soak that
        # forgot to look cannot pass.
        kinds = {soak._baseKind(name) for name in report.kinds}
        self.assertLessEqual(set(soak.KINDS), kinds)
        self.assertEqual(set(report.servers), {"kill", "forward", "spawnfail"})
        for name, server in report.servers.items():
            self.assertEqual(server["fdsAfter"], server["fdsBaseline"], name)
            self.assertEqual(server["fdsAfterSlots"], server["fdsBaseline"], name)
            self.assertEqual(server["zombies"], 0, name)
            self.assertEqual(server["groupLeftovers"], 0, name)
            self.assertEqual(server["slotsServed"], self.BURST, name)
            self.assertTrue(server["refusedAtLimit"], name)
            self.assertEqual(server["metricsActive"], 0, name)
            self.assertLessEqual(server["rssGrowth"], 5 * 1024, name)
            self.assertEqual(server["exitStatus"], 0, name)
        self.assertGreaterEqual(report.connections, self.CONNECTIONS + self.BURST)
        for name, kind in report.kinds.items():
            self.assertEqual(kind["errors"], 0, name)
