"""The ZooKeeper front end with kazoo and raw packets: operations, errors, sessions, watches, ACLs, recipes, 4lw."""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import (
    BadVersionError,
    NoAuthError,
    NoChildrenForEphemeralsError,
    NodeExistsError,
    NoNodeError,
    NotEmptyError,
    RolledBackError,
    RuntimeInconsistency,
)
from kazoo.security import make_acl, make_digest_acl

from tests.harness import Fleetmate, NatsServer, running, wait_for
from tests.harness.zkwire import WireClient, four_letter, pack_string, split_addr


@pytest.fixture(scope="module")
def fm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleetmate]:
    tmp: Path = tmp_path_factory.mktemp("zk")
    env = {
        "FLEETMATE_REGISTRY_SESSION_TIMEOUT_MIN_MS": "1000",
        "FLEETMATE_ZK_FOUR_LETTER_WORDS": "ruok,srvr,mntr,stat,envi",
        "FLEETMATE_REGISTRY_CONTAINER_CHECK_INTERVAL": "0.5",
    }
    with running(Fleetmate(tmp, env=env)) as server:
        yield server


@contextmanager
def kazoo(hosts: str, timeout: float = 10.0) -> Iterator[KazooClient]:
    client = KazooClient(hosts=hosts, timeout=timeout)
    client.start(timeout=10)
    try:
        yield client
    finally:
        client.stop()
        client.close()


def test_create_get_set_delete_and_errors(fm: Fleetmate) -> None:
    with kazoo(fm.zk) as zk:
        assert zk.create("/crud", b"one") == "/crud"
        data, stat = zk.get("/crud")
        assert data == b"one"
        assert (stat.version, stat.dataLength, stat.numChildren) == (0, 3, 0)
        assert stat.czxid == stat.mzxid == stat.pzxid > 0
        assert zk.set("/crud", b"two", version=0).version == 1
        with pytest.raises(BadVersionError):
            zk.set("/crud", b"three", version=0)
        with pytest.raises(NodeExistsError):
            zk.create("/crud")
        with pytest.raises(NoNodeError):
            zk.create("/missing/child")
        zk.create("/crud/kid", b"")
        with pytest.raises(NotEmptyError):
            zk.delete("/crud")
        assert zk.get_children("/crud") == ["kid"]
        kids, parent = zk.get_children("/crud", include_data=True)
        assert kids == ["kid"]
        assert parent.numChildren == 1
        assert parent.cversion == 1
        assert zk.exists("/nope") is None
        with pytest.raises(NoNodeError):
            zk.get("/nope")
        zk.delete("/crud", recursive=True)
        assert zk.exists("/crud") is None
        # Nothing half-done by the failures above.
        assert zk.exists("/missing") is None


def test_sequential_and_ephemeral_nodes(fm: Fleetmate) -> None:
    with kazoo(fm.zk) as a:
        a.create("/seq")
        names = [a.create("/seq/item-", b"", sequence=True) for _ in range(3)]
        assert names == ["/seq/item-0000000000", "/seq/item-0000000001", "/seq/item-0000000002"]
        assert a.create("/seq/e", b"x", ephemeral=True) == "/seq/e"
        assert a.exists("/seq/e").ephemeralOwner == a.client_id[0]
        with pytest.raises(NoChildrenForEphemeralsError):
            a.create("/seq/e/kid")
        with kazoo(fm.zk) as b:
            assert b.exists("/seq/e") is not None
            a.stop()  # closes the session: its ephemeral node goes at once
            assert b.exists("/seq/e") is None
            assert sorted(b.get_children("/seq")) == ["item-0000000000", "item-0000000001", "item-0000000002"]
        a.close()


def test_ephemeral_node_goes_when_its_session_expires(fm: Fleetmate) -> None:
    silent = WireClient(fm.zk, timeout_ms=1000)  # never pings
    assert silent.timeout_ms == 1000
    err, _ = silent.create("/expiring", b"", flags=1)
    assert err == 0
    with kazoo(fm.zk) as zk:
        assert zk.exists("/expiring") is not None
        wait_for(lambda: zk.exists("/expiring") is None, 10, "the silent session to expire")
    # The server closed the expired session's connection.
    with pytest.raises((ConnectionError, OSError)):
        silent.request(3, pack_string("/expiring") + b"\x00")


