"""Three fleetmate replicas on a 3-server NATS cluster: writes anywhere, reads converge, a stream leader dies."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import Fleetmate, ReplicaSet, natscluster, wait_for
from tests.harness.natscluster import REGISTRY_STREAM, NatsCluster, replica_env

# NATS Raft (server/raft.go): a follower calls an election after 4-9 s without a leader; allow a margin.
RAFT_ELECTION_MAX_S = 9.0
RESUME_MARGIN_S = 6.0


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with natscluster.nats_cluster(tmp_path / "nats") as cluster:
        yield cluster


@pytest.fixture
def replicas(tmp_path: Path, nats_cluster: NatsCluster) -> Iterator[ReplicaSet]:
    rs = ReplicaSet(tmp_path, nats_cluster.urls, env=replica_env())
    try:
        rs.start()
        yield rs
    finally:
        rs.close()


def node(url: str, path: str) -> str:
    return f"{url}/api/v1/registry/nodes{path}"


def test_writes_through_a_follower_reads_converge_everywhere(nats_cluster: NatsCluster, replicas: ReplicaSet) -> None:
    leader = replicas.leader()
    follower = next(n for n in replicas.urls if n != leader)
    with httpx.Client(timeout=10) as http:
        created = http.post(node(replicas.urls[follower], "/c/one"), json={"data": "v1", "parents": True})
        assert created.status_code == 201, created.text
        revision = created.json()["stat"]["mzxid"]
        # A linearizable read on every replica sees the write at once.
        for name, url in replicas.urls.items():
            got = http.get(node(url, "/c/one"))
            assert got.status_code == 200, (name, got.text)
            assert (got.json()["data"], got.json()["stat"]["mzxid"]) == ("v1", revision), name
        updated = http.put(node(replicas.urls[follower], "/c/one"), json={"data": "v2", "version": 0})
        assert updated.status_code == 200, updated.text
        # Serializable reads converge.
        for name, url in replicas.urls.items():
            wait_for(
                lambda url=url: http.get(node(url, "/c/one"), params={"serializable": "true"}).json()["data"] == "v2",
                5,
                f"{name} to apply the set",
            )
        # Every replica lists all three with one leader.
        for name in replicas.urls:
            view = replicas.view(name)
            rows = {r["node_id"]: r["role"] for r in view["replicas"]}
            assert rows == {leader: "leader", **{n: "follower" for n in replicas.urls if n != leader}}, (name, view)
            assert view["leader"]["node_id"] == leader
    info = nats_cluster.stream_info(REGISTRY_STREAM)
    assert info["config"]["num_replicas"] == 3
    assert len(info["cluster"]["replicas"]) == 2
    assert all(r["current"] for r in info["cluster"]["replicas"]), info["cluster"]


class KeyWriter(threading.Thread):
    """Compare-and-set loop on one key through one replica; records every outcome with its times."""

    def __init__(self, url: str, path: str) -> None:
        super().__init__(daemon=True)
        self.url = node(url, path)
        self.stop = threading.Event()
        self.acked: list[tuple[int, int, int, float, float]] = []  # (counter, revision, version, sent, acked)
        self.unknown: list[int] = []  # counters whose outcome is unknown (timeout, 5xx)
        self.version = -1  # the key's version as last learned; -1: not created yet
        self.n = 0

    def run(self) -> None:
        with httpx.Client(timeout=15) as http:
            while not self.stop.is_set():
                self.n += 1
                sent = time.monotonic()
                try:
                    if self.version < 0:
                        resp = http.post(self.url, json={"data": str(self.n), "parents": True})
                    else:
                        resp = http.put(self.url, json={"data": str(self.n), "version": self.version})
                except httpx.HTTPError:
                    self.unknown.append(self.n)
                    self.relearn(http)
                    continue
                if resp.status_code in (200, 201):
                    stat = resp.json()["stat"]
                    self.version = stat["version"]
                    self.acked.append((self.n, stat["mzxid"], stat["version"], sent, time.monotonic()))
                else:
                    if resp.status_code >= 500:
                        self.unknown.append(self.n)
                    time.sleep(0.05)
                    self.relearn(http)

    def relearn(self, http: httpx.Client) -> None:
        try:
            resp = http.get(self.url)
        except httpx.HTTPError:
            return
        if resp.status_code == 200:
            self.version = resp.json()["stat"]["version"]
        elif resp.status_code == 404:
            self.version = -1

    def resumed_after(self, t: float) -> float | None:
        """Seconds from t to the ack of the first write sent after t."""
        later = [acked for _, _, _, sent, acked in self.acked if sent >= t]
        return min(later) - t if later else None


def test_stream_leader_killed_writes_resume_nothing_lost(nats_cluster: NatsCluster, replicas: ReplicaSet) -> None:
    replicas.leader()
    writers = {name: KeyWriter(url, f"/sl/{name}") for name, url in replicas.urls.items()}
    for w in writers.values():
        w.start()
    wait_for(lambda: all(len(w.acked) >= 20 for w in writers.values()), 20, "writes through every replica")
    victim = nats_cluster.wait_stream_leader(REGISTRY_STREAM)
    killed_at = nats_cluster.kill(victim)
    new_leader = nats_cluster.wait_stream_leader(REGISTRY_STREAM)
    elected_s = time.monotonic() - killed_at
    limit = RAFT_ELECTION_MAX_S + RESUME_MARGIN_S
    try:
        wait_for(
            lambda: all(w.resumed_after(killed_at) is not None for w in writers.values()),
            limit + 5,
            "a write acknowledged through every replica after the kill",
        )
        so_far = {name: len(w.acked) for name, w in writers.items()}
        wait_for(
            lambda: all(len(w.acked) >= so_far[name] + 5 for name, w in writers.items()),
            20,
            "more writes acknowledged through every replica",
        )
    finally:
        for w in writers.values():
            w.stop.set()
        for w in writers.values():
            w.join(20)
    resumed = {name: w.resumed_after(killed_at) for name, w in writers.items()}
    print(
        f"\nstream leader {nats_cluster.members[victim].name} killed; "
        f"{nats_cluster.members[new_leader].name} leads after {elected_s:.2f} s; writes resumed after "
        + ", ".join(f"{n} {s:.2f} s" for n, s in resumed.items() if s is not None)
        + f"; unknown outcomes {sum(len(w.unknown) for w in writers.values())}"
    )
    assert new_leader != victim
    assert all(s is not None and s < limit for s in resumed.values()), resumed

    revisions = [rev for w in writers.values() for _, rev, _, _, _ in w.acked]
    assert len(revisions) == len(set(revisions)), "an acknowledged revision was given twice"
    # Every acknowledged write is there on every replica: the last acknowledged value, or a later unknown one.
    with httpx.Client(timeout=10) as http:
        for name, w in writers.items():
            last, last_rev, last_version, _, _ = w.acked[-1]
            later_unknown = [n for n in w.unknown if n > last]
            versions = [v for _, _, v, _, _ in w.acked]
            # Compare-and-set: each acknowledged write made exactly one new version.
            assert versions == sorted(set(versions)), f"{name}: versions not strictly increasing"
            for reader, url in replicas.urls.items():
                got = http.get(node(url, f"/sl/{name}")).json()
                assert int(got["data"]) in {last, *later_unknown}, (name, reader, got, last)
                assert got["stat"]["mzxid"] >= last_rev
                assert last_version <= got["stat"]["version"] <= last_version + len(later_unknown)
    nats_cluster.restart(victim)
    info = nats_cluster.stream_info(REGISTRY_STREAM)
    assert info["config"]["num_replicas"] == 3


def test_graceful_stop_steps_the_log_leader_away(
    tmp_path: Path, nats_cluster: NatsCluster, replicas: ReplicaSet
) -> None:
    # A replica connected only to the server that leads the log: its graceful stop moves the
    # leadership elsewhere, so that server (its "host") can go down without a Raft election.
    leader_index = nats_cluster.wait_stream_leader(REGISTRY_STREAM)
    leader_name = nats_cluster.members[leader_index].name
    extra = Fleetmate(
        tmp_path / "r4",
        env={**replica_env(), "FLEETMATE_NATS_URL": nats_cluster.members[leader_index].url, "FLEETMATE_NODE_ID": "r4"},
    ).start()
    try:
        assert extra.stop() == 0
        (moved,) = extra.logged("stepped stream leadership away before stopping")
        assert REGISTRY_STREAM in moved["streams"]
        assert moved["server"] == leader_name
        assert wait_for(
            lambda: nats_cluster.stream_leader(REGISTRY_STREAM) not in (None, leader_name), 10, "new leader"
        )
        # Writes go on at once through the remaining replicas.
        url = next(iter(replicas.urls.values()))
        assert httpx.post(node(url, "/after-stepdown"), json={"data": "x"}, timeout=10).status_code == 201
    finally:
        extra.kill()
