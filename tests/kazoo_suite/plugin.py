"""pytest plugin for kazoo's own test suite: its harness cluster becomes the one server named in KAZOO_SUITE_SERVER."""

# Loaded with `-p tests.kazoo_suite.plugin` by tests/kazoo_suite/runner.py, in a pytest run of the
# unpacked kazoo sdist (its own conftest and ini options apply). No kazoo file is edited: the plugin
# replaces kazoo.testing.harness.get_global_cluster, which KazooTestHarness.cluster (and so
# `servers`, `hosts` and `cluster[0].address`) reads on every use. kazoo's expire_session and
# lose_connection helpers act on the client alone (they queue _SESSION_EXPIRED/_CONNECTION_DROP
# into its connection loop), so an external server serves them as it is.

from __future__ import annotations

import importlib
import json
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from tests.kazoo_suite import RESULTS_ENV, SERVER_ENV

# The ONLY tests taken out of the run, each with why. A key is a node id relative to the sdist's
# root, or a class's node id (then every test of the class). Keep docs/compatibility-kazoo.md in step.
DESELECT: dict[str, str] = {
    "kazoo/tests/test_client.py::TestClient::test_update_host_list": (
        "stops and restarts server 1 of the ensemble (cluster[0].stop()/run())"
    ),
    "kazoo/tests/test_client.py::TestClient::test_request_queuing_session_recovered": (
        "stops the server to make the client queue requests, then restarts it"
    ),
    "kazoo/tests/test_client.py::TestClient::test_request_queuing_session_expired": (
        "stops the server to make the client queue requests, then restarts it"
    ),
    "kazoo/tests/test_client.py::TestSSLClient": "TLS: a secure client port and certificates from kazoo's cluster",
    "kazoo/tests/test_client.py::TestReconfig": (
        "reconfig: changes the ensemble's members (needs a quorum with reconfigEnabled and a super digest)"
    ),
    "kazoo/tests/test_connection.py::TestReadOnlyMode": (
        "stops 2 of a 3-server ensemble to get a read-only server, then restarts them"
    ),
    "kazoo/tests/test_sasl.py": "SASL (DIGEST-MD5, GSSAPI): restarts the ensemble with a JAAS configuration",
}

# Skips that kazoo decides itself and that are fine on any server: optional event loops that are not
# installed, and a check that runs only on kazoo's own CI. Any other skip fails tests/test_kazoo_suite.py
# (a "Must use Zookeeper 3.5 or above" skip would mean the server reported an old version).
ALLOWED_SKIPS: dict[str, str] = {
    "gevent not available": "gevent is not installed (kazoo's gevent handler is optional)",
    "eventlet handler not available": "eventlet is not installed (kazoo's eventlet handler is optional)",
    "Only run build config tests on CI": "kazoo's own CI check of the ZOOKEEPER_VERSION it set up",
}


def _stub_if_missing(name: str) -> None:
    """kazoo.testing.common imports pyOpenSSL and pyjks at import time only to make TLS keys for its own
    cluster, which is never built here: an empty module stands in when the package is not installed."""
    try:
        importlib.import_module(name)
    except ImportError:
        stub = types.ModuleType(name, f"stand-in for {name}: kazoo's own ZooKeeper cluster is not used")
        sys.modules[name] = stub


class ExternalServer:
    """One server that kazoo's harness cannot start, stop or reset: tests that try are deselected."""

    running = True

    def __init__(self, address: str) -> None:
        self.address = address
        host, _, port = address.rpartition(":")
        self.host = host
        self.client_port = int(port)

    @property
    def secure_address(self) -> str:
        raise RuntimeError(f"{self.address} has no TLS port: TLS tests are deselected in {__name__}")

    def _refuse(self, *_: Any, **__: Any) -> None:
        raise RuntimeError(f"cannot stop, start or reset the external server {self.address}: deselect the test")

    run = stop = reset = destroy = _refuse

    def get_logs(self, num_lines: int = 100) -> list[str]:
        return []