def test_reconnect_with_an_expired_session_is_refused(fm: Fleetmate) -> None:
    with kazoo(fm.zk) as zk:
        sid, password = zk.client_id
    # The session was closed by stop(): reattaching to it is SessionExpired (timeout 0 in the answer).
    import socket as _socket

    body = struct.pack(">iqiq", 0, 0, 10000, sid) + struct.pack(">i", len(password)) + password + b"\x00"
    with _socket.create_connection(split_addr(fm.zk), timeout=5) as sock:
        sock.sendall(struct.pack(">i", len(body)) + body)
        size = struct.unpack(">i", sock.recv(4))[0]
        reply = sock.recv(size)
        _, timeout_ms, session = struct.unpack_from(">iiq", reply)
        assert (timeout_ms, session) == (0, 0)


def test_multi_is_atomic(fm: Fleetmate) -> None:
    with kazoo(fm.zk) as zk:
        zk.create("/tx", b"0")
        t = zk.transaction()
        t.create("/tx/a", b"a")
        t.set_data("/tx", b"1", version=0)
        t.check("/tx", 1)
        assert t.commit() == ["/tx/a", zk.exists("/tx"), True]
        t = zk.transaction()
        t.create("/tx/b", b"b")
        t.set_data("/tx", b"2", version=0)  # stale: the whole transaction fails
        t.delete("/tx/a")
        results = t.commit()
        # ZooKeeper's shape: before the failure "rolled back", the failure, after it "runtime inconsistency".
        assert [type(r) for r in results] == [RolledBackError, BadVersionError, RuntimeInconsistency]
        assert zk.get_children("/tx") == ["a"]
        assert zk.get("/tx")[0] == b"1"


def test_one_shot_watches_fire_once(fm: Fleetmate) -> None:
    with kazoo(fm.zk) as zk:
        zk.create("/w", b"0")
        data_events: list[Any] = []
        child_events: list[Any] = []
        exist_events: list[Any] = []
        zk.get("/w", watch=data_events.append)
        zk.get_children("/w", watch=child_events.append)
        zk.exists("/w/later", watch=exist_events.append)
        zk.set("/w", b"1")
        zk.set("/w", b"2")  # the data watch already fired: no second event
        zk.create("/w/later")
        wait_for(lambda: data_events and child_events and exist_events, 5, "three watch events")
        # Events reach the session in order: once a later watch fired, any stray second event has too.
        sentinel: list[Any] = []
        zk.exists("/sentinel", watch=sentinel.append)
        zk.create("/sentinel")
        wait_for(lambda: sentinel, 5, "the sentinel's watch event")
        assert [(e.type, e.path) for e in data_events] == [("CHANGED", "/w")]
        assert [(e.type, e.path) for e in child_events] == [("CHILD", "/w")]
        assert [(e.type, e.path) for e in exist_events] == [("CREATED", "/w/later")]


def test_persistent_recursive_watch_streams_in_order(fm: Fleetmate) -> None:
    with kazoo(fm.zk) as zk:
        zk.create("/pw")
        watcher = WireClient(fm.zk)
        try:
            _, err, _ = watcher.request(106, pack_string("/pw") + struct.pack(">i", 1))  # addWatch recursive
            assert err == 0
            zk.create("/pw/a", b"")
            zk.set("/pw/a", b"x")
            zk.create("/pw/a/b", b"")
            zk.delete("/pw/a/b")
            seen = [watcher.next_notification() for _ in range(4)]
            assert seen == [(1, 3, "/pw/a"), (3, 3, "/pw/a"), (1, 3, "/pw/a/b"), (2, 3, "/pw/a/b")]
            # It is persistent: later events keep coming.
            zk.set("/pw/a", b"y")
            assert watcher.next_notification() == (3, 3, "/pw/a")
            # removeWatches (type any) ends it; a second removal finds nothing (NoWatcher).
            assert watcher.request(18, pack_string("/pw") + struct.pack(">i", 3))[1] == 0
            assert watcher.request(18, pack_string("/pw") + struct.pack(">i", 3))[1] == -121
        finally:
            watcher.close()


