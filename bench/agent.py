"""Agent footprint: RSS and CPU of `fleetmate agent` at a 5 s heartbeat, beside node_exporter.

    python bench/agent.py [--seconds 60] [--interval 5] [--quick]

Starts a nats-server (with a token, as a control plane beyond loopback would have) and one
`fleetmate agent`; after a warm-up (start-up and the first engine scan are not the steady
state) samples the agent's RSS every second and its CPU time over the window, and counts the
heartbeats that arrive. node_exporter (Debian's prometheus-node-exporter, installed when
missing and root) runs at the same time on a free port and is scraped at the same interval,
the way Prometheus would, and is sampled the same way. Targets: <= 60 MB RSS, <= 1 % of a core.
Prints a table and writes bench/results/agent.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.bus import subjects
from app.services.agent.messages import Heartbeat
from bench.common import ensure_debian_package, progress, summary, write_result
from tests.harness import NatsServer, free_port

TOKEN = "bench-agent-token-0001"
TARGET_RSS_MB = 60.0
TARGET_CPU_PCT = 1.0


@dataclass
class Sampled:
    """RSS samples and CPU time of one process (and its children) over the measuring window."""

    name: str
    proc: psutil.Process
    rss_mb: list[float] = field(default_factory=list)
    cpu_start: float = 0.0
    cpu_end: float = 0.0

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the process and its children so far."""
        t = self.proc.cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    def sample(self) -> None:
        self.rss_mb.append(self.proc.memory_info().rss / 2**20)

    def result(self, window_s: float) -> dict[str, Any]:
        cpu_pct = 100.0 * (self.cpu_end - self.cpu_start) / window_s
        return {"rss_mb": summary(self.rss_mb), "cpu_pct_of_core": cpu_pct, "cpu_s": self.cpu_end - self.cpu_start}


