#!/usr/bin/env python3
"""
How long closewatch takes to kill the worker of a client that vanished
without a FIN or an RST, against the bound its configuration sets:

    python bench/deadpeer_bench.py [--runs 5] [--measure-defaults] [--json FILE]

Each scenario runs in a network namespace of its own (C{unshare -n}: root,
C{unshare} and C{ip} needed) holding a real C{twistd closewatch} and a real
client; once the connection is set up, the client sends one last byte and
C{ip link set lo down} cuts every packet.  The time measured is from the cut
to the worker's exit (a pidfd), and the reason is read from the server's
end-of-connection event.  All scenarios of one run go at once; the table
gives the median over the runs.  The target: within 10% + 0.5 s of the bound.

The defaults (keepalive 60/10/6, user timeout 60 + 10 * 6 = 120 s) are
computed, not measured, unless --measure-defaults (two more minutes).  Note
Linux: with TCP_USER_TIMEOUT set, the keepalive count is ignored and an idle
dead peer goes at the first probe at or after the user timeout; closewatch
derives the user timeout from the keepalive options when it is not given, so
that the two agree.

The scenarios themselves are L{tests.test_liveness.runScenario}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.test_liveness import (  # noqa: E402
    FAST_KEEPALIVE,
    YES_WORKER,
    netnsUnavailable,
    runScenarios,
)
from twisted_closewatch import tcp  # noqa: E402
from twisted_closewatch.config import Config  # noqa: E402


def scenarios(measureDefaults: bool) -> list[dict]:
    """
    The rows: a name, the bound in seconds, the reason expected, the spec.
    """
    rows = [
        {
            "name": "keepalive 1/1/2 alone (user timeout derived: 3 s), idle",
            "bound": tcp.keepaliveDeadline(
                Config(keepaliveIdle=1, keepaliveInterval=1, keepaliveCount=2)
            ),
            "expect": "keepalive",
            "spec": {"args": FAST_KEEPALIVE},
        },
        {
            "name": "keepalive 1/1/2, --user-timeout 0, idle",
            "bound": tcp.keepaliveDeadline(
                Config(keepaliveIdle=1, keepaliveInterval=1, keepaliveCount=2, userTimeout=0)
            ),
            "expect": "keepalive",
            "spec": {"args": [*FAST_KEEPALIVE, "--user-timeout", "0"]},
        },
        {
            "name": "keepalive 1/1/2, --user-timeout 0, relay paused",
            "bound": 3,
            "expect": "keepalive",
            # No last byte here: the client cannot send into a closed window,
            # so the silence may have begun up to a probe interval before the
            # cut (the server probes after 1 s; the client answers).
            "spec": {
                "args": [*FAST_KEEPALIVE, "--user-timeout", "0", "--read-ahead", "64k"],
                "client": "backlog",
                "poke": False,
            },
        },
        {
            "name": "keepalive 1/1/1, --user-timeout 4 (count ignored)",
            "bound": tcp.keepaliveDeadline(
                Config(keepaliveIdle=1, keepaliveInterval=1, keepaliveCount=1, userTimeout=4)
            ),
            "expect": "keepalive",
            "spec": {
                "args": [
                    "--keepalive-idle", "1", "--keepalive-interval", "1",
                    "--keepalive-count", "1", "--user-timeout", "4",
                ],
            },
        },
        {
            "name": "--user-timeout 2, worker writing",
            "bound": 2,
            "expect": "user-timeout",
            "spec": {"args": ["--user-timeout", "2"], "command": YES_WORKER, "client": "reader"},
        },
        {
            "name": "--heartbeat 0.5 --user-timeout 2, worker silent",
            "bound": 2.5,
            "expect": "user-timeout",
            "spec": {"args": ["--user-timeout", "2", "--heartbeat", "0.5"]},
        },
        {
            "name": "--idle-timeout 2",
            "bound": 2,
            "expect": "idle-timeout",
            "spec": {"args": ["--idle-timeout", "2"]},
        },
    ]
    defaults = Config()
    rows += [
        {
            "name": "defaults (60/10/6, user timeout 120), idle",
            "bound": tcp.keepaliveDeadline(defaults),
            "expect": "keepalive",
            "spec": {"watch": 150} if measureDefaults else None,
        },
        {
            "name": "defaults, worker writing",
            "bound": defaults.userTimeout,
            "expect": "user-timeout",
            "spec": {"command": YES_WORKER, "client": "reader", "watch": 150}
            if measureDefaults
            else None,
        },
    ]
    for row in rows:
        if row["spec"] is not None:
            row["spec"] = {"netns": True, "poke": True, "watch": 15, "expect": row["expect"], **row["spec"]}
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each scenario (default 5)")
    parser.add_argument(
        "--measure-defaults", action="store_true", help="also measure the defaults (~2 min, once)"
    )
    parser.add_argument("--json", help="write the raw results to this file")
    args = parser.parse_args()
    reason = netnsUnavailable()
    if reason is not None:
        print(f"skipped: {reason}", file=sys.stderr)
        return 2
    rows = scenarios(args.measure_defaults)
    measured = {row["name"]: [] for row in rows}
    for run in range(args.runs):
        specs = {
            row["name"]: row["spec"]
            for row in rows
            if row["spec"] is not None and (run == 0 or row["spec"]["watch"] <= 15)
        }
        print(f"run {run + 1}/{args.runs}: {len(specs)} scenarios at once", file=sys.stderr)
        for name, result in runScenarios(specs, timeout=200).items():
            measured[name].append(result)

    header = ["scenario", "bound s", "median s", "min-max s", "target s", "reasons", "ok"]
    table = []
    allOK = True
    for row in rows:
        bound = row["bound"]
        slack = 0.1 * bound + 0.5
        target = f"{bound - slack:.2f}-{bound + slack:.2f}"
        results = measured[row["name"]]
        if not results:
            table.append([row["name"], f"{bound:g}", "(computed)", "", target, row["expect"], ""])
            continue
        times = [r["elapsed"] for r in results if r.get("elapsed") is not None]
        reasons = sorted({str(r.get("reason") or r.get("error", "?")[:40]) for r in results})
        ok = (
            len(times) == len(results)
            and reasons == [row["expect"]]
            and abs(statistics.median(times) - bound) <= slack
        )
        allOK &= ok
        table.append(
            [
                row["name"],
                f"{bound:g}",
                f"{statistics.median(times):.2f}" if times else "-",
                f"{min(times):.2f}-{max(times):.2f}" if times else "-",
                target,
                ",".join(reasons),
                "yes" if ok else "NO",
            ]
        )
    widths = [max(len(str(line[i])) for line in [header, *table]) for i in range(len(header))]
    for line in [header, ["-" * w for w in widths], *table]:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |")
    print(f"\n{args.runs} runs; time from lo down to the worker's exit; "
          "target: the bound within 10% + 0.5 s.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "results": measured}, f, indent=2, default=str)
    return 0 if allOK else 1


if __name__ == "__main__":
    sys.exit(main())