def test_lock_election_barrier_counter_recipes(fm: Fleetmate) -> None:
    with kazoo(fm.zk) as a, kazoo(fm.zk) as b:
        order: list[str] = []
        lock_a, lock_b = a.Lock("/recipes/lock", "a"), b.Lock("/recipes/lock", "b")
        assert lock_a.acquire(timeout=5)

        def take_b() -> None:
            with lock_b:
                order.append("b")

        t = threading.Thread(target=take_b)
        t.start()
        wait_for(lambda: len(lock_a.contenders()) == 2, 5, "b queued behind a for the lock")
        assert order == []  # b waits for a
        order.append("a")
        lock_a.release()
        t.join(10)
        assert order == ["a", "b"]

        elected, resign = threading.Event(), threading.Event()

        def lead() -> None:
            elected.set()
            resign.wait(10)

        election = a.Election("/recipes/election", "a")
        threading.Thread(target=election.run, args=(lead,), daemon=True).start()
        assert elected.wait(5)
        assert b.Election("/recipes/election").contenders() == ["a"]
        resign.set()
        wait_for(lambda: b.Election("/recipes/election").contenders() == [], 5, "the leader to resign")

        barrier = a.Barrier("/recipes/barrier")
        barrier.create()
        assert not b.Barrier("/recipes/barrier").wait(0.2)
        barrier.remove()
        assert b.Barrier("/recipes/barrier").wait(1)

        counter_a, counter_b = a.Counter("/recipes/counter"), b.Counter("/recipes/counter")
        for _ in range(5):
            counter_a += 1
            counter_b += 2
        assert counter_a.value == counter_b.value == 15


def test_rest_and_zookeeper_share_one_tree(fm: Fleetmate) -> None:
    api = httpx.Client(base_url=fm.url, timeout=10)
    with kazoo(fm.zk) as zk:
        zk.create("/shared-zk", b"from kazoo")
        body = api.get("/api/v1/registry/nodes/shared-zk").json()
        assert body["data"] == "from kazoo"
        assert api.post("/api/v1/registry/nodes/shared-rest", json={"data": "from rest"}).status_code == 201
        data, stat = zk.get("/shared-rest")
        assert data == b"from rest"
        assert stat.mzxid == api.get("/api/v1/registry/nodes/shared-rest").json()["stat"]["mzxid"]


def test_digest_acl_is_enforced(fm: Fleetmate) -> None:
    acl = make_digest_acl("ops", "s3cret", all=True)
    with kazoo(fm.zk) as owner:
        owner.add_auth("digest", "ops:s3cret")
        owner.create("/secured", b"secret", acl=[acl])
        assert owner.get("/secured")[0] == b"secret"
        assert owner.get_acls("/secured")[0] == [acl]
        # Exact duplicates are dropped at create and setACL, as ZooKeeper does; other entries stay.
        read = make_acl("world", "anyone", read=True)
        owner.create("/twice", b"", acl=[acl, acl, read])
        assert owner.get_acls("/twice")[0] == [acl, read]
        owner.set_acls("/twice", [read, read])
        assert owner.get_acls("/twice")[0] == [read]
        owner.delete("/twice")
        with kazoo(fm.zk) as stranger:
            with pytest.raises(NoAuthError):
                stranger.get("/secured")
            with pytest.raises(NoAuthError):
                stranger.set("/secured", b"mine")
            with pytest.raises(NoAuthError):
                stranger.create("/secured/kid")
            with pytest.raises(NoAuthError):  # getACL needs READ or ADMIN, as on ZooKeeper
                stranger.get_acls("/secured")
            # Readable but not administrable: the digest's hash is hidden (user:x).
            owner.create("/readable", b"", acl=[acl, make_acl("world", "anyone", read=True)])
            seen = stranger.get_acls("/readable")[0]
            assert [(a.id.scheme, a.id.id, a.perms) for a in seen] == [("digest", "ops:x", 31), ("world", "anyone", 1)]
            stranger.add_auth("digest", "ops:s3cret")
            assert stranger.get("/secured")[0] == b"secret"
            assert stranger.get_acls("/readable")[0][0] == acl
        assert owner.get("/secured")[0] == b"secret"


def test_four_letter_words(fm: Fleetmate) -> None:
    assert four_letter(fm.zk, "ruok") == "imok"
    srvr = four_letter(fm.zk, "srvr")
    assert "Mode: " in srvr
    assert "Node count: " in srvr
    mntr = dict(line.split("\t", 1) for line in four_letter(fm.zk, "mntr").splitlines())
    assert int(mntr["zk_znode_count"]) >= 1
    assert four_letter(fm.zk, "cons") == "cons is not executed because it is not in the whitelist.\n"


