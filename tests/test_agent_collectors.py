"""The agent's collectors on this machine: ports, engines, log cleanup, network status and host figures."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from app.services.agent import engines, hostinfo, logclean, netstatus, ports
from app.services.agent.messages import LogCleanReport, LogRule, Target

DAY = 86400.0
MARIADBD = "/usr/sbin/mariadbd"
POSTGRES = "/usr/lib/postgresql/15/bin/postgres"


# ---- ports ----------------------------------------------------------------------------------------


def test_listening_ports_include_a_socket_the_test_opens() -> None:
    with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        udp.bind(("127.0.0.1", 0))
        tcp_port, udp_port = tcp.getsockname()[1], udp.getsockname()[1]
        found = ports.listening_ports()
    me, name = os.getpid(), psutil.Process().name()
    assert found.complete
    mine = {(p.proto, p.port) for p in found.ports if p.pid == me and p.process == name and p.address == "127.0.0.1"}
    assert ("tcp", tcp_port) in mine
    assert ("udp", udp_port) in mine


def _held_port() -> socket.socket:
    """A listening TCP socket on a port with room for 20 more above it."""
    while True:
        s = socket.socket()
        s.bind(("0.0.0.0", 0))
        if s.getsockname()[1] <= 65500:
            s.listen()
            return s
        s.close()


def test_free_ports_skip_a_port_the_test_holds() -> None:
    with _held_port() as held, socket.socket() as bound_only:
        port = held.getsockname()[1]
        assert ports.free_ports(port, port).ports == ()
        result = ports.free_ports(port, port + 20, count=3)
        assert port not in result.ports
        assert len(result.ports) == 3
        assert all(port < p <= port + 20 for p in result.ports)
        # A socket bound but not listening (invisible as a listener) still makes its port unusable.
        bound_only.bind(("127.0.0.1", result.ports[0]))
        again = ports.free_ports(port, port + 20, count=3)
        assert result.ports[0] not in again.ports
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("0.0.0.0", 0))
        uport = udp.getsockname()[1]
        assert ports.free_ports(uport, uport, proto="udp").ports == ()


@pytest.mark.parametrize(
    ("start", "end", "proto", "count", "message"),
    [
        (0, 10, "tcp", 1, "start must be between 1 and 65535, got 0"),
        (10, 70000, "tcp", 1, "end must be between 1 and 65535, got 70000"),
        (3400, 3306, "tcp", 1, "start 3400 is greater than its end 3306"),
        (3306, 3400, "sctp", 1, "proto must be 'tcp' or 'udp'"),
        (3306, 3400, "tcp", 0, "count must be at least 1"),
    ],
)
def test_free_ports_reject_bad_requests(start: int, end: int, proto: str, count: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ports.free_ports(start, end, proto, count)  # type: ignore[arg-type]


# ---- engines --------------------------------------------------------------------------------------


def _version_line(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True, timeout=10)
    return out.stdout.strip().splitlines()[0].strip()


def test_engine_scan_finds_mariadb_and_postgresql(tmp_path: Path) -> None:
    # Another name for the MariaDB server in a directory of the test's own: reported once, as a link.
    (tmp_path / "mysqld").symlink_to(MARIADBD)
    scan = engines.scan_engines(extra_dirs=[str(tmp_path)])
    assert scan.failures == ()
    by_path = {e.path: e for e in scan.engines}
    assert len(by_path) == len(scan.engines)

    maria = by_path[os.path.realpath(MARIADBD)]
    line = _version_line(MARIADBD)
    assert maria.engine == "mariadb"
    assert maria.version_line == line
    assert f"Ver {maria.version}-MariaDB" in line
    assert maria.version.count(".") == 2
    assert str(tmp_path / "mysqld") in maria.links

    pg = by_path[os.path.realpath(POSTGRES)]
    line = _version_line(POSTGRES)
    assert pg.engine == "postgresql"
    assert pg.version_line == line
    assert f"(PostgreSQL) {pg.version} " in line
    assert pg.version.startswith("15.")


def test_engine_scan_with_nothing_to_find(tmp_path: Path) -> None:
    kinds = tuple(k for k in engines.KINDS if k.family == "opengauss")
    assert engines.scan_engines(extra_dirs=[str(tmp_path)], path=str(tmp_path), kinds=kinds).engines == ()


def test_version_lines_parse() -> None:
    mysql, pg, gauss = engines.KINDS
    line = "/usr/sbin/mysqld  Ver 8.0.36 for Linux on x86_64 (MySQL Community Server - GPL)"
    assert engines.parse_version(mysql, line) == ("mysql", "8.0.36")
    assert engines.parse_version(pg, "postgres (PostgreSQL) 16.4") == ("postgresql", "16.4")
    line = "gaussdb (openGauss 5.0.1 build 33b035fd) compiled at 2023-12-15 20:24:19 commit 0 last mr  release"
    assert engines.parse_version(gauss, line) == ("opengauss", "5.0.1")


# ---- log cleanup ----------------------------------------------------------------------------------

NOW = 1_800_000_000.0
# name -> (age in days, size in bytes), oldest first
LOGS = {"a.log": (10, 100), "b.log": (5, 200), "c.log": (2, 300), "d.log": (1, 400), "e.log": (0, 500)}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """logs/ with five aged logs and a non-matching file, beside outside/ that no rule may touch."""
    logs, outside = tmp_path / "logs", tmp_path / "outside"
    logs.mkdir()
    outside.mkdir()
    for name, (age, size) in LOGS.items():
        _write(logs / name, size, NOW - age * DAY)
    _write(logs / "notes.txt", 50, NOW - 30 * DAY)
    _write(outside / "secret.log", 70, NOW - 30 * DAY)
    return logs


def _write(path: Path, size: int, mtime: float) -> None:
    path.write_bytes(b"x" * size)
    os.utime(path, (mtime, mtime))


def _names(report: LogCleanReport) -> list[str]:
    return [Path(f.path).name for f in report.deleted]


def _left(logs: Path) -> set[str]:
    return {p.name for p in logs.iterdir()}


def _snapshot(root: Path) -> dict[str, tuple[int, float]]:
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize(
    ("limits", "gone"),
    [
        ({"keep_days": 3}, ["a.log", "b.log"]),
        ({"keep_newest": 2}, ["a.log", "b.log", "c.log"]),
        ({"keep_total_bytes": 1000}, ["a.log", "b.log", "c.log"]),  # 1500 -> 1400 -> 1200 -> 900
        ({"keep_days": 6, "keep_newest": 4}, ["a.log"]),
        ({"keep_days": 6, "keep_total_bytes": 1300}, ["a.log", "b.log"]),
        ({}, []),
    ],
)
def test_retention_by_age_count_and_size(tree: Path, limits: dict[str, float], gone: list[str]) -> None:
    rule = LogRule(str(tree), "*.log", **limits)  # type: ignore[arg-type]
    before = _snapshot(tree.parent)
    planned = logclean.plan(rule, NOW)
    dry = logclean.run(rule, NOW, dry_run=True)
    assert _snapshot(tree.parent) == before  # a plan and a dry run change nothing
    assert _names(planned) == _names(dry) == gone
    assert planned.dry_run
    assert planned.considered == 5

    report = logclean.run(rule, NOW)
    assert not report.dry_run
    assert _names(report) == gone
    assert report.bytes_freed == sum(LOGS[n][1] for n in gone)
    assert report.kept == 5 - len(gone)
    assert report.open_check_complete
    assert _left(tree) == {*LOGS, "notes.txt"} - set(gone)
    assert (tree.parent / "outside" / "secret.log").exists()


def test_a_file_open_for_writing_survives(tree: Path) -> None:
    # A child process appends to d.log; the test itself holds e.log for writing and a.log read-only.
    with (tree / "d.log").open("ab") as out:
        writer = subprocess.Popen(["sleep", "30"], stdout=out)
    try:
        with (tree / "e.log").open("r+b"), (tree / "a.log").open("rb"):
            report = logclean.run(LogRule(str(tree), "*.log", keep_newest=0), NOW)
        assert _names(report) == ["a.log", "b.log", "c.log"]
        skipped = {Path(s.path).name: s.reason for s in report.skipped}
        assert skipped["d.log"] == f"open for writing by pid {writer.pid}"
        assert skipped["e.log"] == f"open for writing by pid {os.getpid()}"
        assert _left(tree) == {"d.log", "e.log", "notes.txt"}
    finally:
        writer.kill()
        writer.wait()


def test_symlinks_and_what_lies_outside_are_left_alone(tree: Path) -> None:
    outside = tree.parent / "outside"
    (tree / "secret.log").symlink_to(outside / "secret.log")
    (tree / "inner.log").symlink_to(tree / "a.log")
    (tree / "elsewhere").symlink_to(outside, target_is_directory=True)
    (tree / "old.log").mkdir()  # a directory matching the pattern
    os.utime(tree / "old.log", (NOW - 30 * DAY, NOW - 30 * DAY))
    before_outside = _snapshot(outside)

    for pattern in ("*.log", "*/*.log", "**/*.log"):
        report = logclean.run(LogRule(str(tree), pattern, keep_days=0), NOW)
        reasons = {Path(s.path).relative_to(tree).as_posix(): s.reason for s in report.skipped}
        if pattern == "*.log":
            assert "outside the directory" in reasons["secret.log"]
            assert "inside the directory" in reasons["inner.log"]
            assert "never deleted" in reasons["old.log"]
        if pattern == "*/*.log":
            assert "symlinked directory" in reasons["elsewhere/secret.log"]
        assert all(tree in Path(f.path).parents for f in report.deleted)

    assert _snapshot(outside) == before_outside
    assert (tree / "secret.log").is_symlink()
    assert (tree / "inner.log").is_symlink()
    assert (tree / "elsewhere").is_symlink()
    assert (tree / "old.log").is_dir()
    # keep_days=0 removes every regular log older than NOW; e.log was written at NOW exactly.
    assert {p.name for p in tree.iterdir() if p.is_file() and not p.is_symlink()} == {"e.log", "notes.txt"}


def test_bad_rules(tree: Path) -> None:
    with pytest.raises(ValueError, match=r"without '\.\.'"):
        logclean.plan(LogRule(str(tree), "../outside/*.log", keep_days=0), NOW)
    with pytest.raises(ValueError, match="relative"):
        logclean.plan(LogRule(str(tree), "/tmp/*.log", keep_days=0), NOW)
    with pytest.raises(ValueError, match="keep_newest must not be negative"):
        logclean.plan(LogRule(str(tree), keep_newest=-1), NOW)
    missing = logclean.run(LogRule(str(tree / "nope"), keep_days=0), NOW)
    assert missing.error is not None
    assert "cannot be read" in missing.error
    assert missing.deleted == ()


# ---- network --------------------------------------------------------------------------------------


@pytest.fixture
def listener() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_net_status_sees_loopback_and_measures_reachability(listener: int) -> None:
    closed = _closed_port()
    status = netstatus.net_status(
        interface="lo", targets=[Target("127.0.0.1", listener), Target("127.0.0.1", closed)], timeout=2.0
    )
    lo = next(i for i in status.interfaces if i.name == "lo")
    assert lo.is_up
    assert lo.mtu > 0
    assert "127.0.0.1" in {a.address for a in lo.addresses if a.family == "ipv4"}
    assert status.client is not None
    assert status.client.ip == "127.0.0.1"
    assert status.error is None

    up, down = status.reachability
    assert up.reachable
    assert up.rtt_ms is not None
    assert 0 < up.rtt_ms < 1000
    assert up.error is None
    assert not down.reachable
    assert down.rtt_ms is None
    assert down.error == "Connection refused"


def test_client_address_by_route_and_errors() -> None:
    route = netstatus.route_ip("127.0.0.1")
    assert route.ip == "127.0.0.1"
    assert route.interface == "lo"
    assert route.source == "route"
    with pytest.raises(ValueError, match="no network interface named 'no-such-if0'"):
        netstatus.interface_ip("no-such-if0")
    status = netstatus.net_status(targets=[Target("no-such-host.invalid", 80)], timeout=0.5)
    assert status.client is None
    assert status.error is not None
    assert not status.reachability[0].reachable
    assert "cannot resolve" in (status.reachability[0].error or "")


# ---- host figures ---------------------------------------------------------------------------------


def test_host_info_is_sane() -> None:
    info = hostinfo.host_info(cpu_interval=0.05)
    assert info.cpu_cores >= 1
    assert 0.0 <= info.cpu_percent <= 100.0
    assert info.memory_total > 0
    assert 0 < info.memory_available <= info.memory_total
    assert info.load1 >= 0
    assert info.uptime > 0
    assert info.boot_time < time.time()
    root = next(d for d in info.disks if d.mount == "/")
    assert root.total > 0
    assert root.used + root.free <= root.total


def test_log_cleanup_deletes_nothing_when_it_cannot_see_every_process() -> None:
    # As an unprivileged user the cleaner cannot read other users' /proc/<pid>/fd, so it cannot
    # know whether a file is held open for writing: it must delete nothing. A forked child drops
    # to such a user (no exec: the interpreter lives under /root, which that user cannot enter).
    import pwd

    from tests.harness.servers import PG_USER, _ensure_pg_user

    _ensure_pg_user()
    user = pwd.getpwnam(PG_USER)
    # pytest's own tmp dirs are private to root: this tree must be reachable by the user.
    base = Path(tempfile.mkdtemp(prefix="fleetmate-logclean-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        _check_cleanup_as(user, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _check_cleanup_as(user: Any, base: Path) -> None:
    tree = base / "logs"
    tree.mkdir()
    old = tree / "old.log"
    old.write_text("x" * 100)
    os.utime(old, (time.time() - 10 * DAY, time.time() - 10 * DAY))
    shutil.chown(tree, user.pw_name)
    shutil.chown(old, user.pw_name)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop privileges, clean, report, exit without running pytest's teardown
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            report = logclean.run(LogRule(directory=str(tree), pattern="*.log", keep_days=1), time.time())
            payload = [report.open_check_complete, len(report.deleted), [s.reason for s in report.skipped]]
            os.write(write_end, json.dumps(payload).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        out = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    complete, deleted, reasons = json.loads(out)
    assert complete is False
    assert deleted == 0
    assert any("could not see every process" in r for r in reasons)
    assert old.exists()
