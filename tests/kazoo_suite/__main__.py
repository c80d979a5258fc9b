"""Run kazoo's suite by hand: `python -m tests.kazoo_suite zookeeper|fleetmate|HOST:PORT [-n N] [pytest args]`."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tests.kazoo_suite.runner import run_suite
from tests.kazoo_suite.servers import server_under_test


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.kazoo_suite", description=__doc__)
    parser.add_argument("server", help="zookeeper (Debian's 3.8), fleetmate (this checkout), or host:port")
    parser.add_argument("-n", "--workers", type=int, default=0, help="pytest-xdist workers (0: one process)")
    parser.add_argument("--keep", type=Path, help="directory to keep kazoo-output.txt and kazoo-results.json in")
    opts, pytest_args = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory(prefix="kazoo-suite-") as tmp:
        work = opts.keep or Path(tmp)
        with server_under_test(opts.server, Path(tmp) / "server") as address:
            run = run_suite(address, work, pytest_args or None, workers=opts.workers)
    print(run.output[-20000:])
    print(run.summary())
    for nodeid in run.ids("failed", "error"):
        print(f"FAILED {nodeid}")
    return 0 if run.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