def test_version_is_one_zookeeper_clients_parse(fm: Fleetmate) -> None:
    # kazoo reads `envi`'s zookeeper.version and picks features by its leading x.y.z.
    with kazoo(fm.zk) as zk:
        assert zk.server_version() == (3, 8, 4)
    assert four_letter(fm.zk, "srvr").startswith("Zookeeper version: 3.8.4-fleetmate-")
    envi = four_letter(fm.zk, "envi")
    assert "zookeeper.version=3.8.4-fleetmate-" in envi
    assert "fleetmate.version=" in envi
    mntr = dict(line.split("\t", 1) for line in four_letter(fm.zk, "mntr").splitlines())
    assert mntr["zk_version"].startswith("3.8.4-fleetmate-")


def test_null_data_is_kept_apart_from_empty(fm: Fleetmate) -> None:
    with kazoo(fm.zk) as zk:
        zk.create("/null", None)
        zk.create("/empty", b"")
        assert zk.get("/null")[0] is None
        assert zk.get("/null")[1].dataLength == 0
        assert zk.get("/empty")[0] == b""
        zk.set("/empty", None)
        assert zk.get("/empty")[0] is None
        zk.set("/null", b"")
        assert zk.get("/null")[0] == b""
        # kazoo's transactions take bytes only: a multi with null data (length -1) by hand.
        null = struct.pack(">i", -1)
        acl = struct.pack(">ii", 1, 31) + pack_string("world") + pack_string("anyone")
        create = struct.pack(">i?i", 1, False, -1) + pack_string("/null/in-multi") + null + acl + struct.pack(">i", 0)
        set_data = struct.pack(">i?i", 5, False, -1) + pack_string("/null") + null + struct.pack(">i", -1)
        client = WireClient(fm.zk)
        try:
            _, err, _ = client.request(14, create + set_data + struct.pack(">i?i", -1, True, -1))
            assert err == 0
        finally:
            client.close()
        assert zk.get("/null/in-multi")[0] is None
        assert zk.get("/null")[0] is None
        # The REST API says null for null and "" for empty, and takes null back.
        assert httpx.get(f"{fm.url}/api/v1/registry/nodes/null").json()["data"] is None
        assert httpx.get(f"{fm.url}/api/v1/registry/nodes/empty").json()["data"] is None
        zk.set("/empty", b"")
        assert httpx.get(f"{fm.url}/api/v1/registry/nodes/empty").json()["data"] == ""
        created = httpx.post(f"{fm.url}/api/v1/registry/nodes/rest-null", json={"data": None})
        assert created.status_code == 201, created.text
        assert zk.get("/rest-null")[0] is None
        assert httpx.put(f"{fm.url}/api/v1/registry/nodes/empty", json={"data": None}).status_code == 200
        assert zk.get("/empty")[0] is None
        assert httpx.put(f"{fm.url}/api/v1/registry/nodes/empty", json={"data": ""}).status_code == 200
        assert zk.get("/empty")[0] == b""
        zk.delete("/null", recursive=True)
        zk.delete("/empty")
        zk.delete("/rest-null")


def test_set_watches_and_add_watch_answer_as_the_java_client_expects(fm: Fleetmate) -> None:
    # Java's client gives setWatches an ordinary xid and expects it back in order; addWatch's
    # reply carries an ErrorResponse (one int). kazoo's -8 is echoed the same way.
    client = WireClient(fm.zk)
    try:
        empty = struct.pack(">i", 0)
        _, err, body = client.request(101, struct.pack(">q", 0) + empty * 3)  # request() checks the xid
        assert (err, body) == (0, b"")
        _, err, body = client.request(105, struct.pack(">q", 0) + empty * 5)  # setWatches2
        assert (err, body) == (0, b"")
        _, err, body = client.request(106, pack_string("/") + struct.pack(">i", 1))  # persistent recursive
        assert (err, body) == (0, struct.pack(">i", 0))
        _, err, _ = client.request(3, pack_string("/") + b"\x00")  # the next request still matches
        assert err == 0
    finally:
        client.close()


