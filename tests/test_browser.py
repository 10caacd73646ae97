"""
The console in a real browser: headless Chromium (Debian's package, driven
over the DevTools protocol, see L{tests.browser}) against a real server.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.trial.unittest import SkipTest, TestCase

from tests import browser
from tests.support import Server, pidfdWaitGone, wait, workers


class ConsoleTests(TestCase):
    def test_queryThenCloseTheTab(self) -> None:
        """
        The console runs C{select 40+2} and shows C{42}; closing the tab
        kills the worker at once and the server logs its end.

        With C{CLOSEWATCH_SCREENSHOT=PATH}, the page is saved as a PNG at
        that moment (how C{docs/console.png} is made).
        """
        if not browser.available():
            raise SkipTest(
                f"{browser.CHROMIUM} is not installed (Debian package chromium)"
            )
        directory = tempfile.mkdtemp(prefix="closewatch-browser-")
        self.addCleanup(shutil.rmtree, directory, True)
        server = Server(["--websocket"], command=[], cwd=directory)
        self.addCleanup(server.cleanup)
        chromium = browser.Chromium()
        self.addCleanup(chromium.close)

        tab = chromium.open(f"http://127.0.0.1:{server.port}/")
        tab.waitFor("document.getElementById('status')?.className === 'open'")
        [pid] = wait(lambda: workers(server.pid))
        tab.evaluate(
            "document.getElementById('query').value = 'select 40+2';"
            "document.getElementById('form').requestSubmit(); true"
        )
        answer = tab.waitFor(
            "[...document.querySelectorAll('#output div')].map(d => d.textContent)"
            ".find(t => t.includes('42') && !t.includes('select'))"
        )
        self.assertEqual(answer, "[42]")
        screenshot = os.environ.get("CLOSEWATCH_SCREENSHOT")
        if screenshot:
            with open(screenshot, "wb") as f:
                f.write(tab.screenshot())

        tab.close()
        self.assertTrue(pidfdWaitGone(pid, 5))
        end = server.endOf(1)
        self.assertEqual(end["pid"], pid)
        # Chromium sends a close frame (1001) for a closed tab, and waits.
        self.assertEqual(end["reason"], "websocket-closed")
        self.assertEqual(end["exit_signal"], 9)
        self.assertLess(end["kill_latency_ms"], 1000)
