"""Sharded KV throughput, latency, split pauses and partition scaling: fleetmate beside etcd 3.4, in one run.

    python bench/kv.py [--duration S] [--pairs N] [--quick] [--wait-quiet S] [--skip SECTION,...]

One fleetmate replica (embedded nats-server, default kv settings) and one etcd are started side by
side on free ports (temporary directories) and only one of them is loaded at a time. 10,000 keys
whose first characters are spread over printable ASCII, 100-byte values, are loaded into each first.

  compare     writes, linearizable reads and serializable reads at 1, 16 and 64 connections (wrk, Lua
              scripts picking a random key of the 10,000). fleetmate through MatrixKV's routes (/set,
              /get: linearizable) and /api/v1/kv (put, get with serializable=false|true); etcd through
              its v3 JSON gateway (/v3/kv/put, /v3/kv/range with serializable false|true). Each scenario
              runs as --pairs interleaved pairs (fleetmate's runs, then etcd's; the next pair the other
              way round): this VM's speed drifts, so only neighbouring runs compare fairly. Ratios
              fleetmate/etcd are medians of the per-pair ratios; the issue's targets are printed beside
              them (writes >= 1.0x etcd, linearizable reads >= 2x).
  split       a fresh fleetmate with kv.shard_capacity 64 KiB: 16 connections (asyncio, raw HTTP/1.1)
              overwrite 200 keys of one range (no growth: the baseline), then write new random keys of
              that range, so its shards pass 64 KiB and split again and again. GET /api/v1/kv/shards is
              polled every 50 ms; a write to the range of a shard that split, in flight between the two
              polls around the split, is a write "during a split" (target: p99 <= 250 ms).
  partitions  aggregate write throughput (/api/v1/kv/put, 64 connections) with kv.partitions 1, 2, 4 and
              8, a fresh server each, keys over every partition; the server's idle CPU (fleetmate and
              its nats-server, psutil) over 5 s with each P.

Every write run is checked: the version gain summed over the 10,000 keys equals the successful writes
wrk saw (plus at most one in flight per connection when wrk stopped); MatrixKV's routes answer 200
with an error text, which the scripts count. --quick: 2 s per wrk run, one pair, a short split phase
and 2 s of idle CPU (a smoke run); it writes bench/results/kv-quick.json. The 3-server NATS cluster
variant is not here yet. Prints a table and writes bench/results/kv.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import math
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ensure_debian_package, percentile, progress, write_result
from bench.registry import (
    OTHER_LOAD_NOTE_PCT,
    STEAL_NOTE_PCT,
    VALUE_BYTES,
    VALUES,
    WRK_FIELDS,
    Etcd,
    Fleetmate,
    OtherLoad,
    Server,
    _fmt,
    _ratio,
    b64,
    lua_script,
    machine_load,
    running,
    wait_quiet,
    wrk_scenario,
)

KEYS = 10_000
# first characters spread over printable ASCII (0x21-0x7e): the first shards are cut evenly over it
KEY_NAMES = [f"{chr(0x21 + i % 94)}k{i:05d}" for i in range(KEYS)]
CLIENTS = (1, 16, 64)
FAMILIES = ("writes", "reads_linearizable", "reads_serializable")
TARGETS = {"writes": 1.0, "reads_linearizable": 2.0}  # fleetmate/etcd ops/s, from the issue
SPLIT_CAPACITY = 64 * 1024
SPLIT_CONNECTIONS = 16
SPLIT_BASE_KEYS = [f"a{i * 49_999:07d}" for i in range(200)]  # the baseline's keys: 200 of the range
SPLIT_POLL_S = 0.05
SPLIT_TARGET_P99_MS = 250.0
PARTITION_COUNTS = (1, 2, 4, 8)
PARTITION_CONNECTIONS = 64
KEPT_LOGS = Path(tempfile.gettempdir()) / "fleetmate-kv-bench-logs"

ERROR_COUNTER = """
local threads = {}
local first_setup = setup
function setup(thread)
  first_setup(thread)
  table.insert(threads, thread)
end
kv_errors = 0
function response(status, headers, body)
  if status == 200 and not string.find(body, '"error":""', 1, true) then kv_errors = kv_errors + 1 end
end
function done(summary, latency, requests)
  local n = 0
  for _, t in ipairs(threads) do n = n + t:get("kv_errors") end
  io.write(string.format("kv_body_errors %d\\n", n))
