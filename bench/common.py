"""Shared benchmark helpers: percentiles, progress lines, JSON results, peer binaries."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def percentile(values: list[float], pct: float) -> float:
    """The pct-th percentile (nearest rank) of values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def summary(values: list[float]) -> dict[str, float]:
    """Median, p50/p99, min and max of a list of samples."""
    return {
        "n": len(values),
        "median": statistics.median(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "min": min(values),
        "max": max(values),
    }


def progress(msg: str) -> None:
    """One progress line on stderr, so long runs show where they are."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write_result(name: str, data: dict[str, Any]) -> Path:
    """Write bench/results/<name>.json with the machine it ran on, and return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {
        "benchmark": name,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "system": platform.platform()},
        **data,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def ensure_debian_package(binary: str, package: str) -> str | None:
    """Path of binary, installing the Debian package when missing and we are root; None when impossible."""
    found = shutil.which(binary)
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    progress(f"installing {package} for the side-by-side run")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "-qq", package], env=env, check=False, capture_output=True)
    return shutil.which(binary)


_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def parse_wrk(output: str) -> dict[str, Any]:
    """Figures from `wrk --latency` output: requests, req/s, latency percentiles (ms), non-2xx and socket errors."""
    out: dict[str, Any] = {"non2xx": 0, "socket_errors": {"connect": 0, "read": 0, "write": 0, "timeout": 0}}
    if m := re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", output, re.M):
        out["requests"] = int(m.group(1))
        out["elapsed_s"] = float(m.group(2)) * _WRK_UNITS[m.group(3)] / 1e3
    if m := re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M):
        out["ops_s"] = float(m.group(1))
    for pct, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.M):
        out[f"p{pct}_ms"] = float(value) * _WRK_UNITS[unit]
    if m := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output):
        out["non2xx"] = int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output):
        out["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups()), strict=True))
    missing = {"requests", "ops_s", "p50_ms", "p99_ms"} - out.keys()
    if missing:
        raise ValueError(f"wrk output lacks {sorted(missing)}:\n{output}")
    return out


def run_wrk(
    wrk: str, url: str, script: str, connections: int, duration_s: float, threads: int = 2, timeout_s: float = 10
) -> dict[str, Any]:
    """Run wrk with a Lua script and --latency; parsed figures plus the raw output.

    wrk needs at least one connection per thread, so threads is capped at connections.
    """
    threads = max(1, min(threads, connections))
    cmd = [wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration_s))}s", f"--timeout={timeout_s:g}s"]
    cmd += ["--latency", "-s", script, url]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=duration_s + timeout_s + 30)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return {**parse_wrk(done.stdout), "threads": threads, "connections": connections, "raw": done.stdout}
