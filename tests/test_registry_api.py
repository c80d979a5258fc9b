"""The registry over REST and the watch WebSocket, against a real `fleetmate serve`."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.harness import Fleetmate, running, wait_for

ENV = {
    "FLEETMATE_REGISTRY_SESSION_TIMEOUT_MIN_MS": "300",
    "FLEETMATE_REGISTRY_MAX_DATA_BYTES": "1024",
    "FLEETMATE_REGISTRY_MAX_PATH_BYTES": "200",
    "FLEETMATE_REGISTRY_EVENT_HISTORY": "50",
    "FLEETMATE_REGISTRY_CONTAINER_CHECK_INTERVAL": "0.5",
}


@pytest.fixture(scope="module")
def fm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleetmate]:
    with running(Fleetmate(tmp_path_factory.mktemp("reg"), env=ENV)) as server:
        yield server


class Api:
    """Tiny REST client for the tests."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=10)

    def create(self, path: str, data: str = "", **flags: Any) -> httpx.Response:
        return self.http.post(f"/api/v1/registry/nodes{path}", json={"data": data, **flags})

    def get(self, path: str, **params: Any) -> httpx.Response:
        return self.http.get(f"/api/v1/registry/nodes{path}", params=params)

    def set(self, path: str, data: str, version: int = -1) -> httpx.Response:
        return self.http.put(f"/api/v1/registry/nodes{path}", json={"data": data, "version": version})

    def delete(self, path: str, **params: Any) -> httpx.Response:
        return self.http.delete(f"/api/v1/registry/nodes{path}", params=params)

    def children(self, path: str, **params: Any) -> httpx.Response:
        return self.http.get(f"/api/v1/registry/children{path}", params=params)

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = self.http.get("/api/v1/registry").json()
        return body

    def session(self, timeout_ms: int = 10000) -> int:
        r = self.http.post("/api/v1/sessions", json={"timeout_ms": timeout_ms})
        assert r.status_code == 201, r.text
        sid: int = r.json()["session_id"]
        return sid

    def tree(self) -> dict[str, Any]:
        """Every node's data and stat, for 'nothing changed' checks."""
        out: dict[str, Any] = {}
        stack = ["/"]
        while stack:
            path = stack.pop()
            out[path] = self.get(path, encoding="base64").json()
            for name in self.children(path).json()["children"]:
                stack.append(("" if path == "/" else path) + "/" + name)
        return out


@pytest.fixture
def api(fm: Fleetmate) -> Api:
    return Api(fm.url)


def test_crud_and_stat(api: Api) -> None:
    r = api.create("/crud", "hello")
    assert r.status_code == 201
    created = r.json()["stat"]
    assert created["version"] == 0
    assert created["dataLength"] == 5
    assert created["czxid"] == created["mzxid"] == created["pzxid"]
    assert set(created) == {
        "czxid", "mzxid", "pzxid", "ctime", "mtime", "version", "cversion",
        "aversion", "ephemeralOwner", "dataLength", "numChildren",
    }  # fmt: skip

    got = api.get("/crud").json()
    assert got["data"] == "hello"
    assert got["encoding"] == "utf-8"

    r = api.set("/crud", "v2", version=0)
    assert r.status_code == 200
    assert r.json()["stat"]["version"] == 1
    assert r.json()["stat"]["mzxid"] > created["mzxid"]

    stale = api.set("/crud", "v3", version=0)
    assert stale.status_code == 412
    assert stale.json()["error"] == "BadVersion"
    assert api.get("/crud").json()["data"] == "v2"

    assert api.create("/crud", "again").json()["error"] == "NodeExists"
    assert api.create("/crud", "again").status_code == 409
    assert api.create("/nope/child").status_code == 404

    api.create("/crud/kid")
    not_empty = api.delete("/crud")
    assert not_empty.status_code == 409
    assert not_empty.json()["error"] == "NotEmpty"
    wrong = api.delete("/crud/kid", version=7)
    assert wrong.status_code == 412
    assert api.delete("/crud", recursive="true").json()["deleted"] == ["/crud/kid", "/crud"]
    assert api.get("/crud").status_code == 404
    stat = api.http.get("/api/v1/registry/stat/crud")
    assert stat.status_code == 404
    assert stat.json()["error"] == "NoNode"