end
"""


def _body_prefix(key: str) -> str:
    return '{"key":' + json.dumps(key) + ',"value":"'


def _keep_log(server: Server, why: str) -> None:
    KEPT_LOGS.mkdir(parents=True, exist_ok=True)
    dest = KEPT_LOGS / f"{server.name}-{time.strftime('%H%M%S')}-{server.port}.log"
    with contextlib.suppress(OSError):
        shutil.copyfile(server.log, dest)
        progress(f"  {server.name}'s log ({why}) kept as {dest}")


# ---- the two systems, with the KV's data plane ------------------------------------------------


class KvFleetmate(Fleetmate):
    """A fleetmate replica with kv settings; its log is kept (KEPT_LOGS) when it had problems."""

    def __init__(self, binary: str, env: dict[str, str] | None = None, name: str = "fleetmate") -> None:
        super().__init__(binary)
        self.extra_env = env or {}
        self.name = name
        self.problems: list[str] = []

    def command(self) -> tuple[list[str], dict[str, str]]:
        cmd, env = super().command()
        env.update(self.extra_env)
        return cmd, env

    def stop(self) -> None:
        died = self.proc is not None and self.proc.poll() is not None
        if self.log.exists():
            self.problems = self.log_problems()
            if self.problems or died:
                _keep_log(self, "it died" if died else f"{len(self.problems)} warning/error lines")
        super().stop()

    async def create_all(self) -> None:
        """The 10,000 keys, by batches of up to 128 keys of one first character (one shard at the start)."""
        groups: dict[str, list[str]] = {}
        for key in KEY_NAMES:
            groups.setdefault(key[0], []).append(key)
        chunks = [keys[i : i + 128] for keys in groups.values() for i in range(0, len(keys), 128)]
        sem = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=self.url, timeout=60, trust_env=False) as client:

            async def one(keys: list[str]) -> None:
                async with sem:
                    ops = [{"key": k, "value": VALUES[0]} for k in keys]
                    r = await client.post("/api/v1/kv/batch", json={"ops": ops})
                    if r.status_code == 200:
                        return
                    progress(f"  batch of {len(keys)} keys answered {r.status_code} {r.text[:200]}; one by one")
                    for k in keys:
                        r = await client.post("/api/v1/kv/put", json={"key": k, "value": VALUES[0]})
                        if r.status_code != 200:
                            raise RuntimeError(f"put {k!r}: {r.status_code} {r.text}")

            await asyncio.gather(*(one(c) for c in chunks))

    def scripts(self) -> dict[str, list[tuple[str, str]]]:
        """(api, wrk script) for each family."""
        bodies = [_body_prefix(k) for k in KEY_NAMES]
        q = [quote(k, safe="") for k in KEY_NAMES]
        return {
            "writes": [
                ("matrixkv /set", lua_script("POST", ["/set"] * KEYS, bodies, VALUES, '"}') + ERROR_COUNTER),
                ("/api/v1/kv/put", lua_script("POST", ["/api/v1/kv/put"] * KEYS, bodies, VALUES, '"}')),
            ],
            "reads_linearizable": [
                ("matrixkv /get", lua_script("GET", [f"/get?key={k}" for k in q], None, [""], "") + ERROR_COUNTER),
                (
                    "/api/v1/kv/get",
                    lua_script("GET", [f"/api/v1/kv/get?key={k}&serializable=false" for k in q], None, [""], ""),
                ),
            ],
            "reads_serializable": [
                (
                    "/api/v1/kv/get",
                    lua_script("GET", [f"/api/v1/kv/get?key={k}&serializable=true" for k in q], None, [""], ""),
                ),
            ],
        }

    def write_script(self) -> str:
        return self.scripts()["writes"][1][1]

    def versions(self) -> dict[str, int]:
        out: dict[str, int] = {}
        start = ""
        while True:
            r = self.client.get("/api/v1/kv/scan", params={"start": start, "limit": 1000})
            r.raise_for_status()
            body = r.json()
            out.update((item["key"], item["version"]) for item in body["items"])
            if not body["more"]:
                return out
            start = body["next"]

    def read_value(self, key: str) -> str:
        r = self.client.get("/api/v1/kv/get", params={"key": key})
        r.raise_for_status()
        value: str = r.json()["value"]
        m = self.client.get("/get", params={"key": key}).json()
        if m.get("value") != value or m.get("error"):
            return f"MatrixKV /get answered {m}, /api/v1/kv/get {value!r}"
        return value

    def shards(self) -> list[dict[str, Any]]:
        r = self.client.get("/api/v1/kv/shards")
        r.raise_for_status()
        shards: list[dict[str, Any]] = r.json()
        return shards


class KvEtcd(Etcd):
    """etcd with the KV's keys; its log is kept when it had problems."""

    def __init__(self, binary: str) -> None:
        super().__init__(binary)
        self.problems: list[str] = []

    def stop(self) -> None:
        if self.log.exists():
            self.problems = self.log_problems()
            if self.problems:
                _keep_log(self, f"{len(self.problems)} warning/error lines")
        super().stop()

    async def create_all(self) -> None:
        chunks = [KEY_NAMES[i : i + 128] for i in range(0, KEYS, 128)]  # etcd's --max-txn-ops is 128
        async with httpx.AsyncClient(base_url=self.url, timeout=60, trust_env=False) as client:
            for keys in chunks:
                ops = [{"requestPut": {"key": b64(k), "value": b64(VALUES[0])}} for k in keys]
                r = await client.post("/v3/kv/txn", json={"success": ops})
                if r.status_code != 200:
                    raise RuntimeError(f"txn of {len(keys)} puts: {r.status_code} {r.text}")

    def scripts(self) -> dict[str, list[tuple[str, str]]]:
        puts = ['{"key":"' + b64(k) + '","value":"' for k in KEY_NAMES]
        ranges = ['{"key":"' + b64(k) + '"' for k in KEY_NAMES]
        return {
            "writes": [("/v3/kv/put", lua_script("POST", ["/v3/kv/put"] * KEYS, puts, [b64(v) for v in VALUES], '"}'))],
            "reads_linearizable": [("/v3/kv/range", lua_script("POST", ["/v3/kv/range"] * KEYS, ranges, [""], "}"))],
            "reads_serializable": [
                (
                    "/v3/kv/range serializable",
                    lua_script("POST", ["/v3/kv/range"] * KEYS, ranges, [""], ',"serializable":true}'),
                )
            ],
        }

    def versions(self) -> dict[str, int]:
        r = self.client.post("/v3/kv/range", json={"key": b64("\0"), "range_end": b64("\0")})
        r.raise_for_status()
        return {base64.b64decode(kv["key"]).decode(): int(kv["version"]) for kv in r.json().get("kvs", [])}


