"""kazoo 2.11.0's own test suite passes against a real ZooKeeper 3.8 and against fleetmate alike."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kazoo_suite.plugin import ALLOWED_SKIPS, DESELECT
from tests.kazoo_suite.runner import SuiteRun, run_suite
from tests.kazoo_suite.servers import server_under_test

SUITE_TIMEOUT = 600  # seconds for the whole suite: ~30 s on 4 workers (~75 s serially) against either server
WORKERS = 4  # pytest-xdist processes; the suite mostly waits, so more workers than the 2 cores pay off


def _problems(run: SuiteRun) -> list[str]:
    """Why the run does not count as every non-deselected kazoo test passing (empty when it does)."""
    problems = []
    if not run.tests:
        problems.append(f"no per-test results (pytest exited with {run.returncode})")
    for nodeid in run.ids("failed", "error", "xpassed"):
        test = run.tests[nodeid]
        lines = test["message"].splitlines()
        shown = [line for line in lines if line.startswith("E ")][:4] + [line for line in lines if ".py:" in line][-1:]
        problems.append(f"{test['outcome'].upper()} {nodeid}: {' | '.join(shown) or test['message'][-300:]}")
    for nodeid in run.ids("skipped"):
        reason = run.tests[nodeid]["message"]
        if not any(allowed in reason for allowed in ALLOWED_SKIPS):
            problems.append(f"SKIPPED {nodeid}: {reason} (not an allowed skip)")
    stale = [key for key in DESELECT if not any(n == key or n.startswith(key + "::") for n in run.deselected)]
    problems.extend(f"deselect entry {key!r} matched no kazoo test" for key in stale)
    if run.returncode != 0 and not problems:
        problems.append(f"pytest exited with {run.returncode}")
    return problems


@pytest.mark.slow
@pytest.mark.timeout(SUITE_TIMEOUT + 120)
@pytest.mark.parametrize("server", ["zookeeper", "fleetmate"])
def test_kazoo_suite(server: str, tmp_path: Path) -> None:
    if server == "zookeeper":
        from bench.zkserver import zookeeper_classpath

        if zookeeper_classpath() is None:
            pytest.fail("no ZooKeeper: Debian's zookeeper package and a JRE are needed (make test-deps installs them)")
    with server_under_test(server, tmp_path / server) as address:
        run = run_suite(address, tmp_path / "kazoo", timeout=SUITE_TIMEOUT, workers=WORKERS)
    print(run.summary())
    problems = _problems(run)
    if problems:
        tail = "\n".join(run.output.splitlines()[-60:])
        listed = "\n".join(problems)
        pytest.fail(f"{run.summary()}\n{listed}\n--- tail of kazoo's pytest output ---\n{tail}", pytrace=False)