def test_binary_data_and_encodings(api: Api) -> None:
    raw = bytes(range(256))
    r = api.create("/bin", base64.b64encode(raw).decode(), encoding="base64")
    assert r.status_code == 201
    got = api.get("/bin").json()
    assert got["encoding"] == "base64"
    assert base64.b64decode(got["data"]) == raw
    assert api.get("/bin", encoding="utf-8").status_code == 400
    api.create("/txt", "héllo")
    assert api.get("/txt", encoding="base64").json()["data"] == base64.b64encode("héllo".encode()).decode()


def test_sequential_names(api: Api) -> None:
    api.create("/seq")
    names = [api.create("/seq/item-", sequential=True).json()["path"] for _ in range(3)]
    assert names == ["/seq/item-0000000000", "/seq/item-0000000001", "/seq/item-0000000002"]
    api.delete("/seq/item-0000000001")
    assert api.create("/seq/item-", sequential=True).json()["path"] == "/seq/item-0000000004"
    listed = api.children("/seq", stat="true").json()
    assert [c["name"] for c in listed["children"]] == [
        "item-0000000000",
        "item-0000000002",
        "item-0000000004",
    ]
    assert listed["stat"]["cversion"] == 5


def test_parents_and_containers(api: Api) -> None:
    assert api.create("/deep/a/b/c", "x", parents=True).status_code == 201
    assert api.children("/deep/a").json()["children"] == ["b"]
    assert api.create("/box", container=True).status_code == 201
    api.create("/box/item")
    api.delete("/box/item")
    wait_for(lambda: api.get("/box").status_code == 404, 10, "the leader to reap the empty container")


def test_multi_is_atomic(api: Api) -> None:
    api.create("/multi")
    before = api.tree()
    revision = api.status()["revision"]
    bad = api.http.post(
        "/api/v1/registry/multi",
        json={
            "ops": [
                {"op": "create", "path": "/multi/a", "data": "1"},
                {"op": "set", "path": "/multi", "data": "changed"},
                {"op": "check", "path": "/multi", "version": 42},
            ]
        },
    )
    assert bad.status_code == 412
    assert bad.json()["error"] == "BadVersion"
    assert bad.json()["detail"]["failed_index"] == 2
    assert api.tree() == before
    assert api.status()["revision"] == revision

    ok = api.http.post(
        "/api/v1/registry/multi",
        json={
            "ops": [
                {"op": "create", "path": "/multi/a", "data": "1"},
                {"op": "set", "path": "/multi", "data": "changed"},
                {"op": "check", "path": "/multi", "version": 1},
                {"op": "delete", "path": "/multi/a"},
            ]
        },
    )
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert [r["op"] for r in body["results"]] == ["create", "set", "check", "delete"]
    assert body["revision"] == api.status()["revision"]  # one revision for the whole multi
    assert api.get("/multi").json()["data"] == "changed"


def test_ephemeral_nodes_go_with_their_session(api: Api) -> None:
    api.create("/eph")
    sid = api.session()
    assert api.create("/eph/mine", ephemeral=True, session_id=sid).status_code == 201
    assert api.get("/eph/mine").json()["stat"]["ephemeralOwner"] == sid
    no_kids = api.create("/eph/mine/kid")
    assert no_kids.status_code == 400
    assert no_kids.json()["error"] == "NoChildrenForEphemerals"
    assert api.http.get(f"/api/v1/sessions/{sid}").json()["ephemerals"] == ["/eph/mine"]
    closed = api.http.delete(f"/api/v1/sessions/{sid}")
    assert closed.json()["deleted"] == ["/eph/mine"]
    assert api.get("/eph/mine").status_code == 404
    gone = api.http.put(f"/api/v1/sessions/{sid}/keepalive")
    assert gone.status_code == 404
    assert gone.json()["error"] == "SessionExpired"
    assert api.create("/eph/late", ephemeral=True, session_id=sid).json()["error"] == "SessionExpired"


