"""
The Python worker of bench/spawn_bench.py: one line at once, then wait for
the client to go.  Run warm (C{--python-worker spawn_bench_worker:main}) or
cold (C{python3 spawn_bench_worker.py}).
"""

import sys


def main() -> int:
    sys.stdout.write("hello\n")
    sys.stdout.flush()
    sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(main())
