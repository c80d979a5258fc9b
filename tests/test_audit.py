"""Every decision traceable: node state changes in the audit API, the CLI and the shell, each with the
trace id of what caused it, and that trace id on the spans fleetmate exports (a real OTLP/HTTP
collector in the test) and on the decision's log line.

One real `fleetmate serve` with small membership timings (as in test_membership) exporting its spans
over OTLP to the collector below; the test plays the agents on the real NATS.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from nats.aio.client import Client
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.harness import Fleetmate, eventually, free_port, run_cli, running
from tests.test_membership import DOWN_AFTER, MARGIN_S, TIMINGS, Agent

ADMIN, READ = "audit-admin-1", "audit-read-1"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
HEX32 = re.compile(r"^[0-9a-f]{32}$")
CALLER_TRACE = "5a1e0f3c2b7d4e8f9a0b1c2d3e4f5a6b"
CALLER = f"00-{CALLER_TRACE}-00f067aa0ba902b7-01"


class Collector:
    """A minimal OTLP/HTTP trace receiver: every exported span as (name, trace id in hex)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str]] = []
        self.port = free_port()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        collector.spans.extend((s.name, s.trace_id.hex()) for s in scope.spans)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    def traces_of(self, name: str) -> set[str]:
        return {trace_id for span, trace_id in self.spans if span == name}


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    received = Collector()
    received.thread.start()
    try:
        yield received
    finally:
        received.server.shutdown()


@pytest.fixture(scope="module")
def fm(tmp_path_factory: pytest.TempPathFactory, collector: Collector) -> Iterator[Fleetmate]:
    env = {
        **TIMINGS,
        "FLEETMATE_AUTH_TOKENS": f"read:{READ},admin:{ADMIN}",
        "FLEETMATE_TELEMETRY_EXPORTER": "otlp",
        "FLEETMATE_TELEMETRY_ENDPOINT": collector.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within a tenth of a second, not five
    }
    with running(Fleetmate(tmp_path_factory.mktemp("audit"), env=env)) as server:
        yield server


@pytest.fixture
async def nc(fm: Fleetmate) -> AsyncIterator[Client]:
    client = await nats.connect(str(fm.logged("fleetmate ready")[0]["nats"]))
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def http(fm: Fleetmate) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fm.url, headers=AUTH, timeout=10) as client:
        yield client