def test_session_expires_without_keepalives(api: Api) -> None:
    api.create("/exp")
    sid = api.session(timeout_ms=300)  # the test server allows 300 ms
    api.create("/exp/node", ephemeral=True, session_id=sid)
    for _ in range(4):  # kept alive for a while...
        time.sleep(0.15)
        assert api.http.put(f"/api/v1/sessions/{sid}/keepalive").status_code == 200
    assert api.get("/exp/node").status_code == 200
    wait_for(lambda: api.get("/exp/node").status_code == 404, 5, "expiry to delete the ephemeral node")
    assert api.http.get(f"/api/v1/sessions/{sid}").status_code == 404


def _ws(fm: Fleetmate, **params: Any) -> Any:
    query = "&".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in params.items())
    return connect(fm.url.replace("http", "ws", 1) + "/api/v1/watch?" + query, open_timeout=5)


def _recv(ws: Any, timeout: float = 5) -> dict[str, Any]:
    msg: dict[str, Any] = json.loads(ws.recv(timeout=timeout))
    return msg


def test_persistent_watch_streams_in_order_and_resumes(fm: Fleetmate, api: Api) -> None:
    api.create("/pw")
    with _ws(fm, path="/pw", recursive=True) as ws:
        ready = _recv(ws)
        assert ready["type"] == "ready"
        api.create("/pw/a", "1")
        api.set("/pw/a", "2")
        api.create("/pw/a/b", "3")
        api.delete("/pw/a", recursive="true")
        events = [_recv(ws) for _ in range(5)]
    assert [(e["type"], e["path"]) for e in events] == [
        ("created", "/pw/a"),
        ("changed", "/pw/a"),
        ("created", "/pw/a/b"),
        ("deleted", "/pw/a/b"),
        ("deleted", "/pw/a"),
    ]
    revisions = [e["revision"] for e in events]
    assert revisions == sorted(revisions)
    # Resume from the second event: the history replays it and what followed.
    with _ws(fm, path="/pw", recursive=True, since=revisions[1]) as ws:
        assert _recv(ws)["type"] == "ready"
        replay = [_recv(ws) for _ in range(4)]
    assert replay == events[1:]


def test_plain_persistent_watch_sees_only_its_node(fm: Fleetmate, api: Api) -> None:
    api.create("/pp")
    with _ws(fm, path="/pp") as ws:
        _recv(ws)
        api.create("/pp/child")
        api.set("/pp", "x")
        got = [_recv(ws), _recv(ws)]
    assert [(e["type"], e["path"]) for e in got] == [("children", "/pp"), ("changed", "/pp")]


def test_one_shot_watch_fires_once(fm: Fleetmate, api: Api) -> None:
    api.create("/once")
    with _ws(fm, path="/once", once=True, kind="data") as ws:
        _recv(ws)
        api.set("/once", "1")
        api.set("/once", "2")
        event = _recv(ws)
        assert (event["type"], event["path"], event["version"]) == ("changed", "/once", 1)
        with pytest.raises(ConnectionClosed):  # the server closes after one event
            ws.recv(timeout=1)


def test_compacted_resume_is_refused(fm: Fleetmate, api: Api) -> None:
    api.create("/churn")
    for i in range(60):  # more events than the history of 50 keeps
        api.set("/churn", str(i))
    with _ws(fm, path="/churn", since=1) as ws:
        err = _recv(ws)
    assert err["type"] == "error"
    assert err["error"] == "Compacted"
    assert "oldest revision that can be resumed" in err["message"]