# ---- checks -------------------------------------------------------------------------------------


def settled_versions(server: Server) -> dict[str, int]:
    """The keys' versions once they stop moving (writes wrk left in flight are done)."""
    last = server.versions()
    for _ in range(20):
        time.sleep(0.25)
        now = server.versions()
        if now == last:
            return now
        last = now
    return last


def check_writes(server: Server, res: dict[str, Any], before: dict[str, int]) -> dict[str, Any]:
    """The version gain over the keys against the writes wrk saw succeed (and etcd's own count)."""
    versions = settled_versions(server)
    gained = sum(versions.values()) - before["versions"]
    ok_n = res["ok"] - res["body_errors"]
    # wrk stops with up to one request per connection in flight (and any it timed out on); a
    # MatrixKV answer with an error may still have been applied.
    slack = res["connections"] + res["socket_errors"]["timeout"] + res["body_errors"]
    check: dict[str, Any] = {
        "keys": len(versions),
        "versions_gained": gained,
        "wrk_ok": ok_n,
        "in_flight_at_stop": gained - ok_n,
        "ok": len(versions) == KEYS and 0 <= gained - ok_n <= slack,
    }
    if isinstance(server, Etcd):
        served = server.settled_writes() - before["served"]
        check["server_writes"] = served
        check["ok"] = check["ok"] and served == gained
        before["served"] += served
    before["versions"] += gained
    verdict = "ok" if check["ok"] else "MISMATCH"
    progress(f"  check: versions gained {gained}, wrk ok {ok_n} (+{gained - ok_n} in flight at stop) -> {verdict}")
    return check


def read_back(server: KvFleetmate | KvEtcd, n: int = 8) -> dict[str, Any]:
    wrong = {}
    for key in random.sample(KEY_NAMES, n):
        value = server.read_value(key)
        if len(value.encode()) != VALUE_BYTES or value not in VALUES:
            wrong[key] = value
    if wrong:
        progress(f"  !! {server.name}: wrong values read back: {wrong}")
    return {"keys": n, "wrong": wrong, "ok": not wrong}


# ---- compare: interleaved pairs -----------------------------------------------------------------


def _run(wrk: str, server: Server, api: str, script: str, family: str, c: int, duration: float) -> dict[str, Any]:
    res = wrk_scenario(wrk, server, script, f"{family} via {api}", c, duration)
    m = re.search(r"^kv_body_errors (\d+)", res["raw"], re.M)
    res["body_errors"] = int(m.group(1)) if m else 0
    if res["body_errors"]:
        progress(f"  !! {server.name} {api}: {res['body_errors']} answers with an error text")
    bad = res["non2xx"] or sum(res["socket_errors"].values()) or res["body_errors"]
    if not bad:
        res.pop("raw")
    return res


