"""Failover: kill -9 the leader replica, time the next acknowledged write on a survivor and the new leader.

    python bench/failover.py [--rounds N]

fleetmate: 3 replicas on one nats-server (lease TTL 5 s, renew 1 s). etcd: a 3-member
cluster. Both on free ports in temp dirs, one system at a time, in the same run. A writer
keeps setting keys on a surviving member; after every round each acknowledged write is read
back from every member. Prints a table and writes bench/results/failover.json.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ensure_debian_package, progress, summary, write_result
from tests.harness import Fleetmate, NatsServer, free_port, wait_for


class Writer(threading.Thread):
    """Writes key i with value i to `url` in a loop; records (i, ack time) for each acknowledged write."""

    def __init__(self, put: Any) -> None:
        super().__init__(daemon=True)
        self.put = put
        self.acked: list[tuple[int, float]] = []
        self.stop = threading.Event()
        self.i = 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.i += 1
            try:
                if self.put(self.i):
                    self.acked.append((self.i, time.monotonic()))
            except httpx.HTTPError:
                time.sleep(0.005)

    def first_ack_after(self, t: float, deadline: float = 30.0) -> float:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            for _, at in reversed(self.acked):
                if at > t:
                    return min(a for _, a in self.acked if a > t) - t
                break
            time.sleep(0.002)
        raise RuntimeError("no write acknowledged after the kill")


# ---- fleetmate -------------------------------------------------------------------------------------


def fleetmate_rounds(rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fm-failover-") as tmp:
        nats = NatsServer(Path(tmp) / "nats").start()
        reps: dict[str, Fleetmate] = {}

        def start(name: str) -> Fleetmate:
            fm = Fleetmate(
                Path(tmp) / name,
                env={"FLEETMATE_NATS_URL": nats.url, "FLEETMATE_NODE_ID": name, "FLEETMATE_LOG_LEVEL": "warning"},
            )
            fm.env["FLEETMATE_LOG_LEVEL"] = "info"  # the ready line is needed
            reps[name] = fm.start()
            return fm

        try:
            for name in ("f1", "f2", "f3"):
                start(name)
            client = httpx.Client(timeout=5)
            write_ms: list[float] = []
            elect_ms: list[float] = []
            acked_all: list[int] = []

            def leader() -> str | None:
                for fm in reps.values():
                    if fm.proc is None or fm.proc.poll() is not None:
                        continue
                    with contextlib.suppress(httpx.HTTPError):
                        view = client.get(fm.url + "/api/v1/cluster").json()
                        if "role" not in view:
                            progress(f"{fm.env['FLEETMATE_NODE_ID']} answered {view}")
                            for line in fm.lines[-50:]:
                                if line.get("msg") == "unhandled error":
                                    progress(str(line.get("exc"))[-800:])
                        elif view["role"] == "leader":
                            return str(view["node_id"])
                return None

            for r in range(rounds):
                name = wait_for(leader, 30, "a leader")
                survivor = next(n for n in reps if n != name)
                url = reps[survivor].url

                def put(i: int, url: str = url) -> bool:
                    resp = client.put(f"{url}/api/v1/registry/nodes/fo", json={"data": str(i)})
                    if resp.status_code == 404:
                        client.post(f"{url}/api/v1/registry/nodes/fo", json={"data": str(i)})
                        return False
                    return resp.status_code == 200

                writer = Writer(put)
                writer.start()
                time.sleep(0.5)
                killed_at = time.monotonic()
                reps[name].stop(signal.SIGKILL)
                write_ms.append(writer.first_ack_after(killed_at) * 1000)
                wait_for(lambda n=name: (leader() or n) != n, 30, "a new leader")
                elect_ms.append((time.monotonic() - killed_at) * 1000)
                writer.stop.set()
                writer.join()
                acked_all.extend(i for i, _ in writer.acked)
                last = writer.acked[-1][0] if writer.acked else 0
                # Every acknowledged write is visible on every live replica (the last one as the value).
                for fm in reps.values():
                    if fm.proc and fm.proc.poll() is None:
                        got = client.get(fm.url + "/api/v1/registry/nodes/fo").json()
                        assert int(got["data"]) >= last, (fm.env["FLEETMATE_NODE_ID"], got, last)
                progress(f"fleetmate round {r + 1}/{rounds}: write {write_ms[-1]:.0f} ms, leader {elect_ms[-1]:.0f} ms")
                start(name)  # back to 3 replicas; it catches up from its data dir
            version = client.get(reps["f1"].url + "/api/v1/registry/nodes/fo").json()["stat"]["version"]
            return {
                "next_write_ms": summary(write_ms),
                "new_leader_ms": summary(elect_ms),
                "acked_writes": len(acked_all),
                "node_version_final": version,
            }
        finally:
            for fm in reps.values():
                fm.kill()
            nats.stop()


# ---- etcd -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def etcd_cluster(binary: str, tmp: Path) -> Iterator[dict[str, Any]]:
    names = ["e1", "e2", "e3"]
    ports = {n: (free_port(), free_port()) for n in names}
    initial = ",".join(f"{n}=http://127.0.0.1:{ports[n][1]}" for n in names)
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(n: str, state: str) -> None:
        client, peer = ports[n]
        procs[n] = subprocess.Popen(
            [
                binary, "--name", n, "--data-dir", str(tmp / n),
                "--listen-client-urls", f"http://127.0.0.1:{client}",
                "--advertise-client-urls", f"http://127.0.0.1:{client}",
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", initial, "--initial-cluster-state", state,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    for n in names:
        start(n, "new")
    cluster = {"names": names, "ports": ports, "procs": procs, "start": start}
    try:
        yield cluster
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def etcd_rounds(binary: str, rounds: int) -> dict[str, Any]:
    key = base64.b64encode(b"fo").decode()
    with tempfile.TemporaryDirectory(prefix="etcd-failover-") as tmp, etcd_cluster(binary, Path(tmp)) as c:
        client = httpx.Client(timeout=5, trust_env=False)

        def url(n: str) -> str:
            return f"http://127.0.0.1:{c['ports'][n][0]}"

        def leader() -> str | None:
            for n in c["names"]:
                if c["procs"][n].poll() is not None:
                    continue
                with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                    st = client.post(url(n) + "/v3/maintenance/status", json={}).json()
                    if st["leader"] == st["header"]["member_id"]:
                        return str(n)
            return None

        write_ms: list[float] = []
        elect_ms: list[float] = []
        acked = 0
        for r in range(rounds):
            name = wait_for(leader, 60, "an etcd leader")
            survivor = next(n for n in c["names"] if n != name)

            def put(i: int, base: str = url(survivor)) -> bool:
                value = base64.b64encode(str(i).encode()).decode()
                return client.post(base + "/v3/kv/put", json={"key": key, "value": value}).status_code == 200

            writer = Writer(put)
            writer.start()
            time.sleep(0.5)
            killed_at = time.monotonic()
            c["procs"][name].kill()
            c["procs"][name].wait()
            write_ms.append(writer.first_ack_after(killed_at) * 1000)
            wait_for(lambda n=name: (leader() or n) != n, 30, "a new etcd leader")
            elect_ms.append((time.monotonic() - killed_at) * 1000)
            writer.stop.set()
            writer.join()
            acked += len(writer.acked)
            last = writer.acked[-1][0] if writer.acked else 0
            got = client.post(url(survivor) + "/v3/kv/range", json={"key": key}).json()
            assert int(base64.b64decode(got["kvs"][0]["value"])) >= last
            progress(f"etcd round {r + 1}/{rounds}: write {write_ms[-1]:.0f} ms, leader {elect_ms[-1]:.0f} ms")
            c["start"](name, "existing")
        return {"next_write_ms": summary(write_ms), "new_leader_ms": summary(elect_ms), "acked_writes": acked}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    result: dict[str, Any] = {"rounds": args.rounds, "fleetmate": fleetmate_rounds(args.rounds)}
    etcd = ensure_debian_package("etcd", "etcd-server") or shutil.which("etcd")
    if etcd:
        result["etcd"] = etcd_rounds(etcd, args.rounds)
    fm = result["fleetmate"]
    rows = [("fleetmate: next acked write", fm["next_write_ms"]), ("fleetmate: new lease holder", fm["new_leader_ms"])]
    if "etcd" in result:
        e = result["etcd"]
        rows += [("etcd: next acked write", e["next_write_ms"]), ("etcd: new raft leader", e["new_leader_ms"])]
        result["ratio_next_write_median"] = fm["next_write_ms"]["median"] / max(e["next_write_ms"]["median"], 1e-9)
    print(f"{'kill -9 of the leader':34}{'median ms':>10}{'max ms':>10}")
    for label, s in rows:
        print(f"{label:34}{s['median']:>10.0f}{s['max']:>10.0f}")
    etcd_acked = result.get("etcd", {}).get("acked_writes")
    print(f"acknowledged writes checked: fleetmate {fm['acked_writes']}, etcd {etcd_acked}")
    print(f"wrote {write_result('failover', result)}")
    return 0


if __name__ == "__main__":
    os.environ.pop("FLEETMATE_CONFIG", None)
    sys.exit(main())
