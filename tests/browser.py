"""
Headless Chromium driven through the Chrome DevTools Protocol over a pipe
(C{--remote-debugging-pipe}: commands on its fd 3, answers on its fd 4, as
NUL-terminated JSON): no WebDriver, no Python package, nothing downloaded.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from typing import Any

#: Debian's chromium package.
CHROMIUM = "/usr/bin/chromium"

#: Flags for a throwaway browser that talks to nobody but the test (root
#: needs --no-sandbox).
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--window-size=960,640",
    "--remote-debugging-pipe",
]


def _above(fd: int, minimum: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, minimum)
    os.close(fd)
    return moved


def available() -> bool:
    return os.access(CHROMIUM, os.X_OK)


class DevToolsError(Exception):
    pass


class Chromium:
    """
    One headless Chromium with a fresh profile; L{close} ends it.
    """

    def __init__(self, timeout: float = 15.0) -> None:
        self._timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="closewatch-chromium-")
        commandsRead, self._commands = os.pipe()
        self._answers, answersWrite = os.pipe()
        # Above 4, so that putting one on fd 3 or 4 cannot clobber the other.
        commandsRead, answersWrite = (_above(fd, 10) for fd in (commandsRead, answersWrite))
        # bash puts the pipes on fds 3 and 4, where Chromium wants them
        # (dash takes only one-digit fds).
        self.process = subprocess.Popen(
            [
                "/bin/bash",
                "-c",
                f'exec "$0" "$@" 3<&{commandsRead} 4>&{answersWrite} '
                + f"{commandsRead}<&- {answersWrite}>&-",
                CHROMIUM,
                *FLAGS,
                f"--user-data-dir={self._profile}",
                "about:blank",
            ],
            pass_fds=(commandsRead, answersWrite),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(commandsRead)
        os.close(answersWrite)
        self._buffer = b""
        self._ids = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, sessionId: str | None = None, **params: Any) -> dict[str, Any]:
        """
        Run one DevTools command; its result, or L{DevToolsError}.
        """
        self._ids += 1
        message: dict[str, Any] = {"id": self._ids, "method": method, "params": params}
        if sessionId is not None:
            message["sessionId"] = sessionId
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self._timeout
        while True:
            answer = self._read(deadline)
            if answer.get("id") == self._ids:
                if "error" in answer:
                    raise DevToolsError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            self.events.append(answer)

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._answers], [], [], remaining)[0]:
                raise DevToolsError("Chromium did not answer in time")
            data = os.read(self._answers, 1 << 20)
            if not data:
                raise DevToolsError("Chromium exited")
            self._buffer += data
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def open(self, url: str) -> Tab:
        targetId = self.send("Target.createTarget", url=url)["targetId"]
        sessionId = self.send("Target.attachToTarget", targetId=targetId, flatten=True)["sessionId"]
        return Tab(self, targetId, sessionId)

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (DevToolsError, OSError):
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        os.close(self._commands)
        os.close(self._answers)
        shutil.rmtree(self._profile, True)


class Tab:
    """
    One page, attached to in flat mode.
    """

    def __init__(self, browser: Chromium, targetId: str, sessionId: str) -> None:
        self._browser = browser
        self.targetId = targetId
        self.sessionId = sessionId

    def evaluate(self, expression: str) -> Any:
        result = self._browser.send(
            "Runtime.evaluate",
            self.sessionId,
            expression=expression,
            returnByValue=True,
            awaitPromise=True,
        )
        if "exceptionDetails" in result:
            raise DevToolsError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def waitFor(self, expression: str, timeout: float = 10.0) -> Any:
        """
        Evaluate C{expression} until it is true, for C{timeout} at most.
        """
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{expression} still false after {timeout} s")
            time.sleep(0.05)

    def screenshot(self) -> bytes:
        data = self._browser.send("Page.captureScreenshot", self.sessionId, format="png")["data"]
        return base64.b64decode(data)

    def close(self) -> None:
        self._browser.send("Target.closeTarget", targetId=self.targetId)
