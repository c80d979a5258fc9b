"""The server under test for kazoo's suite: a real ZooKeeper 3.8, a fleetmate, or an address given by hand."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from tests.harness import Fleetmate, running


@contextlib.contextmanager
def server_under_test(kind: str, workdir: Path) -> Iterator[str]:
    """Start `zookeeper` or `fleetmate` (anything else is taken as host:port) and yield its address."""
    if kind == "fleetmate":
        # No per-address connection limit, as bench/zkserver.py runs ZooKeeper (maxClientCnxns=0):
        # the suite's 4 workers open their sessions from this one host.
        with running(Fleetmate(workdir, env={"FLEETMATE_ZK_MAX_CLIENT_CNXNS": "0"})) as fm:
            yield fm.zk
        return
    if kind == "zookeeper":
        from bench.zkserver import ZooKeeper, zookeeper_classpath

        classpath = zookeeper_classpath()
        if classpath is None:
            raise RuntimeError("no ZooKeeper: install Debian's zookeeper package and a JRE (make test-deps)")
        zk = ZooKeeper(classpath)
        try:
            zk.start()
            yield f"{zk.host}:{zk.port}"
        finally:
            zk.stop()
        return
    yield kind
