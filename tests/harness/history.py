"""History checking shared by the kill tests: writers and watchers on replicas, then the checks.

Every write attempt is recorded as acknowledged, refused or unknown, every watch event as seen;
check() then finds every violation of: nothing acknowledged lost, nothing applied twice, versions
only grow, every watcher saw every change of every key in order (gap-free), all watchers alike.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.sync.client import connect

from tests.harness.wait import wait_for

WRITERS = 4
KEYS_PER_WRITER = 4
WATCHERS = 2
PREFIX = "/h"
HTTP_TIMEOUT_S = 12.0  # above the registry's 10 s write timeout: a 503 then says the outcome is unknown


@dataclass
class Attempt:
    """One write as a client saw it: ok (acknowledged), fail (definitely not applied) or unknown."""

    writer: int
    path: str
    value: str
    expected_version: int  # -1: a create
    outcome: str = "unknown"
    revision: int = 0
    version: int = -1
    acked_at: float = 0.0
    via: str = ""  # the replica's URL the attempt went to


class Addresses:
    """The replicas' addresses; a client moves to the next one when its current one fails."""

    def __init__(self, urls: list[str], start: int) -> None:
        self.urls = urls
        self.i = start % len(urls)

    @property
    def url(self) -> str:
        return self.urls[self.i]

    def next(self) -> None:
        self.i = (self.i + 1) % len(self.urls)


class Writer(threading.Thread):
    """Creates, then compare-and-sets its own keys; every attempt goes into the history.

    rotate: each write goes to the next replica (not only after a failure), so every replica,
    a restarted one too, takes writes all along.
    """

    def __init__(
        self, n: int, urls: list[str], history: list[Attempt], stop: threading.Event, rotate: bool = False
    ) -> None:
        super().__init__(daemon=True, name=f"writer-{n}")
        self.n = n
        self.addr = Addresses(urls, n)
        self.history = history
        self.stop = stop
        self.rotate = rotate
        self.keys = [f"{PREFIX}/w{n}/k{k}" for k in range(KEYS_PER_WRITER)]
        self.versions: dict[str, int | None] = dict.fromkeys(self.keys, -1)  # None: unknown, relearn
        self.rng = random.Random(n)
        self.seq = 0

    def run(self) -> None:
        with httpx.Client(timeout=HTTP_TIMEOUT_S) as http:
            while not self.stop.is_set():
                path = self.rng.choice(self.keys)
                if self.versions[path] is None and not self.relearn(http, path):
                    continue
                self.write(http, path)
                if self.rotate:
                    self.addr.next()
                time.sleep(0.005)

    def write(self, http: httpx.Client, path: str) -> None:
        self.seq += 1
        version = self.versions[path]
        assert version is not None
        attempt = Attempt(self.n, path, f"w{self.n}-{self.seq}", version, via=self.addr.url)
        self.history.append(attempt)
        url = f"{self.addr.url}/api/v1/registry/nodes{path}"
        try:
            if version < 0:
                resp = http.post(url, json={"data": attempt.value})
            else:
                resp = http.put(url, json={"data": attempt.value, "version": version})
        except httpx.ConnectError:  # no connection, so nothing was sent: definitely not applied
            attempt.outcome = "fail"
            self.versions[path] = None
            self.addr.next()
            return
        except httpx.HTTPError:
            self.versions[path] = None
            self.addr.next()
            return
        if resp.status_code in (200, 201):
            stat = resp.json()["stat"]
            attempt.outcome, attempt.revision, attempt.version = "ok", stat["mzxid"], stat["version"]
            attempt.acked_at = time.monotonic()
            self.versions[path] = stat["version"]
        elif resp.status_code >= 500:
            self.versions[path] = None
            self.addr.next()
        else:  # 404, 409, 412: refused by the state machine, so not applied
            attempt.outcome = "fail"
            self.versions[path] = None

    def relearn(self, http: httpx.Client, path: str) -> bool:
        try:
            resp = http.get(f"{self.addr.url}/api/v1/registry/nodes{path}")
        except httpx.HTTPError:
            self.addr.next()
            time.sleep(0.05)
            return False
        if resp.status_code == 200:
            self.versions[path] = resp.json()["stat"]["version"]
            return True
        if resp.status_code == 404 and resp.json().get("error") == "NoNode":
            self.versions[path] = -1
            return True
        self.addr.next()
        time.sleep(0.05)
        return False