def compare(
    wrk: str, fm: KvFleetmate, et: KvEtcd, duration: float, pairs: int, quiet_s: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    out: dict[str, Any] = {}
    checks: dict[str, Any] = {}
    before = {s.name: {"versions": sum(settled_versions(s).values())} for s in (fm, et)}
    before["etcd"]["served"] = et.settled_writes()
    fm_scripts, et_scripts = fm.scripts(), et.scripts()
    for family in FAMILIES:
        for c in CLIENTS:
            name = f"{family}_c{c}"
            runs: dict[str, list[dict[str, Any]]] = {}
            rows = []
            for i in range(pairs):
                sides: list[tuple[Server, list[tuple[str, str]]]] = [(fm, fm_scripts[family]), (et, et_scripts[family])]
                if i % 2:
                    sides.reverse()  # neither system always goes first
                row: dict[str, Any] = {"pair": i + 1, "first": sides[0][0].name}
                for server, variants in sides:
                    for api, script in variants:
                        wait_quiet(quiet_s)
                        res = _run(wrk, server, api, script, family, c, duration)
                        if family == "writes":
                            check = check_writes(server, res, before[server.name])
                            checks[f"{name} {server.name} {api} pair {i + 1}"] = check
                            res["check_ok"] = check["ok"]
                        key = f"{server.name} {api}"
                        runs.setdefault(key, []).append(res)
                        row[key] = {k: res[k] for k in (*WRK_FIELDS, "body_errors")}
                etcd_res = row[f"etcd {et_scripts[family][0][0]}"]
                for api, _ in fm_scripts[family]:
                    a = row[f"fleetmate {api}"]
                    row[f"ratio {api}"] = {
                        f: _ratio(a[k], etcd_res[k])
                        for f, k in (("ops_s", "ops_s"), ("p50", "p50_ms"), ("p99", "p99_ms"))
                    }
                rows.append(row)
            summary = {
                key: {k: statistics.median(r[k] for r in rs) for k in ("ops_s", "p50_ms", "p99_ms")}
                for key, rs in runs.items()
            }
            ratios = {}
            for api, _ in fm_scripts[family]:
                per = [r[f"ratio {api}"] for r in rows]
                ratios[api] = {
                    f: statistics.median(vals) if (vals := [p[f] for p in per if p[f] is not None]) else None
                    for f in ("ops_s", "p50", "p99")
                }
                ops = [p["ops_s"] for p in per if p["ops_s"] is not None]
                ratios[api]["ops_s_range"] = [min(ops), max(ops)] if ops else None
            out[name] = {
                "family": family,
                "connections": c,
                "target_ops_ratio": TARGETS.get(family),
                "median": summary,
                "ratio_fleetmate_over_etcd": ratios,
                "pairs": rows,
                "runs": runs,
            }
            progress(
                f"{name}: fleetmate/etcd ops "
                + ", ".join(f"{api} {_fmt(r['ops_s'])}x" for api, r in ratios.items())
                + (f" (target >= {TARGETS[family]:g}x)" if family in TARGETS else "")
            )
    checks["read_back fleetmate"] = read_back(fm)
    checks["read_back etcd"] = read_back(et)
    return out, checks


# ---- split pause --------------------------------------------------------------------------------


class RawConn:
    """One keep-alive HTTP/1.1 connection, cheap enough that the client is not what is measured."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        try:
            self.writer.write(head.encode() + b"\r\n" + (body or b""))
            status = int((await self.reader.readline()).split()[1])
            length, chunked = 0, False
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
                elif name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
                    chunked = True
            if not chunked:
                return status, await self.reader.readexactly(length)
            data = b""
            while size := int((await self.reader.readline()).split(b";")[0], 16):
                data += (await self.reader.readexactly(size + 2))[:-2]
            await self.reader.readline()
            return status, data
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


@dataclass
class Write:
    key: str
    sent: float
    done: float
    status: int
    error: str = ""


async def _hammer(
    port: int, keys: Any, duration: float, poll: bool
) -> tuple[list[Write], list[tuple[float, float, Any]]]:
    """SPLIT_CONNECTIONS writers putting keys(rng) for duration seconds; polls of the shards if poll."""
    writes: list[Write] = []
    polls: list[tuple[float, float, Any]] = []
    end = time.monotonic() + duration

    async def writer(n: int) -> None:
        conn, rng = RawConn(port), random.Random(n)
        while time.monotonic() < end:
            key = keys(rng)
            body = json.dumps({"key": key, "value": rng.choice(VALUES)}).encode()
            sent = time.monotonic()
            try:
                status, answer = await conn.request("POST", "/api/v1/kv/put", body)
                error = "" if status == 200 else answer.decode(errors="replace")[:300]
            except Exception as exc:
                status, error = 0, f"{type(exc).__name__}: {exc}"
            writes.append(Write(key, sent, time.monotonic(), status, error))
        conn.close()

    async def poller() -> None:
        conn = RawConn(port)
        while time.monotonic() < end + SPLIT_POLL_S:
            sent = time.monotonic()
            with contextlib.suppress(Exception):
                status, body = await conn.request("GET", "/api/v1/kv/shards")
                if status == 200:
                    polls.append((sent, time.monotonic(), json.loads(body)))
            await asyncio.sleep(SPLIT_POLL_S)
        conn.close()

    await asyncio.gather(*(writer(n) for n in range(SPLIT_CONNECTIONS)), *([poller()] if poll else []))
    return writes, polls


def _covers(start: str, end: str, key: str) -> bool:
    return start <= key and (not end or key < end)


def _splits(polls: list[tuple[float, float, Any]]) -> list[dict[str, Any]]:
    """Each shard id new between two polls: its parent's range before, and the window it happened in."""
    found = []
    for (t0, _, prev), (_, t1, cur) in itertools.pairwise(polls):
        old = {s["id"]: s for s in prev}
        for s in cur:
            if s["id"] in old:
                continue
            parent = next((p for p in prev if _covers(p["start"], p["end"], s["start"])), None)
            found.append(
                {
                    "shard": s["id"],
                    "parent": parent["id"] if parent else None,
                    "range": [parent["start"], parent["end"]] if parent else [s["start"], s["end"]],
                    "window": [t0, t1],
                }
            )
    return found


def _lat_summary(ws: list[Write]) -> dict[str, Any]:
    lat = [(w.done - w.sent) * 1e3 for w in ws]
    return {
        "writes": len(ws),
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat, default=float("nan")),
        "over_250ms": sum(1 for x in lat if x > SPLIT_TARGET_P99_MS),
    }


