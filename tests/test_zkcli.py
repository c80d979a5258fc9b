"""ZooKeeper's own zkCli.sh (Debian's zookeeper package) driven through its standard input, against a real
ZooKeeper 3.8 and fleetmate: the same sessions must print the same lines on both."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.zkserver import ZooKeeper, zookeeper_classpath
from tests.harness import Fleetmate, running

ZKCLI = Path("/usr/share/zookeeper/bin/zkCli.sh")


@pytest.fixture(scope="module", params=["zookeeper", "fleetmate"])
def fm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The server zkCli talks to (named fm for the tests' sake): a real ZooKeeper, then fleetmate."""
    assert ZKCLI.exists(), f"{ZKCLI} is missing: `make test` installs Debian's zookeeper package"
    if request.param == "fleetmate":
        with running(Fleetmate(tmp_path_factory.mktemp("zkcli"))) as server:
            yield Server(server.zk)
        return
    classpath = zookeeper_classpath()
    assert classpath is not None, "Debian's zookeeper package and a JRE are needed (make test-deps)"
    zk = ZooKeeper(classpath)
    zk.start()
    try:
        yield Server(f"{zk.host}:{zk.port}")
    finally:
        zk.stop()


@dataclass(frozen=True)
class Server:
    """The ZooKeeper address of the server under test."""

    zk: str


def zkcli(fm: Server, *commands: str) -> list[str]:
    """Run commands in one zkCli session (one ZooKeeper session); its output lines, noise dropped."""
    script = "".join(f"{c}\n" for c in (*commands, "quit"))
    out = subprocess.run(
        ["bash", str(ZKCLI), "-server", fm.zk],
        input=script,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # zkCli prints "Created ..." and errors on stderr
        text=True,
        timeout=60,
        check=False,
    ).stdout
    noise = ("SLF4J", "WATCHER::", "WatchedEvent", "Connecting to", "Welcome to", "JLine")
    return [line for line in out.splitlines() if line.strip() and not line.startswith(noise)]


def test_zkcli_create_ls_get_set_stat_delete(fm: Server) -> None:
    out = zkcli(
        fm,
        "create /cli hello",
        "create -s /cli/seq- a",
        "create -s /cli/seq- b",
        "create -e /cli/eph e",
        "ls /cli",
        "get /cli",
        "set /cli world",
        "get /cli",
        "stat /cli",
        "delete /cli/eph",
        "ls /cli",
    )
    assert out[:4] == ["Created /cli", "Created /cli/seq-0000000000", "Created /cli/seq-0000000001", "Created /cli/eph"]
    assert out[4] == "[eph, seq-0000000000, seq-0000000001]"
    assert out[5:7] == ["hello", "world"]
    stat = dict(line.split(" = ", 1) for line in out[7:18])
    assert stat["dataVersion"] == "1"
    assert stat["numChildren"] == "3"
    assert stat["ephemeralOwner"] == "0x0"
    assert out[18] == "[seq-0000000000, seq-0000000001]"


def test_zkcli_ephemeral_lives_as_long_as_its_session(fm: Server) -> None:
    assert zkcli(fm, "create -e /eph2 x", "ls /eph2") == ["Created /eph2", "[]"]
    # zkCli closed its session on quit: the node is gone for the next session.
    assert zkcli(fm, "ls /eph2") == ["Node does not exist: /eph2"]


def test_zkcli_deleteall_and_errors(fm: Server) -> None:
    out = zkcli(fm, "create /tree", "create /tree/a", "create /tree/a/b", "delete /tree", "deleteall /tree", "ls /tree")
    assert out[:3] == ["Created /tree", "Created /tree/a", "Created /tree/a/b"]
    assert out[3] == "Node not empty: /tree"
    assert out[4] == "Node does not exist: /tree"
