#!/usr/bin/env python3
"""
The property-based client test (tests/test_stateful.py) at a larger size
than CI runs it:

    python bench/stateful.py [--examples 150] [--steps 40]

Each example is a fresh sequence of up to STEPS client actions (connect
with a worker behaviour, send, half-close, close, reset, stop reading,
resume, wait) against a real server, under --half-close kill and forward;
the invariants are checked after every step.  Runs the test module under
trial from this checkout; exits with its status.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--examples", type=int, default=150)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    env = dict(os.environ)
    env["CLOSEWATCH_STATEFUL_EXAMPLES"] = str(args.examples)
    env["CLOSEWATCH_STATEFUL_STEPS"] = str(args.steps)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.call(
        [sys.executable, "-m", "twisted.trial", "--temp-directory", "_trial_temp_stateful",
         "tests.test_stateful"],
        cwd=ROOT,
        env=env,
    )


if __name__ == "__main__":
    sys.exit(main())
