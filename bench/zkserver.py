"""A real ZooKeeper 3.8 (Debian's package) on free ports in a temporary directory, for side-by-side benchmarks."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ensure_debian_package, progress
from tests.harness import free_port

JAVA_DIR = Path("/usr/share/java")
# zookeeper.jar's manifest names its dependencies (zookeeper-jute, netty, slf4j-api, ...) with absolute
# paths; listing them again does no harm and keeps the classpath explicit. slf4j-simple is the binding
# that makes the server log to stderr (our log file) instead of discarding everything.
JARS = ("zookeeper.jar", "zookeeper-jute.jar", "slf4j-api.jar", "slf4j-simple.jar")
# Startup warnings that every run prints: not news.
_LOG_NOISE = (
    "maxCnxns is not configured",
    "Either no config or no quorum defined in config",
    "zookeeper.snapshot.trust.empty",
    "digest mismatch",
)


def four_letter(host: str, port: int, word: str, timeout: float = 5.0) -> str:
    """Answer of a four-letter-word command (ruok, mntr, srvr, cons, ...)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(word.encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def mntr(host: str, port: int) -> dict[str, str]:
    """The `mntr` figures (zk_num_alive_connections, zk_watch_count, zk_outstanding_requests, ...)."""
    out = {}
    for line in four_letter(host, port, "mntr").splitlines():
        key, _, value = line.partition("\t")
        if key:
            out[key] = value.strip()
    return out


def zookeeper_classpath() -> str | None:
    """The server's classpath, installing Debian's zookeeper package when it is missing (and we are root)."""
    if not (JAVA_DIR / "zookeeper.jar").exists():
        # the package's only program on PATH is zooinspector: use it to ask for the package
        ensure_debian_package("zooinspector", "zookeeper")
    jars = [JAVA_DIR / j for j in JARS]
    if not all(j.exists() for j in jars) or not shutil.which("java"):
        return None
    return ":".join(map(str, jars))


def zookeeper_version() -> str:
    """Version of the installed server, e.g. 3.8.0 (from the jar's name, else 'unknown')."""
    for jar in sorted(JAVA_DIR.glob("zookeeper-3*.jar")):
        return jar.stem.removeprefix("zookeeper-")
    return "unknown"


class ZooKeeper:
    """A standalone ZooKeeperServerMain in a temporary directory, listening on 127.0.0.1:<free port>."""

    name = "zookeeper"
    kind = "zookeeper"
    host = "127.0.0.1"

    def __init__(self, classpath: str, listen_backlog: int = 1024, heap_mb: int | None = None) -> None:
        self.classpath = classpath
        self.version = zookeeper_version()
        self.tmp = Path(tempfile.mkdtemp(prefix="zookeeper-bench-"))
        self.port = free_port()
        self.log = self.tmp / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.listen_backlog = listen_backlog
        self.heap_mb = heap_mb

    def config(self) -> str:
        lines = [
            "tickTime=2000",
            f"dataDir={self.tmp / 'data'}",
            f"clientPort={self.port}",
            f"clientPortAddress={self.host}",
            "maxClientCnxns=0",  # default 60 per client IP: 64 sessions from one host would be refused
            # the accept queue: Java's default backlog is 50, which drops SYNs in a 10,000-session storm
            f"clientPortListenBacklog={self.listen_backlog}",
            "admin.enableServer=false",
            "4lw.commands.whitelist=*",
        ]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 60.0) -> None:
        (self.tmp / "data").mkdir()
        cfg = self.tmp / "zoo.cfg"
        cfg.write_text(self.config())
        cmd = ["java", "-Dorg.slf4j.simpleLogger.defaultLogLevel=info", "-Djava.net.preferIPv4Stack=true"]
        if self.heap_mb:
            cmd += [f"-Xms{self.heap_mb}m", f"-Xmx{self.heap_mb}m"]
        cmd += ["-cp", self.classpath, "org.apache.zookeeper.server.ZooKeeperServerMain", str(cfg)]
        started = time.monotonic()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.tmp)
        deadline = started + timeout
        while True:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"zookeeper exited with {self.proc.returncode} while starting:\n{tail}")
            # `ruok` says imok as soon as the port listens, before the server takes sessions (those are
            # closed with "ZooKeeperServer not running"); `srvr` reports figures only once it serves.
            with contextlib.suppress(OSError):
                if four_letter(self.host, self.port, "ruok", timeout=1.0) == "imok" and four_letter(
                    self.host, self.port, "srvr", timeout=1.0
                ).startswith("Zookeeper version"):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"zookeeper did not answer ruok within {timeout:g} s; see {self.log}")
            time.sleep(0.05)
        took = time.monotonic() - started
        progress(f"zookeeper {self.version} ready on {self.host}:{self.port} (pid {self.proc.pid}) in {took:.2f} s")

    def stop(self, keep: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                progress("zookeeper did not exit within 20 s of SIGTERM; killing it")
                self.proc.kill()
                self.proc.wait()
        if not keep:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the server has used so far."""
        if self.proc is None:
            return 0.0
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(self.proc.pid).cpu_times()
            return t.user + t.system
        return 0.0

    def rss_mb(self) -> float:
        if self.proc is None:
            return 0.0
        with contextlib.suppress(psutil.Error):
            return psutil.Process(self.proc.pid).memory_info().rss / 2**20
        return 0.0

    def log_problems(self) -> list[str]:
        """WARN and ERROR lines of the server's log so far (known start-up noise left out)."""
        if not self.log.exists():
            return []
        out = []
        lines = self.log.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            if (" WARN " in line or " ERROR " in line) and not any(n in line for n in _LOG_NOISE):
                after = lines[i + 1] if i + 1 < len(lines) else ""
                cause = after.split(":")[0].endswith(("Exception", "Error"))  # what the warning is about
                if after.startswith("EndOfStreamException"):
                    continue  # "it probably closed the socket": a client hung up, often right after closeSession
                out.append(f"{line} | {after}" if cause else line)
        return out

    def stats(self) -> dict[str, str]:
        try:
            return mntr(self.host, self.port)
        except OSError as exc:
            return {"error": str(exc)}


def main() -> int:
    """Start a ZooKeeper and keep it running until Ctrl-C: `python bench/zkserver.py`."""
    classpath = zookeeper_classpath()
    if classpath is None:
        progress("no ZooKeeper: install Debian's zookeeper package (apt-get install zookeeper) and a JRE")
        return 1
    server = ZooKeeper(classpath)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the server on SIGTERM too (finally below)
    try:
        server.start()
        print(f"{server.host}:{server.port}  (log {server.log})", flush=True)
        while server.alive():
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