class Watcher(threading.Thread):
    """A recursive persistent watch on PREFIX; on a broken socket it resumes from last revision + 1 elsewhere."""

    def __init__(self, n: int, urls: list[str], stop: threading.Event) -> None:
        super().__init__(daemon=True, name=f"watcher-{n}")
        self.n = n
        self.addr = Addresses(urls, n)
        self.stop = stop
        self.events: list[tuple[int, str, str, int]] = []  # (revision, type, path, version)
        self.ready = threading.Event()
        self.resumes = 0
        self.errors: list[str] = []
        self.last = 0

    def run(self) -> None:
        while not self.stop.is_set():
            query = f"path={PREFIX}&recursive=true" + (f"&since={self.last + 1}" if self.last else "")
            ws_url = self.addr.url.replace("http", "ws", 1) + "/api/v1/watch?" + query
            try:
                with connect(ws_url, open_timeout=3) as ws:
                    self.follow(ws)
            except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake) as exc:
                self.errors.append(f"{self.addr.url}: {exc!r}"[:200])
            if not self.stop.is_set():
                self.resumes += 1
                self.addr.next()
                time.sleep(0.1)

    def follow(self, ws: Any) -> None:
        while not self.stop.is_set():
            try:
                raw = ws.recv(timeout=0.5)
            except TimeoutError:
                continue
            msg = json.loads(raw)
            kind = msg["type"]
            if kind == "ready":
                self.last = self.last or msg["revision"]
                self.ready.set()
            elif kind == "error":
                self.errors.append(f"{self.addr.url}: {msg}"[:200])
                return
            elif kind in ("created", "changed", "deleted"):
                self.events.append((msg["revision"], kind, msg["path"], msg["version"]))
                self.last = msg["revision"]


def final_state(urls: Mapping[str, str], keys: list[str]) -> dict[str, tuple[str, int, int] | None]:
    """Each key as every replica has it (linearizable reads); they must agree. (data, version, mzxid) or None."""
    views: dict[str, dict[str, tuple[str, int, int] | None]] = {}
    with httpx.Client(timeout=10) as http:
        for name, url in urls.items():
            view: dict[str, tuple[str, int, int] | None] = {}
            for key in keys:
                resp = http.get(f"{url}/api/v1/registry/nodes{key}")
                if resp.status_code == 404:
                    view[key] = None
                else:
                    assert resp.status_code == 200, (name, key, resp.text)
                    body = resp.json()
                    view[key] = (body["data"], body["stat"]["version"], body["stat"]["mzxid"])
            views[name] = view
    first = next(iter(views.values()))
    for name, view in views.items():
        diff = {k: (view[k], first[k]) for k in keys if view[k] != first[k]}
        assert not diff, f"replica {name} disagrees: {diff}"
    return first


def seen_final(w: Watcher, final: dict[str, tuple[str, int, int] | None]) -> bool:
    seen = {(path, version) for _, _, path, version in w.events}
    return all(v is None or (k, v[1]) in seen for k, v in final.items())


def check(history: list[Attempt], final: dict[str, tuple[str, int, int] | None], watchers: list[Watcher]) -> list[str]:
    """Every violation of: nothing acknowledged lost, nothing applied twice, watchers complete and in order."""
    problems: list[str] = []
    acked = [a for a in history if a.outcome == "ok"]
    revisions = [a.revision for a in acked]
    if len(revisions) != len(set(revisions)):
        problems.append("the same revision acknowledged twice")
    by_key: dict[str, list[Attempt]] = defaultdict(list)
    for a in history:
        by_key[a.path].append(a)
    for path, attempts in by_key.items():
        got = final.get(path)
        oks = [a for a in attempts if a.outcome == "ok"]
        versions = [a.version for a in oks]
        if versions != sorted(set(versions)):
            problems.append(f"{path}: acknowledged versions not strictly increasing: {versions}")
        last_ok = max((i for i, a in enumerate(attempts) if a.outcome == "ok"), default=-1)
        allowed = {a.value for a in attempts[last_ok + 1 :] if a.outcome == "unknown"}
        if last_ok >= 0:
            allowed.add(attempts[last_ok].value)
        if got is None:
            if last_ok >= 0:
                problems.append(f"{path}: acknowledged writes but the node is gone")
            continue
        data, version, _ = got
        if data not in allowed:
            problems.append(f"{path}: final value {data!r} is neither the last acknowledged nor a later unknown write")
        if oks and version < oks[-1].version:
            problems.append(f"{path}: final version {version} below the acknowledged {oks[-1].version}")
        # Compare-and-set: version + 1 writes were applied; each is an acknowledged or an unknown attempt.
        applied_max = len(oks) + sum(a.outcome == "unknown" for a in attempts)
        if not len(oks) <= version + 1 <= applied_max:
            problems.append(f"{path}: {version + 1} writes applied, {len(oks)} acknowledged, at most {applied_max}")
    for w in watchers:
        revs = [e[0] for e in w.events]
        if revs != sorted(set(revs)):
            dup = len(revs) - len(set(revs))
            problems.append(f"watcher {w.n}: revisions out of order or repeated ({dup} repeats)")
        per_key: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for _, kind, path, version in w.events:
            per_key[path].append((kind, version))
        for path, got in final.items():
            want = [] if got is None else [("created", 0)] + [("changed", v) for v in range(1, got[1] + 1)]
            if per_key.get(path, []) != want:
                seen = per_key.get(path, [])
                missing = sorted(set(want) - set(seen))[:5]
                problems.append(f"watcher {w.n}: {path} events differ (missing {missing}, {len(seen)} vs {len(want)})")
        events = {(rev, path, version) for rev, _, path, version in w.events}
        lost = [a for a in acked if (a.revision, a.path, a.version) not in events]
        if lost:
            problems.append(f"watcher {w.n}: {len(lost)} acknowledged writes never seen, e.g. {lost[:3]}")
    if len(watchers) > 1 and any(w.events != watchers[0].events for w in watchers[1:]):
        problems.append("the watchers saw different event streams")
    return problems