def test_lock_and_election(api: Api) -> None:
    s1, s2 = api.session(), api.session()
    first = api.http.post("/api/v1/recipes/lock", json={"path": "/locks/db", "session_id": s1, "owner": "one"})
    assert first.status_code == 200, first.text
    busy = api.http.post(
        "/api/v1/recipes/lock", json={"path": "/locks/db", "session_id": s2, "owner": "two", "wait_ms": 200}
    )
    assert busy.status_code == 409
    assert busy.json()["error"] == "LockTimeout"
    assert api.children("/locks/db").json()["children"] == [first.json()["node"].rsplit("/", 1)[1]]
    api.http.delete("/api/v1/recipes/lock", params={"node": first.json()["node"]})
    second = api.http.post("/api/v1/recipes/lock", json={"path": "/locks/db", "session_id": s2, "owner": "two"})
    assert second.status_code == 200

    a = api.http.post("/api/v1/recipes/election", json={"path": "/el", "session_id": s1, "candidate": "alpha"})
    b = api.http.post("/api/v1/recipes/election", json={"path": "/el", "session_id": s2, "candidate": "beta"})
    assert a.json()["elected"] is True
    assert b.json()["elected"] is False
    assert b.json()["contenders"] == ["alpha", "beta"]
    api.http.delete(f"/api/v1/sessions/{s1}")  # the leader's session ends: beta leads
    view = api.http.get("/api/v1/recipes/election", params={"path": "/el"}).json()
    assert view["leader"] == "beta"
    api.http.delete(f"/api/v1/sessions/{s2}")  # no session may expire later, under another test