def split_pause(baseline_s: float, grow_s: float, settle_s: float) -> dict[str, Any]:
    fm = KvFleetmate(sys.executable, {"FLEETMATE_KV_SHARD_CAPACITY": str(SPLIT_CAPACITY)}, "fleetmate-split")
    out: dict[str, Any] = {"capacity_bytes": SPLIT_CAPACITY, "connections": SPLIT_CONNECTIONS}
    with running(fm):
        for key in SPLIT_BASE_KEYS:
            fm.client.post("/api/v1/kv/put", json={"key": key, "value": VALUES[0]}).raise_for_status()
        before = fm.shards()
        progress(f"{fm.name}: baseline, {SPLIT_CONNECTIONS} connections overwrite 200 keys for {baseline_s:g} s")
        base, _ = asyncio.run(_hammer(fm.port, lambda rng: rng.choice(SPLIT_BASE_KEYS), baseline_s, False))
        out["baseline"] = {**_lat_summary(base), "shards": len(fm.shards()) - len(before)}
        before = fm.shards()
        progress(f"{fm.name}: new random keys a0000000-a9999999 for {grow_s:g} s, polling the shards")
        with OtherLoad(fm) as other:
            grow, polls = asyncio.run(_hammer(fm.port, lambda rng: f"a{rng.randrange(10**7):07d}", grow_s, True))
        after = fm.shards()
        time.sleep(settle_s)
        settled = fm.shards()
        splits = _splits([(0.0, 0.0, before), *polls, (math.inf, math.inf, after)])
        during = [
            w
            for w in grow
            if any(
                _covers(sp["range"][0], sp["range"][1], w.key)
                and w.sent <= sp["window"][1]
                and w.done >= sp["window"][0]
                for sp in splits
            )
        ]
        # every key written is there, whichever shard it ended in
        keys: set[str] = set()
        start = "a"
        while True:
            r = fm.client.get("/api/v1/kv/scan", params={"start": start, "end": "b", "limit": 1000})
            r.raise_for_status()
            body = r.json()
            keys.update(i["key"] for i in body["items"])
            if not body["more"]:
                break
            start = body["next"]
        acked = {w.key for w in grow if w.status == 200} | set(SPLIT_BASE_KEYS)
        tried = {w.key for w in grow} | set(SPLIT_BASE_KEYS)
        errors = [w for w in grow + base if w.status != 200]
        t0 = grow[0].sent if grow else 0.0
        out["grow"] = {
            **_lat_summary(grow),
            "elapsed_s": grow_s,
            "ops_s": len(grow) / grow_s,
            "other_load_pct": other.pct,
            "steal_pct": other.steal_pct,
        }
        out["during_splits"] = _lat_summary(during)
        out["target_p99_ms"] = SPLIT_TARGET_P99_MS
        out["shards_before"] = len(before)
        out["shards_after"] = len(after)
        out["splits"] = len(after) - len(before)
        out["splits_seen_by_polls"] = len(splits)
        out["largest_shard_after_bytes"] = max((s["local_size"] for s in after), default=0)
        out["written_bytes"] = sum(len(w.key) + VALUE_BYTES for w in grow if w.status == 200)
        # splits lag the writes: what they reached settle_s after the writer stopped
        out["settled"] = {
            "after_s": settle_s,
            "shards": len(settled),
            "largest_shard_bytes": max((s["local_size"] for s in settled), default=0),
        }
        out["polls"] = len(polls)
        out["split_times_s"] = [round(sp["window"][1] - t0, 3) for sp in splits if math.isfinite(sp["window"][1])]
        out["slowest"] = [
            {"key": w.key, "at_s": round(w.sent - t0, 3), "ms": round((w.done - w.sent) * 1e3, 1), "status": w.status}
            for w in sorted(grow, key=lambda w: w.sent - w.done)[:10]
        ]
        out["check"] = {
            "keys_in_range": len(keys),
            "acknowledged": len(acked),
            "missing": sorted(acked - keys)[:20],
            "unexpected": sorted(keys - tried)[:20],
            "ok": acked <= keys <= tried,
        }
        out["errors"] = len(errors)
        out["error_samples"] = [{"key": w.key, "status": w.status, "error": w.error} for w in errors[:5]]
    out["log_problems"] = fm.problems[:20]
    d, g = out["during_splits"], out["grow"]
    verdict = "ok" if out["check"]["ok"] else "FAILED"
    progress(
        f"  {out['splits']} splits ({out['shards_before']} -> {out['shards_after']} shards), {g['writes']} writes"
        f" ({g['ops_s']:.0f}/s), p99 {g['p99_ms']:.1f} ms; during splits {d['writes']} writes,"
        f" p99 {d['p99_ms']:.1f} ms, max {d['max_ms']:.1f} ms; {out['errors']} errors; keys check {verdict}"
    )
    return out