def _start_agent(nats_url: str, data_dir: str, interval: float) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETMATE_")}
    env.update(
        FLEETMATE_NATS_URL=nats_url,
        FLEETMATE_NATS_TOKEN=TOKEN,
        FLEETMATE_NODE_ID="bench-agent",
        FLEETMATE_DATA_DIR=data_dir,
        FLEETMATE_MEMBERSHIP_HEARTBEAT_INTERVAL=str(interval),
        FLEETMATE_LOG_LEVEL="warning",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "app", "agent"],
        env=env,
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _start_node_exporter(binary: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [binary, f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("node_exporter did not answer within 10 s")


async def _scrape(url: str, interval: float, stop: asyncio.Event) -> int:
    """Scrape node_exporter every interval seconds, as Prometheus would; returns the number of scrapes."""
    n = 0
    async with httpx.AsyncClient(timeout=5) as http:
        while not stop.is_set():
            r = await http.get(url)
            r.raise_for_status()
            n += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
    return n


async def measure(seconds: float, interval: float, warmup: float, exporter: str | None) -> dict[str, Any]:
    """Run the agent (and node_exporter) and sample both over `seconds` after `warmup`."""
    with tempfile.TemporaryDirectory(prefix="fm-bench-agent-") as tmp:
        server = NatsServer(Path(tmp) / "nats", token=TOKEN).start()
        agent = _start_agent(server.url, f"{tmp}/data", interval)
        ne: subprocess.Popen[bytes] | None = None
        try:
            nc = await nats.connect(server.url, token=TOKEN)
            beats = await nc.subscribe(subjects.agent_heartbeat("bench-agent"))
            first = await beats.next_msg(timeout=30)
            msgspec.json.decode(first.data, type=Heartbeat)
            procs = [Sampled("fleetmate agent", psutil.Process(agent.pid))]
            stop = asyncio.Event()
            scraper: asyncio.Task[int] | None = None
            if exporter:
                ne, ne_url = _start_node_exporter(exporter)
                procs.append(Sampled("node_exporter", psutil.Process(ne.pid)))
                scraper = asyncio.create_task(_scrape(ne_url, interval, stop))
            progress(f"warming up for {warmup:g} s")
            await asyncio.sleep(warmup)
            while True:  # drop the heartbeats of the warm-up
                try:
                    await beats.next_msg(timeout=0.01)
                except nats.errors.TimeoutError:
                    break
            progress(f"sampling for {seconds:g} s at a {interval:g} s heartbeat")
            for p in procs:
                p.cpu_start = p.cpu_seconds()
            started = time.monotonic()
            while time.monotonic() - started < seconds:
                for p in procs:
                    p.sample()
                await asyncio.sleep(1.0)
            window = time.monotonic() - started
            for p in procs:
                p.cpu_end = p.cpu_seconds()
            received = 0
            while True:
                try:
                    await beats.next_msg(timeout=0.01)
                    received += 1
                except nats.errors.TimeoutError:
                    break
            stop.set()
            scrapes = await scraper if scraper is not None else 0
            await nc.close()
            results = {p.name: p.result(window) for p in procs}
            return {
                "window_s": window,
                "heartbeat_interval_s": interval,
                "heartbeats_received": received,
                "heartbeats_expected": int(window // interval),
                "node_exporter_scrapes": scrapes,
                "processes": results,
            }
        finally:
            for proc in (agent, ne):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="sampling window (60)")
    parser.add_argument("--interval", type=float, default=5.0, help="heartbeat and scrape interval (5)")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before sampling starts (10)")
    parser.add_argument("--quick", action="store_true", help="a 20 s window after a 5 s warm-up")
    parser.add_argument("--no-node-exporter", action="store_true", help="measure the agent alone")
    args = parser.parse_args()
    seconds, warmup = (20.0, 5.0) if args.quick else (args.seconds, args.warmup)
    exporter = None
    if not args.no_node_exporter:
        exporter = ensure_debian_package("prometheus-node-exporter", "prometheus-node-exporter")
        if exporter is None:
            progress("node_exporter not available (not root or no apt-get): measuring the agent alone")
    data = asyncio.run(measure(seconds, args.interval, warmup, exporter))
    agent = data["processes"]["fleetmate agent"]
    rss, cpu = agent["rss_mb"]["max"], agent["cpu_pct_of_core"]
    data["targets"] = {
        "rss_mb": TARGET_RSS_MB,
        "cpu_pct_of_core": TARGET_CPU_PCT,
        "rss_ok": rss <= TARGET_RSS_MB,
        "cpu_ok": cpu <= TARGET_CPU_PCT,
    }
    ne = data["processes"].get("node_exporter")
    if ne is not None:
        data["ratio_to_node_exporter"] = {
            "rss": rss / ne["rss_mb"]["max"],
            "cpu": cpu / ne["cpu_pct_of_core"] if ne["cpu_pct_of_core"] > 0 else None,
        }
    print(f"{'process':<18} {'RSS MB (median / max)':>22} {'CPU % of a core':>16}")
    for name, r in data["processes"].items():
        rss_txt = f"{r['rss_mb']['median']:.1f} / {r['rss_mb']['max']:.1f}"
        print(f"{name:<18} {rss_txt:>22} {r['cpu_pct_of_core']:>16.3f}")
    print(
        f"heartbeats: {data['heartbeats_received']} received, {data['heartbeats_expected']} expected "
        f"in {data['window_s']:.0f} s"
    )
    verdict = "met" if data["targets"]["rss_ok"] and data["targets"]["cpu_ok"] else "MISSED"
    print(f"targets (<= {TARGET_RSS_MB:g} MB, <= {TARGET_CPU_PCT:g} % of a core): {verdict}")
    if "ratio_to_node_exporter" in data:
        ratio = data["ratio_to_node_exporter"]
        cpu_ratio = f"{ratio['cpu']:.2f}x" if ratio["cpu"] is not None else "n/a"
        print(f"agent / node_exporter: RSS {ratio['rss']:.2f}x, CPU {cpu_ratio}")
    name = "agent-quick" if args.quick else "agent"
    print(f"wrote {write_result(name, data)}")


if __name__ == "__main__":
    main()