@pytest.mark.parametrize(
    ("what", "packet"),
    [
        ("negative length", struct.pack(">i", -5)),
        ("oversize length", struct.pack(">i", 64 << 20)),
        ("truncated getData", struct.pack(">iii", 6, 1, 4) + b"\x00\x00"),
        ("string longer than the packet", struct.pack(">iiii", 12, 2, 4, 1000)),
    ],
)
def test_bad_packets_close_only_that_connection(fm: Fleetmate, what: str, packet: bytes) -> None:
    with kazoo(fm.zk) as zk:
        zk.ensure_path("/bad")
        before = zk.get("/bad")[1]
        client = WireClient(fm.zk)
        client.send_raw(packet)
        with pytest.raises((ConnectionError, OSError)):
            client.read_frame()
        client.sock.close()
        # The server and every other session go on; nothing changed.
        assert zk.get("/bad")[1] == before
        assert four_letter(fm.zk, "ruok") == "imok"


def test_unknown_op_is_unimplemented_and_the_session_goes_on(fm: Fleetmate) -> None:
    client = WireClient(fm.zk)
    try:
        assert client.request(16)[1] == -6  # reconfig: not supported
        assert client.request(999)[1] == -6
        err, _ = client.create("/after-unknown", b"")
        assert err == 0
    finally:
        client.close()


def test_session_moves_to_another_replica(tmp_path: Path, nats_server: NatsServer) -> None:
    env = {"FLEETMATE_NATS_URL": nats_server.url, "FLEETMATE_LEASE_TTL": "2", "FLEETMATE_LEASE_RENEW_INTERVAL": "0.5"}
    with ExitStack() as stack:
        r1 = stack.enter_context(running(Fleetmate(tmp_path / "r1", env={**env, "FLEETMATE_NODE_ID": "r1"})))
        r2 = stack.enter_context(running(Fleetmate(tmp_path / "r2", env={**env, "FLEETMATE_NODE_ID": "r2"})))
        with kazoo(f"{r1.zk},{r2.zk}", timeout=10) as zk:
            zk.create("/moving", b"", ephemeral=True)
            sid = zk.client_id[0]
            _host, port = zk._connection._socket.getpeername()[:2]
            victim = r1 if r1.zk.endswith(f":{port}") else r2
            survivor = r2 if victim is r1 else r1
            victim.kill()
            wait_for(lambda: zk.connected and zk._connection._socket.getpeername()[1] != port, 20, "reconnect")
            assert zk.client_id[0] == sid
            assert zk.exists("/moving") is not None
            with kazoo(survivor.zk) as other:
                assert other.exists("/moving").ephemeralOwner == sid


def test_ttl_nodes_go_when_unmodified_and_childless(fm: Fleetmate) -> None:
    client = WireClient(fm.zk)
    acl = struct.pack(">ii", 1, 31) + pack_string("world") + pack_string("anyone")

    def create_ttl(path: str, flags: int, ttl_ms: int) -> int:
        body = pack_string(path) + struct.pack(">i", 0) + acl + struct.pack(">iq", flags, ttl_ms)
        return client.request(21, body)[1]

    try:
        assert create_ttl("/ttl-a", 5, 1500) == 0
        assert create_ttl("/ttl-parent", 5, 1500) == 0
        assert create_ttl("/ttl-bad", 5, 0) == -8  # BadArguments: a TTL must be positive
        assert create_ttl("/ttl-bad", 0, 1500) == -8  # a plain persistent node takes no TTL
        with kazoo(fm.zk) as zk:
            zk.create("/ttl-parent/kid")
            assert zk.exists("/ttl-a") is not None
            wait_for(lambda: zk.exists("/ttl-a") is None, 10, "the TTL node to be reaped")
            assert zk.exists("/ttl-parent") is not None  # it has a child
            zk.delete("/ttl-parent/kid")
            wait_for(lambda: zk.exists("/ttl-parent") is None, 10, "the emptied TTL node to be reaped")
            assert zk.exists("/ttl-bad") is None
    finally:
        client.close()


def test_watch_event_arrives_before_any_reply_showing_the_change(fm: Fleetmate) -> None:
    with kazoo(fm.zk) as writer:
        writer.create("/order", b"0")
        reader = WireClient(fm.zk)
        try:
            for n in range(1, 30):
                get = pack_string("/order") + b"\x01"  # getData with watch
                reader.request(4, get)
                writer.set("/order", str(n).encode())
                _, err, body = reader.request(4, pack_string("/order") + b"\x00")
                assert err == 0
                size = struct.unpack_from(">i", body)[0]
                assert body[4 : 4 + size] == str(n).encode()
                # The reply shows the change, so the event must already be here.
                assert reader.notifications == [(3, 3, "/order")], n
                reader.notifications.clear()
        finally:
            reader.close()
