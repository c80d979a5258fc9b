"""Cold start to ready and idle memory: fleetmate on the embedded default, beside etcd in the same run.

    python bench/startup.py [--rounds N]

Prints a table and writes bench/results/startup.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ensure_debian_package, progress, summary, write_result
from tests.harness import free_port


def _poll(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=0.5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.005)
    raise RuntimeError(f"{url} not ready in time")


def _rss_tree(pid: int) -> tuple[int, int]:
    proc = psutil.Process(pid)
    own = proc.memory_info().rss
    kids = sum(k.memory_info().rss for k in proc.children(recursive=True))
    return own, kids


def fleetmate_round(idle_s: float) -> dict[str, float]:
    """Start `fleetmate serve` in a fresh data dir; time to /ready 200; RSS after idle_s."""
    with tempfile.TemporaryDirectory(prefix="fm-bench-") as tmp:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETMATE_")}
        env.update(
            FLEETMATE_DATA_DIR=f"{tmp}/data",
            FLEETMATE_HTTP_PORT=str(port),
            FLEETMATE_NATS_PORT="0",
            FLEETMATE_ZK_PORT="0",  # never assume ZooKeeper's 2181 is free
            FLEETMATE_LOG_LEVEL="warning",
        )
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "app", "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _poll(f"http://127.0.0.1:{port}/api/v1/ready", started + 30)
            ready_s = time.monotonic() - started
            time.sleep(idle_s)
            own, nats = _rss_tree(proc.pid)
            stop_started = time.monotonic()
            proc.terminate()
            proc.wait(15)
            stop_s = time.monotonic() - stop_started
        finally:
            if proc.poll() is None:
                proc.kill()
    return {"ready_s": ready_s, "rss_mb": own / 2**20, "nats_rss_mb": nats / 2**20, "stop_s": stop_s}


def etcd_round(etcd: str, idle_s: float) -> dict[str, float]:
    """Start a single etcd in a fresh data dir; time to /health 200; RSS after idle_s."""
    with tempfile.TemporaryDirectory(prefix="etcd-bench-") as tmp:
        client, peer = free_port(), free_port()
        started = time.monotonic()
        proc = subprocess.Popen(
            [
                etcd,
                "--data-dir", f"{tmp}/etcd",
                "--listen-client-urls", f"http://127.0.0.1:{client}",
                "--advertise-client-urls", f"http://127.0.0.1:{client}",
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", f"default=http://127.0.0.1:{peer}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            _poll(f"http://127.0.0.1:{client}/health", started + 30)
            ready_s = time.monotonic() - started
            time.sleep(idle_s)
            own, _ = _rss_tree(proc.pid)
        finally:
            proc.terminate()
            proc.wait(15)
    return {"ready_s": ready_s, "rss_mb": own / 2**20}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--idle", type=float, default=3.0, help="seconds idle before reading memory")
    args = parser.parse_args()

    fm: list[dict[str, float]] = []
    for i in range(args.rounds):
        progress(f"fleetmate round {i + 1}/{args.rounds}")
        fm.append(fleetmate_round(args.idle))
    etcd_bin = ensure_debian_package("etcd", "etcd-server") or shutil.which("etcd")
    peer: list[dict[str, float]] = []
    if etcd_bin:
        for i in range(args.rounds):
            progress(f"etcd round {i + 1}/{args.rounds}")
            peer.append(etcd_round(etcd_bin, args.idle))
    else:
        progress("etcd not available: no side-by-side figures")

    result: dict[str, object] = {
        "fleetmate": {k: summary([r[k] for r in fm]) for k in fm[0]},
        "rounds": args.rounds,
        "idle_s": args.idle,
    }
    print(f"{'':24}{'median':>10}{'p99':>10}{'min':>10}{'max':>10}")
    for key, label in (("ready_s", "cold start to ready (s)"), ("rss_mb", "fleetmate RSS (MiB)"),
                       ("nats_rss_mb", "nats-server RSS (MiB)"), ("stop_s", "SIGTERM to exit (s)")):  # fmt: skip
        s = summary([r[key] for r in fm])
        print(f"{label:24}{s['median']:>10.3f}{s['p99']:>10.3f}{s['min']:>10.3f}{s['max']:>10.3f}")
    if peer:
        e_ready = summary([r["ready_s"] for r in peer])
        e_rss = summary([r["rss_mb"] for r in peer])
        result["etcd"] = {"ready_s": e_ready, "rss_mb": e_rss}
        fm_ready = summary([r["ready_s"] for r in fm])["median"]
        fm_total = summary([r["rss_mb"] + r["nats_rss_mb"] for r in fm])["median"]
        result["ratio_vs_etcd"] = {
            "ready_s": fm_ready / e_ready["median"],
            "rss_total": fm_total / e_rss["median"],
        }
        print(f"{'etcd start to ready (s)':24}{e_ready['median']:>10.3f}{e_ready['p99']:>10.3f}")
        print(f"{'etcd RSS (MiB)':24}{e_rss['median']:>10.3f}{e_rss['p99']:>10.3f}")
        print(f"ratio fleetmate/etcd: ready {fm_ready / e_ready['median']:.2f}x, "
              f"memory (fleetmate + nats-server) {fm_total / e_rss['median']:.2f}x")  # fmt: skip
    path = write_result("startup", result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