HUGE = 2**64  # past what a log entry can carry: on 3e4b762 one such request stopped every later write
BAD_REQUESTS: list[tuple[str, str, str, Any, int, str]] = [
    # Fields bounded where they enter, as ZooKeeper's wire types: versions int32, session ids int64.
    ("put", "/api/v1/registry/nodes/t", "a version past 2^64", {"data": "", "version": HUGE}, 400, "bad_request"),
    ("put", "/api/v1/registry/nodes/t", "a version past int32", {"data": "", "version": 2**31}, 400, "bad_request"),
    ("delete", f"/api/v1/registry/nodes/t?version={HUGE}", "delete with a version past 2^64", None, 400, "bad_request"),
    (
        "post", "/api/v1/registry/nodes/t/e", "an ephemeral with a session id past 2^64",
        {"ephemeral": True, "session_id": HUGE}, 400, "bad_request",
    ),
    (
        "post", "/api/v1/registry/multi", "a multi set with a version past 2^64",
        {"ops": [{"op": "set", "path": "/t", "data": "", "version": HUGE}]}, 400, "bad_request",
    ),
    (
        "post", "/api/v1/registry/multi", "a multi create with a session id past int64",
        {"ops": [{"op": "create", "path": "/t/e", "ephemeral": True, "session_id": 2**63}]}, 400, "bad_request",
    ),
    ("post", "/api/v1/registry/nodes/t/x", "a TTL past int64", {"ttl_ms": HUGE}, 400, "bad_request"),
    ("put", f"/api/v1/sessions/{HUGE}/keepalive", "a keepalive of a session id past 2^64", None, 400, "bad_request"),
    ("post", "/api/v1/sessions", "a session timeout past int32", {"timeout_ms": 2**31}, 400, "bad_request"),
    ("post", "/api/v1/registry/check", "a check with a version past 2^64", {"path": "/t", "version": HUGE}, 400,
     "bad_request"),
    # Paths the router would fold into another node ('//', a trailing '/'): refused as sent.
    ("put", "/api/v1/registry/nodes/t/", "set with a trailing slash", {"data": "x"}, 400, "BadArguments"),
    ("put", "/api/v1/registry/nodes/t//", "set with an empty last segment", {"data": "x"}, 400, "BadArguments"),
    ("post", "/api/v1/registry/nodes//t/kid", "create with an empty segment", {"data": ""}, 400, "BadArguments"),
    ("get", "/api/v1/registry/nodes/t//", "get with an empty segment", None, 400, "BadArguments"),
    ("delete", "/api/v1/registry/nodes/t/", "delete with a trailing slash", None, 400, "BadArguments"),
    ("get", "/api/v1/registry/stat//t", "stat with an empty segment", None, 400, "BadArguments"),
    ("get", "/api/v1/registry/children/t/", "children with a trailing slash", None, 400, "BadArguments"),
    ("put", "/api/v1/registry/acl/t//", "set an ACL with an empty segment",
     {"acl": [{"perms": 31, "scheme": "world", "id": "anyone"}]}, 400, "BadArguments"),
    ("post", "/api/v1/registry/nodes/a%01b", "create with a control character", {"data": ""}, 400, "BadArguments"),
    ("post", "/api/v1/registry/nodes/a/%2E%2E", "create a '..' segment", {"data": ""}, 400, "BadArguments"),
    ("post", "/api/v1/registry/nodes/" + "p" * 300, "create a path over the limit", {"data": ""}, 400, "BadArguments"),
    ("post", "/api/v1/registry/nodes/big", "create oversize data", {"data": "x" * 2000}, 400, "BadArguments"),
    ("post", "/api/v1/registry/nodes/t", "data of the wrong type", {"data": 5}, 400, "bad_request"),
    ("post", "/api/v1/registry/nodes/t", "an unknown field", {"data": "", "color": "red"}, 400, "bad_request"),
    ("post", "/api/v1/registry/nodes/t", "invalid base64", {"data": "!!", "encoding": "base64"}, 400, "BadArguments"),
    ("post", "/api/v1/registry/nodes/t", "an unknown encoding", {"data": "", "encoding": "rot13"}, 400, "bad_request"),
    ("post", "/api/v1/registry/nodes/t", "ephemeral without a session", {"ephemeral": True}, 400, "BadArguments"),
    (
        "post", "/api/v1/registry/nodes/t", "ephemeral for an unknown session",
        {"ephemeral": True, "session_id": 12345}, 404, "SessionExpired",
    ),
    ("post", "/api/v1/registry/nodes/t", "container and sequential", {"container": True, "sequential": True},
     400, "BadArguments"),
    ("post", "/api/v1/registry/nodes", "create the root", {"data": ""}, 409, "NodeExists"),
    ("put", "/api/v1/registry/nodes/t", "a version below -1", {"data": "", "version": -2}, 400, "bad_request"),
    ("put", "/api/v1/registry/nodes/missing", "set a missing node", {"data": ""}, 404, "NoNode"),
    ("delete", "/api/v1/registry/nodes", "delete the root", None, 400, "BadArguments"),
    ("post", "/api/v1/registry/multi", "an empty multi", {"ops": []}, 400, "BadArguments"),
    ("post", "/api/v1/registry/multi", "an unknown multi op", {"ops": [{"op": "explode", "path": "/x"}]},
     400, "bad_request"),
    ("post", "/api/v1/sessions", "a zero session timeout", {"timeout_ms": 0}, 400, "bad_request"),
    ("put", "/api/v1/sessions/999/keepalive", "keepalive of an unknown session", None, 404, "SessionExpired"),
    ("delete", "/api/v1/sessions/999", "close an unknown session", None, 404, "SessionExpired"),
    ("post", "/api/v1/registry/nodes/t", "a body that is not JSON", "not json", 400, "bad_request"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "url", "what", "body", "status", "code"), BAD_REQUESTS, ids=[b[2] for b in BAD_REQUESTS]
)
def test_bad_input_is_refused_and_changes_nothing(
    api: Api, method: str, url: str, what: str, body: Any, status: int, code: str
) -> None:
    api.create("/t") if api.get("/t").status_code == 404 else None
    before, revision = api.tree(), api.status()["revision"]
    if isinstance(body, str):
        r = api.http.request(method, url, content=body, headers={"content-type": "application/json"})
    else:
        r = api.http.request(method, url, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"] == code, r.text
    assert r.json()["message"]
    assert api.status()["revision"] == revision
    assert api.tree() == before
    # Nothing the request did stops the log: the next write answers at once.
    assert api.http.put("/api/v1/registry/nodes/t", json={"data": ""}, timeout=2).status_code == 200


def test_sequential_create_under_a_trailing_slash_names_a_child(api: Api) -> None:
    # ZooKeeper's create -s /parent/ makes /parent/0000000000: the slash is not folded away.
    api.create("/fold")
    made = api.http.post("/api/v1/registry/nodes/fold/", json={"sequential": True})
    assert made.status_code == 201, made.text
    assert made.json()["path"] == "/fold/0000000000"
    assert api.get("/fold/0000000000").status_code == 200
    api.http.delete("/api/v1/registry/nodes/fold", params={"recursive": "true"})


def test_reads_are_linearizable_and_serializable(api: Api) -> None:
    api.create("/lin", "0")
    for i in range(20):
        api.set("/lin", str(i))
        assert api.get("/lin").json()["data"] == str(i)
    assert api.get("/lin", serializable="true").json()["data"] == "19"


def test_restart_keeps_acknowledged_writes(tmp_path: Path) -> None:
    import signal
    from concurrent.futures import ThreadPoolExecutor

    acked: dict[str, str] = {}
    deleted: set[str] = set()
    fm = Fleetmate(tmp_path)
    with running(fm):
        api = Api(fm.url)
        api.create("/durable")

        def write(i: int) -> None:
            r = api.create(f"/durable/k{i}", f"v{i}")
            if r.status_code == 201:
                acked[f"/durable/k{i}"] = f"v{i}"

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(write, range(200)))
        for i in range(0, 200, 10):
            assert api.delete(f"/durable/k{i}").status_code == 200
            deleted.add(f"/durable/k{i}")
        for i in range(1, 200, 10):
            assert api.set(f"/durable/k{i}", "updated").status_code == 200
            acked[f"/durable/k{i}"] = "updated"
        revision = api.status()["revision"]
        fm.stop(signal.SIGKILL)
    assert len(acked) == 200

    for round_, sig in enumerate((signal.SIGTERM, signal.SIGKILL)):
        fm = Fleetmate(tmp_path)
        with running(fm):
            api = Api(fm.url)
            assert api.status()["revision"] >= revision
            names = set(api.children("/durable").json()["children"])
            for path, value in acked.items():
                if path in deleted:
                    assert path.rsplit("/", 1)[1] not in names, f"{path} came back (round {round_})"
                else:
                    assert api.get(path).json()["data"] == value
            api.create(f"/durable/after-{round_}")
            acked[f"/durable/after-{round_}"] = ""
            revision = api.status()["revision"]
            fm.stop(sig)