# ---- partition scaling --------------------------------------------------------------------------


def idle_cpu(server: Server, seconds: float) -> dict[str, Any]:
    """CPU share of one core the server (and each of its child processes) uses while nobody asks anything."""
    assert server.proc is not None
    root = psutil.Process(server.proc.pid)
    procs = [root, *root.children(recursive=True)]

    def times() -> dict[int, float]:
        out = {}
        for p in procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
        return out

    t0, started = times(), time.monotonic()
    time.sleep(seconds)
    t1, wall = times(), time.monotonic() - started
    by = {}
    for p in procs:
        if p.pid in t0 and p.pid in t1:
            with contextlib.suppress(psutil.Error):
                by[f"{p.name()} {p.pid}"] = 100.0 * (t1[p.pid] - t0[p.pid]) / wall
    return {"seconds": round(wall, 2), "pct_of_one_core": sum(by.values()), "by_process": by}


def partition_scaling(wrk: str, duration: float, idle_s: float, quiet_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in PARTITION_COUNTS:
        fm = KvFleetmate(sys.executable, {"FLEETMATE_KV_PARTITIONS": str(p)}, f"fleetmate-P{p}")
        with running(fm):
            asyncio.run(fm.create_all())
            shards = fm.shards()
            parts = sorted({s["partition"] for s in shards})
            time.sleep(2.0)
            idle = idle_cpu(fm, idle_s)
            progress(f"{fm.name}: {len(shards)} shards on partitions {parts}; idle CPU {idle['pct_of_one_core']:.1f}%")
            before = {"versions": sum(settled_versions(fm).values())}
            wait_quiet(quiet_s)
            res = _run(wrk, fm, "/api/v1/kv/put", fm.write_script(), "writes", PARTITION_CONNECTIONS, duration)
            check = check_writes(fm, res, before)
        out[f"P{p}"] = {
            "partitions": p,
            "shards": len(shards),
            "partitions_used": parts,
            "idle_cpu": idle,
            "writes": {k: res[k] for k in (*WRK_FIELDS, "body_errors")} | ({"raw": res["raw"]} if "raw" in res else {}),
            "check": check,
            "log_problems": fm.problems[:20],
        }
    base = out["P1"]["writes"]["ops_s"]
    for row in out.values():
        row["speedup_vs_P1"] = _ratio(row["writes"]["ops_s"], base)
    return out


# ---- main ---------------------------------------------------------------------------------------


def _print_tables(results: dict[str, Any], duration: float, pairs: int) -> None:
    cmp_ = results.get("compare")
    if cmp_:
        print()
        print(f"fleetmate vs {results['etcd_version']}: {KEYS} keys, {VALUE_BYTES}-byte values,"
              f" wrk {duration:g} s a run, medians of {pairs} interleaved pair(s)")  # fmt: skip
        header = (
            f"{'scenario':24}{'fleetmate api':17}{'ops/s':>8}{'p50':>7}{'p99':>7}"
            f"{'etcd ops/s':>11}{'p50':>7}{'p99':>7}   {'fm/etcd ops':>11}{'p50':>6}{'p99':>6}  target"
        )
        print(header)
        print("-" * len(header))
        for name, sc in cmp_.items():
            (et_key,) = [k for k in sc["median"] if k.startswith("etcd ")]
            b = sc["median"][et_key]
            for api, ratio in sc["ratio_fleetmate_over_etcd"].items():
                a = sc["median"][f"fleetmate {api}"]
                target = sc["target_ops_ratio"]
                verdict = ""
                if target is not None and ratio["ops_s"] is not None:
                    verdict = f">= {target:g}x " + ("met" if ratio["ops_s"] >= target else "MISSED")
                label = name.replace("_c", " c=")
                print(
                    f"{label:24}{api:17}{a['ops_s']:>8.0f}{a['p50_ms']:>7.2f}{a['p99_ms']:>7.2f}"
                    f"{b['ops_s']:>11.0f}{b['p50_ms']:>7.2f}{b['p99_ms']:>7.2f}"
                    f"   {_fmt(ratio['ops_s']):>11}{_fmt(ratio['p50']):>6}{_fmt(ratio['p99']):>6}  {verdict}"
                )
    sp = results.get("split")
    if sp:
        print()
        g, d, base = sp["grow"], sp["during_splits"], sp["baseline"]
        verdict = "met" if d["p99_ms"] <= SPLIT_TARGET_P99_MS else "MISSED"
        print(f"split pause (kv.shard_capacity {SPLIT_CAPACITY // 1024} KiB, {SPLIT_CONNECTIONS} connections):")
        print(f"  baseline (overwrites, no splits): {base['writes']} writes, p50 {base['p50_ms']:.1f} ms,"
              f" p99 {base['p99_ms']:.1f} ms, max {base['max_ms']:.1f} ms")  # fmt: skip
        print(f"  growing range: {g['writes']} writes ({g['ops_s']:.0f}/s), p50 {g['p50_ms']:.1f} ms,"
              f" p99 {g['p99_ms']:.1f} ms, max {g['max_ms']:.1f} ms;"
              f" {sp['splits']} splits ({sp['shards_before']} -> {sp['shards_after']} shards)")  # fmt: skip
        st = sp["settled"]
        print(f"  {sp['written_bytes'] // 1024} KiB of new keys and values written; largest shard at the end"
              f" {sp['largest_shard_after_bytes'] // 1024} KiB, {st['after_s']:g} s later {st['shards']} shards,"
              f" largest {st['largest_shard_bytes'] // 1024} KiB")  # fmt: skip
        print(f"  writes to a splitting range during its split: {d['writes']}, p50 {_fmt(d['p50_ms'], 1)} ms,"
              f" p99 {_fmt(d['p99_ms'], 1)} ms (target <= {SPLIT_TARGET_P99_MS:g} ms: {verdict}),"
              f" max {_fmt(d['max_ms'], 1)} ms, {d['over_250ms']} over 250 ms")  # fmt: skip
    parts = results.get("partitions")
    if parts:
        print()
        print(f"partition scaling: /api/v1/kv/put, {PARTITION_CONNECTIONS} connections, a fresh server per P")
        header = f"{'P':>3}{'shards':>8}{'ops/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'vs P=1':>8}{'idle CPU %':>12}"
        print(header)
        print("-" * len(header))
        for row in parts.values():
            w = row["writes"]
            print(
                f"{row['partitions']:>3}{row['shards']:>8}{w['ops_s']:>9.0f}{w['p50_ms']:>9.2f}{w['p99_ms']:>9.2f}"
                f"{_fmt(row['speedup_vs_P1']):>8}{row['idle_cpu']['pct_of_one_core']:>12.1f}"
            )


def _problems_and_notes(results: dict[str, Any], checks: dict[str, Any]) -> tuple[list[str], list[str]]:
    problems, notes = [], []
    for name, check in checks.items():
        if not check["ok"]:
            problems.append(f"check {name} failed: {check}")
    runs = [
        (f"{name} {key}", r)
        for name, sc in results.get("compare", {}).items()
        for key, rs in sc["runs"].items()
        for r in rs
    ]
    runs += [(f"partitions {k} writes", row["writes"]) for k, row in results.get("partitions", {}).items()]
    for label, r in runs:
        if r["non2xx"] or sum(r["socket_errors"].values()) or r["body_errors"]:
            problems.append(
                f"{label}: non-2xx {r['non2xx']}, socket errors {r['socket_errors']}, error texts {r['body_errors']}"
            )
        if r["steal_pct"] >= STEAL_NOTE_PCT:
            notes.append(f"{label}: steal {r['steal_pct']:.0f}% (not comparable)")
        if r["other_load_pct"] >= OTHER_LOAD_NOTE_PCT:
            notes.append(f"{label}: other processes used {r['other_load_pct']:.0f}% of the CPUs")
    sp = results.get("split")
    if sp:
        if sp["errors"]:
            problems.append(f"split: {sp['errors']} failed writes, e.g. {sp['error_samples']}")
        if not sp["check"]["ok"]:
            problems.append(f"split: keys check failed: {sp['check']}")
        if sp["splits"] <= 0:
            problems.append("split: no split happened")
    for who, lines in results.get("log_problems", {}).items():
        if lines:
            notes.append(f"{who}: {len(lines)} warning/error log lines, first: {lines[0][:300]}")
    return problems, notes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=None, help="seconds per wrk run (default 10, --quick 2)")
    parser.add_argument("--pairs", type=int, default=None, help="interleaved pairs per scenario (default 2, --quick 1)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: short runs, one pair")
    parser.add_argument("--skip", default="", help="comma-separated sections to leave out: compare, split, partitions")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help=f"wait up to S seconds before each run for other processes to use < {OTHER_LOAD_NOTE_PCT}%% of CPUs",
    )
    args = parser.parse_args()
    # stopped by a signal (a CI timeout, kill): unwind, so that the servers are stopped and their directories removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job starts with SIGINT ignored
    duration = args.duration if args.duration is not None else (2.0 if args.quick else 10.0)
    pairs = args.pairs if args.pairs is not None else (1 if args.quick else 2)
    baseline_s, grow_s, settle_s, idle_s = (2.0, 5.0, 2.0, 2.0) if args.quick else (5.0, 20.0, 5.0, 5.0)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    wrk = ensure_debian_package("wrk", "wrk")
    etcd_bin = ensure_debian_package("etcd", "etcd-server")
    if not wrk or not etcd_bin:
        progress(f"need wrk and etcd (wrk: {wrk}, etcd: {etcd_bin})")
        return 1
    etcd_version = subprocess.run([etcd_bin, "--version"], capture_output=True, text=True, check=False).stdout
    idle_load = machine_load(2.0)
    if idle_load >= OTHER_LOAD_NOTE_PCT:
        progress(f"!! other processes use {idle_load:.0f}% of the CPUs before the run: figures will be noisy")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    total = time.monotonic()
    m = re.search(r"etcd Version: (\S+)", etcd_version)
    results: dict[str, Any] = {"etcd_version": f"etcd {m.group(1) if m else '?'}", "log_problems": {}}
    checks: dict[str, Any] = {}

    if "compare" not in skip:
        progress(f"=== fleetmate and etcd side by side: {pairs} interleaved pair(s) per scenario ===")
        fm, et = KvFleetmate(sys.executable), KvEtcd(etcd_bin)
        with running(fm), running(et):
            for server in (fm, et):
                started = time.monotonic()
                asyncio.run(server.create_all())
                n = len(server.versions())
                progress(f"{server.name}: {n} keys loaded in {time.monotonic() - started:.1f} s")
            results["shards"] = [{k: s[k] for k in ("id", "partition", "start", "end")} for s in fm.shards()]
            results["compare"], checks = compare(wrk, fm, et, duration, pairs, args.wait_quiet)
        results["log_problems"] |= {"fleetmate": fm.problems[:20], "etcd": et.problems[:20]}
    if "split" not in skip:
        progress("=== split pause ===")
        results["split"] = split_pause(baseline_s, grow_s, settle_s)
        results["log_problems"]["fleetmate-split"] = results["split"]["log_problems"]
    if "partitions" not in skip:
        progress(f"=== partition scaling, P = {', '.join(map(str, PARTITION_COUNTS))} ===")
        results["partitions"] = partition_scaling(wrk, duration, idle_s, args.wait_quiet)
        for k, row in results["partitions"].items():
            checks[f"partitions {k} writes"] = row["check"]
            results["log_problems"][f"fleetmate-{k}"] = row["log_problems"]
    elapsed = time.monotonic() - total

    _print_tables(results, duration, pairs)
    problems, notes = _problems_and_notes(results, checks)
    if idle_load >= OTHER_LOAD_NOTE_PCT:
        notes.insert(0, f"other processes used {idle_load:.0f}% of the CPUs just before the run")
    print()
    print("problems: " + ("none" if not problems else "\n  " + "\n  ".join(problems)))
    print("notes: " + ("none" if not notes else "\n  " + "\n  ".join(notes)))
    print("not measured: the 3-server NATS cluster variant")
    print(f"total {elapsed:.0f} s")
    path = write_result(
        "kv-quick" if args.quick else "kv",
        {
            "duration_s": duration,
            "pairs": pairs,
            "quick": args.quick,
            "skipped": sorted(skip),
            "keys": KEYS,
            "value_bytes": VALUE_BYTES,
            "fleetmate_commit": commit.stdout.strip(),
            "load": "wrk --latency -t2 (-t1 at 1 connection), Lua scripts picking random keys; the split phase"
            f" {SPLIT_CONNECTIONS} asyncio connections (raw HTTP/1.1)",
            "other_load_before_run_pct": idle_load,
            **results,
            "checks": checks,
            "problems": problems,
            "notes": notes,
            "not_measured": ["the 3-server NATS cluster variant"],
            "elapsed_s": elapsed,
        },
    )
    print(f"wrote {path}")
    return 0 if not problems else 3


if __name__ == "__main__":
    sys.exit(main())