class ExternalCluster:
    """What KazooTestHarness needs of kazoo's ZookeeperCluster, for one external server."""

    def __init__(self, address: str) -> None:
        self._servers = [ExternalServer(address)]

    def __getitem__(self, index: int) -> ExternalServer:
        return self._servers[index]

    def __iter__(self) -> Any:
        return iter(self._servers)

    def __len__(self) -> int:
        return len(self._servers)

    def start(self) -> None:
        """setup_zookeeper calls this (with terminate) after failed health checks: the server is not ours."""

    def terminate(self) -> None:
        """KazooTestCase.tearDownClass calls this after every class: nothing to do."""

    def stop(self) -> None:
        raise RuntimeError("cannot stop the external server: deselect the test")

    def get_logs(self) -> list[str]:
        return []

    def get_ssl_client_configuration(self) -> dict[str, bytes]:
        raise RuntimeError("the external server has no TLS: TLS tests are deselected")


def _install_cluster() -> ExternalCluster:
    """Make kazoo's harness use the external server instead of starting its own 3-server ensemble."""
    address = os.environ.get(SERVER_ENV, "")
    if not address or ":" not in address:
        raise pytest.UsageError(f"{SERVER_ENV} must name the server under test as host:port")
    for name in ("OpenSSL", "jks"):
        _stub_if_missing(name)
    from kazoo.testing import harness

    cluster = ExternalCluster(address)
    harness.get_global_cluster = lambda: cluster
    return cluster


CLUSTER: ExternalCluster | None = None


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    global CLUSTER
    CLUSTER = _install_cluster()


def _deselect_reason(nodeid: str) -> str | None:
    for key, reason in DESELECT.items():
        if nodeid == key or nodeid.startswith(key + "::"):
            return reason
    return None


def pytest_report_header(config: pytest.Config) -> list[str]:
    import kazoo
    import kazoo.version

    where = Path(kazoo.__file__).parent
    address = CLUSTER[0].address if CLUSTER else "?"
    return [f"kazoo {kazoo.version.__version__} from {where}; server under test: {address}"]


_OUTCOMES: dict[str, dict[str, Any]] = {}  # node id -> outcome, seconds, failure text or skip reason
_DESELECTED: set[str] = set()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep = [item for item in items if _deselect_reason(item.nodeid) is None]
    gone = [item for item in items if _deselect_reason(item.nodeid) is not None]
    if gone:
        config.hook.pytest_deselected(items=gone)
        items[:] = keep
    _DESELECTED.update(item.nodeid for item in gone)
    workeroutput = getattr(config, "workeroutput", None)  # in a pytest-xdist worker: tell the controller
    if workeroutput is not None:
        workeroutput["kazoo_suite_deselected"] = sorted(_DESELECTED)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist's controller: collection (and so deselection) happened in the workers."""
    _DESELECTED.update(getattr(node, "workeroutput", {}).get("kazoo_suite_deselected", []))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    entry = _OUTCOMES.setdefault(report.nodeid, {"outcome": "passed", "duration": 0.0, "message": ""})
    entry["duration"] += report.duration
    if report.failed:
        if entry["outcome"] not in ("failed", "error"):
            entry["outcome"] = "failed" if report.when == "call" else "error"
        entry["message"] += f"[{report.when}] {report.longreprtext[-6000:]}\n"
    elif report.skipped:
        if hasattr(report, "wasxfail"):
            entry["outcome"] = "xfailed"
        elif entry["outcome"] == "passed":
            entry["outcome"] = "skipped"
            longrepr = report.longrepr
            entry["message"] = str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)
    elif report.when == "call" and hasattr(report, "wasxfail"):
        entry["outcome"] = "xpassed"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    target = os.environ.get(RESULTS_ENV)
    if not target or hasattr(session.config, "workerinput"):  # an xdist worker: the controller writes
        return
    body = {
        "server": CLUSTER[0].address if CLUSTER else None,
        "exitstatus": int(exitstatus),
        "tests": _OUTCOMES,
        "deselected": {nodeid: _deselect_reason(nodeid) for nodeid in sorted(_DESELECTED)},
    }
    Path(target).write_text(json.dumps(body, indent=1, sort_keys=True))