def test_rate_limit_gives_429(tmp_path: Path) -> None:
    env = {"FLEETMATE_REGISTRY_RATE_LIMIT_PER_CLIENT": "5", "FLEETMATE_REGISTRY_RATE_LIMIT_TOTAL": "100"}
    with running(Fleetmate(tmp_path, env=env)) as fm:
        with httpx.Client(base_url=fm.url) as client:
            answers = [client.get("/api/v1/registry/nodes") for _ in range(30)]
        codes = [r.status_code for r in answers]
        assert codes[:5] == [200] * 5  # the burst allowance
        assert 429 in codes
        refused = next(r for r in answers if r.status_code == 429)
        assert refused.json()["error"] == "too_many_requests"
        assert int(refused.headers["retry-after"]) >= 1
        assert fm.get("/api/v1/health").status_code == 200  # health is never limited
        metrics = fm.get("/metrics").text
        assert 'fleetmate_rate_limit_per_second{scope="per_client"} 5.0' in metrics
        assert "fleetmate_rate_limited_total" in metrics


def test_keepalive_over_the_watch_socket(fm: Fleetmate, api: Api) -> None:
    sid = api.session(timeout_ms=300)
    api.create("/wska")
    api.create("/wska/e", ephemeral=True, session_id=sid)
    with _ws(fm, path="/wska") as ws:
        assert _recv(ws)["type"] == "ready"
        for _ in range(5):
            ws.send(json.dumps({"op": "keepalive", "session_id": sid}))
            reply = _recv(ws)
            assert reply == {"type": "keepalive", "session_id": sid, "timeout_ms": 300}
            time.sleep(0.15)
        assert api.get("/wska/e").status_code == 200  # alive well past its 300 ms timeout
        ws.send("not json")
        assert _recv(ws)["error"] == "bad_request"
        ws.send(json.dumps({"op": "keepalive", "session_id": 2**64}))  # past int64: refused, nothing sent on
        assert _recv(ws)["error"] == "bad_request"
        ws.send(json.dumps({"op": "keepalive", "session_id": 4242}))
        assert _recv(ws)["error"] == "SessionExpired"


def test_registry_metrics(fm: Fleetmate) -> None:
    text = fm.get("/metrics").text
    for name in (
        "fleetmate_registry_revision",
        "fleetmate_registry_nodes",
        "fleetmate_registry_log_applied_seq",
        "fleetmate_registry_log_appended_commands_total",
        "fleetmate_registry_sessions_expired_total",
    ):
        assert name in text, name