async def audit(http: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    resp = await http.get("/api/v1/audit", params=params)
    assert resp.status_code == 200, resp.text
    entries: list[dict[str, Any]] = resp.json()
    return entries


async def state_of(http: httpx.AsyncClient, node_id: str) -> str | None:
    resp = await http.get(f"/api/v1/nodes/{node_id}")
    return str(resp.json()["node"]["state"]) if resp.status_code == 200 else None


async def wait_state(http: httpx.AsyncClient, node_id: str, state: str, timeout: float) -> None:
    async def reached() -> bool:
        return await state_of(http, node_id) == state

    await eventually(reached, timeout, f"{node_id} {state}")


async def logged(fm: Fleetmate, msg: str, node_id: str, **fields: str) -> list[str]:
    """The trace ids of the server's log lines `msg` about node_id (with these fields)."""
    lines = [line for line in fm.logged(msg) if line["node"] == node_id]
    return [line["trace_id"] for line in lines if all(line.get(k) == v for k, v in fields.items())]


async def test_an_operators_request_is_audited_with_the_trace_id_it_came_with(
    fm: Fleetmate, nc: Client, http: httpx.AsyncClient, collector: Collector
) -> None:
    agent = Agent(nc, "db-op").start()
    try:
        await wait_state(http, "db-op", "online", 5)
        resp = await http.put(
            "/api/v1/nodes/db-op/maintenance", json={"on": True, "reason": "disk swap"}, headers={"traceparent": CALLER}
        )
        assert resp.status_code == 200, resp.text
        found = await audit(http, trace_id=CALLER_TRACE)
        assert [(e["source"], e["subject"], e["kind"], e["trace_id"]) for e in found] == [
            ("node", "db-op", "maintenance", CALLER_TRACE)
        ]
        assert found[0]["message"] == "online -> maintenance: disk swap"
        # The node's own history carries it too, and the request's log line.
        history = (await http.get("/api/v1/nodes/db-op")).json()["history"]
        assert [(h["state"], h["trace_id"]) for h in history][-1] == ("maintenance", CALLER_TRACE)
        assert HEX32.match(history[0]["trace_id"]), history  # the registration: the leader's round
        assert await eventually(lambda: logged(fm, "node state set", "db-op"), 5, "the log line") == [CALLER_TRACE]

        # The request's span went to the collector under the caller's trace.
        async def exported() -> bool:
            return CALLER_TRACE in collector.traces_of("PUT /api/v1/nodes/{node_id}/maintenance")

        await eventually(exported, 5, "the request's span at the collector")
        # A request without a traceparent gets a trace of its own, recorded the same way.
        resp = await http.put("/api/v1/nodes/db-op/maintenance", json={"on": False})
        assert resp.status_code == 200, resp.text
        latest = (await audit(http, subject="db-op", limit=1))[0]
        assert latest["kind"] == "online"
        assert HEX32.match(latest["trace_id"])
        assert latest["trace_id"] != CALLER_TRACE
    finally:
        await agent.stop()


async def test_a_node_gone_silent_is_audited_with_the_trace_of_the_round_that_judged_it(
    fm: Fleetmate, nc: Client, http: httpx.AsyncClient, collector: Collector
) -> None:
    agent = Agent(nc, "db-quiet").start()
    await wait_state(http, "db-quiet", "online", 5)
    await agent.stop()
    await wait_state(http, "db-quiet", "down", DOWN_AFTER + MARGIN_S + 1)
    found = await audit(http, source="node", subject="db-quiet")
    assert [e["kind"] for e in found] == ["down", "suspect", "online"]  # newest first
    assert [e["at"] for e in found] == sorted((e["at"] for e in found), reverse=True)
    down = found[0]
    assert HEX32.match(down["trace_id"]), down
    assert down["message"].startswith("suspect -> down: no heartbeat for ")
    # Each judging round is a trace of its own.
    assert len({e["trace_id"] for e in found}) == 3
    # That trace is the round's: what else it decided (another silent node) happened at the same tick.
    same_round = await audit(http, trace_id=down["trace_id"])
    assert down in same_round
    assert {e["at"] for e in same_round} == {down["at"]}
    # The decision's log line and the round's exported span carry the same trace id.
    changed = await eventually(lambda: logged(fm, "node state changed", "db-quiet", to="down"), 5, "the log line")
    assert changed == [down["trace_id"]]

    async def exported() -> bool:
        return down["trace_id"] in collector.traces_of("membership.judge")

    await eventually(exported, 5, "the judging round's span at the collector")


async def test_filters_and_limits(fm: Fleetmate, http: httpx.AsyncClient) -> None:
    everything = await audit(http, limit=1000)
    assert everything, "earlier tests recorded decisions (the replica's own registration at least)"
    assert [e["at"] for e in everything] == sorted((e["at"] for e in everything), reverse=True)
    # no HA cluster here; the scheduler's are the kv store's own placement and splits
    assert {e["source"] for e in everything} <= {"node", "scheduler"}
    assert "node" in {e["source"] for e in everything}
    assert await audit(http, source="ha") == []
    assert len(await audit(http, limit=1)) == 1
    middle = everything[len(everything) // 2]["at"]
    assert await audit(http, since=middle, limit=1000) == [e for e in everything if e["at"] >= middle]
    assert await audit(http, subject="t1") == [e for e in everything if e["subject"] == "t1"]
    assert await audit(http, trace_id="0" * 32) == []


async def test_bad_parameters_get_a_400_naming_them_and_change_nothing(fm: Fleetmate, http: httpx.AsyncClient) -> None:
    before = (await http.get("/api/v1/registry")).json()["revision"]
    for params, field in [
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"trace_id": "xyz"}, "trace_id"),
        ({"trace_id": CALLER_TRACE.upper()}, "trace_id"),
        ({"source": "kv"}, "source"),
        ({"subject": "a/../b"}, "subject"),
        ({"since": -1}, "since"),
        ({"since": "yesterday"}, "since"),
    ]:
        resp = await http.get("/api/v1/audit", params=params)
        assert resp.status_code == 400, (params, resp.text)
        body = resp.json()
        assert body["error"] == "bad_request"
        assert [d["key"] for d in body["detail"]] == [field], body
    assert (await http.get("/api/v1/registry")).json()["revision"] == before
    # The same tokens as every read: none is refused, the read scope is enough.
    async with httpx.AsyncClient(base_url=fm.url, timeout=5) as anon:
        assert (await anon.get("/api/v1/audit")).status_code == 401
        assert (await anon.get("/api/v1/audit", headers={"Authorization": f"Bearer {READ}"})).status_code == 200
    schema = (await http.get("/schema/openapi.json")).json()["paths"]["/api/v1/audit"]["get"]
    assert schema["tags"] == ["audit"]
    assert schema["summary"]
    assert {p["name"] for p in schema["parameters"]} >= {"trace_id", "source", "subject", "since", "limit"}


