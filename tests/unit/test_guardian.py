"""
The guardian's registrations: keyed, so that a worker's group id reused by
a new worker before the old one is unregistered stays registered.
"""

from __future__ import annotations

import os

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from twisted_closewatch import guardianprocess
from twisted_closewatch.guardian import Guardian


class ReadMessagesTests(SynchronousTestCase):
    def messages(self, data: bytes) -> set[int]:
        readEnd, writeEnd = os.pipe()
        try:
            os.write(writeEnd, data)
        finally:
            os.close(writeEnd)
        try:
            return guardianprocess._readMessages(readEnd)
        finally:
            os.close(readEnd)

    def test_registeredUntilUnregistered(self) -> None:
        self.assertEqual(self.messages(b"+1 100\n+2 200\n-1\n"), {200})

    def test_reusedGroupStaysRegistered(self) -> None:
        """
        Group 100's first worker was reaped and the id given to a new
        worker (key 2) before the first one's unregistration (key 1)
        arrived: the new one is still killed.
        """
        self.assertEqual(self.messages(b"+1 100\n+2 100\n-1\n"), {100})

    def test_partialLine(self) -> None:
        self.assertEqual(self.messages(b"+1 100\n+2 2"), {100})


class GuardianKeysTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.guardian = Guardian(MemoryReactorClock())
        readEnd, writeEnd = os.pipe()
        os.set_blocking(readEnd, False)
        self.addCleanup(os.close, readEnd)
        self.addCleanup(self.guardian.hangUp)
        self.readEnd = readEnd
        # As if started: what it sends goes to this pipe.
        self.guardian._fd = writeEnd

    def sent(self) -> bytes:
        return os.read(self.readEnd, 4096)

    def test_keysName(self) -> None:
        """
        Each registration has a key of its own, even for the same group,
        and an unregistration names its key.
        """
        first = self.guardian.register(100)
        second = self.guardian.register(100)
        self.assertNotEqual(first, second)
        self.guardian.unregister(first)
        self.guardian.unregister(first)
        self.assertEqual(self.sent(), b"+%d 100\n+%d 100\n-%d\n" % (first, second, first))