class Workload:
    """Writers and watchers on replicas, started together; finish() stops them and checks the history."""

    def __init__(
        self, urls: Mapping[str, str], writers: int = WRITERS, watchers: int = WATCHERS, rotate: bool = False
    ) -> None:
        self.urls = dict(urls)
        self.history: list[Attempt] = []
        self._stop, self._stop_watchers = threading.Event(), threading.Event()
        addresses = list(self.urls.values())
        self.watchers = [Watcher(n, addresses, self._stop_watchers) for n in range(watchers)]
        self.writers = [Writer(n, addresses, self.history, self._stop, rotate) for n in range(writers)]
        self.problems: list[str] = []

    def start(self) -> Workload:
        """Create the writers' parent nodes, start the watchers (ready first), then the writers."""
        first = next(iter(self.urls.values()))
        with httpx.Client(timeout=10) as http:
            for w in self.writers:
                resp = http.post(f"{first}/api/v1/registry/nodes{PREFIX}/w{w.n}", json={"parents": True})
                assert resp.status_code == 201, resp.text
        for watcher in self.watchers:
            watcher.start()
        for watcher in self.watchers:
            assert watcher.ready.wait(10), watcher.errors
        for writer in self.writers:
            writer.start()
        return self

    def acked(self, since: float = 0.0, via: str = "") -> int:
        """Acknowledged writes (acknowledged after `since`, through replica URL `via`, when given)."""
        return sum(a.outcome == "ok" and a.acked_at > since and (not via or a.via == via) for a in self.history)

    def wait_acked(self, n: int, timeout: float, since: float = 0.0, via: str = "") -> None:
        wait_for(lambda: self.acked(since, via) >= n, timeout, f"{n} acknowledged writes{' via ' + via if via else ''}")

    def stop(self) -> None:
        """Stop everything without checking (a test that failed on the way)."""
        self._stop.set()
        self._stop_watchers.set()

    def finish(self) -> list[str]:
        """Stop the writers, read the final state from every replica, let the watchers catch up; the problems."""
        self._stop.set()
        for w in self.writers:
            w.join(HTTP_TIMEOUT_S + 5)
        final = final_state(self.urls, [k for w in self.writers for k in w.keys])
        wait_for(
            lambda: all(seen_final(w, final) for w in self.watchers), 30, "every watcher to reach the final versions"
        )
        self._stop_watchers.set()
        for w in self.watchers:
            w.join(5)
        self.problems = check(self.history, final, self.watchers)
        return self.problems

    def summary(self) -> str:
        """acknowledged / indeterminate / refused counts and what the watchers saw."""
        count = {kind: sum(a.outcome == kind for a in self.history) for kind in ("ok", "unknown", "fail")}
        return (
            f"{count['ok']} acknowledged, {count['unknown']} indeterminate, "
            f"{count['fail']} not applied (refused, or no connection); "
            f"watcher events {[len(w.events) for w in self.watchers]}, resumes {[w.resumes for w in self.watchers]}"
        )