async def test_the_cli_and_the_shell_print_the_trace_id(fm: Fleetmate, http: httpx.AsyncClient, tmp_path: Path) -> None:
    trace_id = "c0ffee00" * 4
    for on in (True, False):  # a decision of a trace of its own: the replica in maintenance and out
        headers = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"} if on else {}
        resp = await http.put("/api/v1/nodes/t1/maintenance", json={"on": on}, headers=headers)
        assert resp.status_code == 200, resp.text
    (entry,) = await audit(http, trace_id=trace_id)
    env = {"FLEETMATE_ADDR": fm.url, "FLEETMATE_TOKEN": ADMIN}

    def cli(*args: str) -> tuple[int, str, str]:
        done = run_cli(list(args), env, tmp_path)
        return done.returncode, done.stdout, done.stderr

    code, out, err = await asyncio.to_thread(cli, "audit", "--trace-id", trace_id)
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split() == ["TIME", "SOURCE", "SUBJECT", "KIND", "TRACE_ID", "MESSAGE"]
    assert len(rows) == 1
    assert rows[0].split()[2:6] == ["node", entry["subject"], entry["kind"], trace_id]
    code, out, err = await asyncio.to_thread(cli, "audit", "--source", "node", "--limit", "2", "--json")
    assert code == 0, err
    assert len(json.loads(out)) == 2
    code, _, err = await asyncio.to_thread(cli, "audit", "--limit", "0")
    assert code == 2
    assert "--limit" in err
    code, _, err = await asyncio.to_thread(cli, "audit", "--trace-id", "nope")
    assert code == 1
    assert "bad_request" in err
    assert "trace_id=nope" in err
    # node show prints each history entry's trace id.
    code, out, err = await asyncio.to_thread(cli, "node", "show", entry["subject"])
    assert code == 0, err
    assert "TRACE_ID" in out
    assert trace_id in out

    # The shell: `audit` with its flags, and a bad one refused before anything is sent.
    code, out, err = await asyncio.to_thread(
        cli, "shell", "-c", f"audit -t {trace_id}; audit -s node -n {entry['subject']} -l 1; audit -l 0"
    )
    assert code == 2, (out, err)
    lines = out.splitlines()
    assert lines[0].split() == ["TIME", "SOURCE", "SUBJECT", "KIND", "TRACE_ID", "MESSAGE"]
    assert lines[1].split()[2:6] == ["node", entry["subject"], entry["kind"], trace_id]
    assert lines[2] == lines[0]
    newest = lines[3].split()
    assert newest[2:5] == ["node", "t1", "online"]  # taken out of maintenance, by a request of its own trace
    assert HEX32.match(newest[5])
    assert newest[5] != trace_id
    assert len(lines) == 4
    assert "Error: BadArguments: audit: -l needs a number from 1 to 1000, not '0'" in err
    code, out, err = await asyncio.to_thread(cli, "shell", "-c", "help audit")
    assert code == 0, err
    assert out.startswith("usage: audit [-t trace_id] [-s ha|node|scheduler] [-n subject] [-l limit]\n")


def test_a_decision_span_is_a_root_with_a_fresh_trace_id() -> None:
    """decision_span: a root even inside another span, a fresh id without any tracer provider."""
    from opentelemetry import trace

    from app.decisions import current_trace_id, decision_span
    from app.telemetry import unrecorded_span

    outer = unrecorded_span()
    with trace.use_span(outer):
        with decision_span("round") as first:
            assert current_trace_id() == first
        with decision_span("round") as second:
            pass
        assert current_trace_id() == f"{outer.get_span_context().trace_id:032x}"
    assert HEX32.match(first)
    assert HEX32.match(second)
    assert len({first, second, current_trace_id() or "outside"}) == 3
