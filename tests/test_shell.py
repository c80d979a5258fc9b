"""`fleetmate shell` as a real process against one real server: scripts, errors, sessions, watch, fail-over."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import select
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document

from app.cli.shell_client import RegistryClient
from app.cli.shell_commands import SPECS
from app.cli.shell_complete import ShellCompleter
from app.cli.shell_node_commands import java_date
from app.cli.shell_paths import InvalidPath, path_problem, resolve
from app.cli.shell_syntax import UsageError, parse, split_commands
from tests.harness import ROOT, Fleetmate, running, wait_for

TOKEN = "shell-admin-token-1"
ZKCLI = Path("/usr/share/zookeeper/bin/zkCli.sh")
DEAD = "http://127.0.0.1:1"  # nothing listens on port 1


@pytest.fixture(scope="module")
def fm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleetmate]:
    """One server for the module: an admin token (every call sends the Bearer header), short sessions allowed."""
    workdir = tmp_path_factory.mktemp("shell")
    env = {"FLEETMATE_AUTH_TOKENS": f"admin:{TOKEN}", "FLEETMATE_REGISTRY_SESSION_TIMEOUT_MIN_MS": "500"}
    with running(Fleetmate(workdir, env=env)) as server:
        yield server


@pytest.fixture(scope="module")
def api(fm: Fleetmate) -> Iterator[httpx.Client]:
    """A REST client to check what the shell did."""
    with httpx.Client(base_url=fm.url + "/api/v1", headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client


def _env(token: str | None = TOKEN, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETMATE_")}
    if token:
        env["FLEETMATE_TOKEN"] = token
    env.update(extra)
    return env


def _cmd(addr: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "app", "shell", "--addr", addr, *args]


def shell(
    fm: Fleetmate, *args: str, stdin: str | None = None, token: str | None = TOKEN, addr: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the shell to completion; the token comes from FLEETMATE_TOKEN unless None."""
    return subprocess.run(
        _cmd(addr or fm.url, *args),
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=_env(token),
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def exists(api: httpx.Client, path: str) -> bool:
    response = api.get(f"/registry/stat{path}")
    assert response.status_code in (200, 404), response.text
    return response.status_code == 200


def data_of(api: httpx.Client, path: str) -> Any:
    response = api.get(f"/registry/nodes{path}")
    assert response.status_code == 200, response.text
    return response.json()["data"]


class Lines:
    """A process's stdout lines, read by a thread so a test can wait for them with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.queue: queue.Queue[str] = queue.Queue()
        assert proc.stdout
        stream = proc.stdout

        def pump() -> None:
            for line in stream:
                self.queue.put(line.rstrip("\n"))

        threading.Thread(target=pump, daemon=True).start()

    def next(self, timeout: float = 10) -> str:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout}s") from None


# ---- pure parts ---------------------------------------------------------------------------------


def test_paths_resolve_against_the_working_node() -> None:
    assert resolve("/", "a") == "/a"
    assert resolve("/a/b", "c/d") == "/a/b/c/d"
    assert resolve("/a/b", "..") == "/a"
    assert resolve("/a/b", "../../..") == "/"
    assert resolve("/a/b", "./c/./../d") == "/a/b/d"
    assert resolve("/a", ".") == "/a"
    assert resolve("/a", "/x/y") == "/x/y"
    assert resolve("/a", "b/", directory=True) == "/a/b"  # cd after tab completion
    assert resolve("/a", "/b/", directory=True) == "/b"
    assert resolve("/a", "/", directory=True) == "/"
    assert resolve("/a", "/a/seq-/", sequential=True) == "/a/seq-/"  # the server appends the counter
    assert resolve("/a", "b/", sequential=True) == "/a/b/"


# Each refusal as zkCli prints it (Debian's zookeeper 3.8 zkCli.sh, checked by hand and in
# test_invalid_paths_are_refused_as_zkcli_refuses_them below).
ZK_REFUSALS = [
    ("/a//b", 'Invalid path string "/a//b" caused by empty node name specified @3'),
    ("/a/", "Path must not end with / character"),
    ("/a/./b", 'Invalid path string "/a/./b" caused by relative paths not allowed @3'),
    ("/a/../b", 'Invalid path string "/a/../b" caused by relative paths not allowed @4'),
    ("/a/..", 'Invalid path string "/a/.." caused by relative paths not allowed @4'),
    ("/a/b\x01c", 'Invalid path string "/a/b\x01c" caused by invalid character @4'),
    ("/a\x00", 'Invalid path string "/a\x00" caused by null character not allowed @2'),
    ("/a\x7f", 'Invalid path string "/a\x7f" caused by invalid character @2'),
    ("//", "Path must not end with / character"),
]


@pytest.mark.parametrize(("path", "message"), ZK_REFUSALS)
def test_paths_zookeeper_refuses_are_refused_with_its_message(path: str, message: str) -> None:
    assert path_problem(path) == message
    with pytest.raises(InvalidPath) as err:
        resolve("/", path)
    assert (err.value.code, err.value.message) == ("BadArguments", message)


def test_relative_paths_are_checked_as_typed_after_the_working_node() -> None:
    for arg, message in [
        ("a//b", 'Invalid path string "/w/a//b" caused by empty node name specified @5'),
        ("a/", "Path must not end with / character"),
        ("../a//..", 'Invalid path string "/w/../a//.." caused by empty node name specified @8'),
        ("a\tb", 'Invalid path string "/w/a\tb" caused by invalid character @4'),
        ("", "Path length must be > 0"),
    ]:
        with pytest.raises(InvalidPath) as err:
            resolve("/w", arg)
        assert err.value.message == message, arg
    # Names that merely contain dots are names; a character beyond U+FFFF counts as two, as in Java.
    assert resolve("/", "/a/.../..b/.c") == "/a/.../..b/.c"
    emoji = "/\U0001f600//x"
    assert path_problem(emoji) == f'Invalid path string "{emoji}" caused by empty node name specified @4'


def test_times_print_as_java_prints_a_date(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        assert java_date(1796647426123) == "Mon Dec 07 12:43:46 UTC 2026"
        assert java_date(0) == "Thu Jan 01 00:00:00 UTC 1970"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_lines_split_at_semicolons_outside_quotes() -> None:
    assert split_commands("ls /; get /a ;; pwd") == ["ls /", "get /a", "pwd"]
    assert split_commands("put /a \"x;y\"; put /b 'p;q'; put /c x\\;y") == [
        'put /a "x;y"',
        "put /b 'p;q'",
        "put /c x\\;y",
    ]


def test_arguments_parse_like_zkcli() -> None:
    args = parse("set", SPECS["set"], ["-v", "3", "/a", "-v", "value with", "words"])
    assert (args.valued, args.paths, args.value) == ({"v": "3"}, ["/a"], "-v value with words")
    args = parse("create", SPECS["create"], ["-es", "/a"])
    assert (args.flags, args.value) == ({"e", "s"}, None)
    args = parse("delete", SPECS["delete"], ["/a", "-rv7"])
    assert (args.flags, args.valued) == ({"r"}, {"v": "7"})
    assert parse("get", SPECS["get"], ["-h"]).help
    for name, tokens in [("get", []), ("ls", ["-x"]), ("put", ["/a"]), ("stat", ["/a", "/b"]), ("set", ["-v"])]:
        with pytest.raises(UsageError):
            parse(name, SPECS[name], tokens)


# ---- scripts --------------------------------------------------------------------------------------


def test_commands_print_their_results(fm: Fleetmate, api: httpx.Client) -> None:
    result = shell(
        fm,
        "-c",
        "put /out/a/b hello world; get /out/a/b; put /out/a/b 'x;  y'; get /out/a/b; create /out/c data;"
        " create -s /out/seq- v; create -s /out/seq- v; ls /out; get /out/c; pwd",
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.splitlines() == [
        "hello world",
        "x;  y",
        "/out/c",
        "/out/seq-0000000002",
        "/out/seq-0000000003",
        "a",
        "c",
        "seq-0000000002",
        "seq-0000000003",
        "data",
        "/",
    ]
    # put made the missing parent /out/a, and set the node the second time.
    assert exists(api, "/out/a")
    assert data_of(api, "/out/a/b") == "x;  y"
    assert api.get("/registry/stat/out/a/b").json()["stat"]["version"] == 1


def test_stat_prints_zkclis_fields(fm: Fleetmate, api: httpx.Client) -> None:
    assert api.post("/registry/nodes/st/n", json={"data": "12345", "parents": True}).status_code == 201
    api.put("/registry/nodes/st/n", json={"data": "abc"})
    result = shell(fm, "-c", "stat /st/n")
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(" = ", 1) for line in result.stdout.splitlines())
    stat = api.get("/registry/stat/st/n").json()["stat"]
    assert list(fields) == [
        "cZxid",
        "ctime",
        "mZxid",
        "mtime",
        "pZxid",
        "cversion",
        "dataVersion",
        "aclVersion",
        "ephemeralOwner",
        "dataLength",
        "numChildren",
    ]
    assert fields["cZxid"] == hex(stat["czxid"])
    assert fields["mZxid"] == hex(stat["mzxid"])
    assert fields["pZxid"] == hex(stat["pzxid"])
    assert fields["ctime"] == java_date(stat["ctime"])
    assert fields["mtime"] == java_date(stat["mtime"])
    assert re.fullmatch(r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun) \w{3} \d\d \d\d:\d\d:\d\d \S+ 20\d\d", fields["mtime"])
    assert (fields["dataVersion"], fields["aclVersion"], fields["cversion"]) == ("1", "0", "0")
    assert (fields["ephemeralOwner"], fields["dataLength"], fields["numChildren"]) == ("0x0", "3", "0")


def test_stat_and_path_refusals_read_as_zkclis(fm: Fleetmate, api: httpx.Client) -> None:
    """The same commands through ZooKeeper's own zkCli.sh (on the ZooKeeper port) and the shell (REST)."""
    assert ZKCLI.exists(), f"{ZKCLI} is missing: `make test-deps` installs Debian's zookeeper"
    api.post("/registry/nodes/zkstat/n", json={"data": "abc", "parents": True})
    api.post("/registry/nodes/zkstat/n/child", json={"data": ""})
    api.put("/registry/nodes/zkstat/n", json={"data": "abcd"})
    bad = ["/zkstat//n", "/zkstat/n/", "/zkstat/./n", "/zkstat/n/../n", "/zkstat/n\x01x"]
    commands = ["stat /zkstat/n", *(f"get {path}" for path in bad)]
    env = {**os.environ, "TZ": "America/New_York"}  # a zone that is not UTC: both print local time
    zk = subprocess.run(
        ["bash", str(ZKCLI), "-server", fm.zk],
        input="".join(f"{c}\n" for c in (*commands, "quit")),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    theirs = [
        line
        for line in (zk.stdout + zk.stderr).splitlines()
        if " = " in line or line.startswith(("Invalid path", "Path must"))
    ]
    ours = subprocess.run(
        _cmd(fm.url, "-c", "; ".join(commands)),
        capture_output=True,
        text=True,
        env={**_env(), "TZ": "America/New_York"},
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert ours.returncode == 2
    assert ours.stdout.splitlines() == theirs[:11]
    assert ours.stderr.splitlines() == [f"Error: BadArguments: {line}" for line in theirs[11:]]
    assert len(theirs) == 11 + len(bad)


def test_paths_zookeeper_refuses_are_never_folded_into_another_node(fm: Fleetmate, api: httpx.Client) -> None:
    result = shell(fm, "-c", "put /fold//b x; put /fold/ x; create /fold/./b x; create -e /fold/../b; set /f\x02 x")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        'Error: BadArguments: Invalid path string "/fold//b" caused by empty node name specified @6',
        "Error: BadArguments: Path must not end with / character",
        'Error: BadArguments: Invalid path string "/fold/./b" caused by relative paths not allowed @6',
        'Error: BadArguments: Invalid path string "/fold/../b" caused by relative paths not allowed @7',
        'Error: BadArguments: Invalid path string "/f\x02" caused by invalid character @2',
    ]
    assert not exists(api, "/fold")
    assert not exists(api, "/b")
    # The shell's own navigation still works: relative '.' and '..', and cd to a completed 'name/'.
    result = shell(fm, "-c", "put /fold/a/b 1; cd /fold/a/; pwd; get ./b; cd ..; get a/../a/b; cd a/; pwd")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["/fold/a", "1", "1", "/fold/a"]
    # A sequential node's path may end with '/': the server appends the counter (ZooKeeper checks path + "1").
    result = shell(fm, "-c", "create -s /fold/ x; create /fold/ x")
    assert result.returncode == 2
    assert result.stdout.startswith("/fold/00000000")
    assert result.stderr == "Error: BadArguments: Path must not end with / character\n"


def test_deleteall_and_rmr_delete_a_tree(fm: Fleetmate, api: httpx.Client) -> None:
    result = shell(
        fm, "-c", "put /da/a/b 1; put /rm/a/b 2; deleteall /da; rmr /rm; deleteall -b 100 /da; deleteall -b x /rm"
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "Error: NoNode: no node /da",
        "Error: BadArguments: deleteall: -b needs a positive batch size, not 'x'",
        "usage: deleteall [-b batch] path",
    ]
    assert not exists(api, "/da")
    assert not exists(api, "/rm")


def test_errors_go_to_stderr_and_exit_1(fm: Fleetmate) -> None:
    result = shell(fm, "-c", "get /nope/x; put /err x; create /err y; delete /; get /err")
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["x"]  # the commands after a failure still run
    errors = result.stderr.splitlines()
    assert errors[0] == "Error: NoNode: no node /nope/x"
    assert errors[1] == "Error: NodeExists: /err already exists"
    assert errors[2].startswith("Error: BadArguments: ")
    assert len(errors) == 3


def test_bad_arguments_exit_2(fm: Fleetmate) -> None:
    for args in (["--timeout-ms", "x"], ["--no-such-flag"], ["-c"]):
        result = shell(fm, *args)
        assert result.returncode == 2, args
        assert "usage: fleetmate" in result.stderr
    result = shell(fm, "-c", "ls /", addr="ftp://host")
    assert result.returncode == 2
    assert "--addr" in result.stderr
    assert shell(fm, "--timeout-ms", "0", "-c", "ls /").returncode == 2

    # A command the shell itself rejects is an argument error too (and the others still run).
    result = shell(fm, "-c", "frobnicate /; set -v x /a b; get; pwd")
    assert result.returncode == 2
    assert result.stdout == "/\n"
    assert result.stderr.splitlines() == [
        "Error: BadArguments: unknown command 'frobnicate' (help lists them)",
        "Error: BadArguments: set: -v needs an integer version, not 'x'",
        "usage: set [-v version] path value",
        "Error: BadArguments: get: a path is needed",
        "usage: get path",
    ]


def test_help_and_command_usage(fm: Fleetmate) -> None:
    result = shell(fm, "-c", "help; create -h; help delete")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for name in ("ls", "cd", "pwd", "put", "create", "get", "set", "stat", "delete", "watch", "help", "exit"):
        assert f"\n  {name}" in out, name
    assert "usage: create [-e] [-s] path [value]\n" in out
    assert "-e  ephemeral" in out
    assert "usage: delete [-v version] [-r] path\n" in out


def test_stdin_script_with_cd_relative_paths_and_recursion(fm: Fleetmate, api: httpx.Client) -> None:
    script = """
# a comment, then blank lines

put /tree/a/x 1
put /tree/a/y 2
put /tree/b/z/deep 3
cd /tree
pwd
ls
cd a
get x
get ../b/z/deep
cd ..
pwd
cd ./b/./z
pwd
ls -r /tree
cd /no/such
pwd
cd ../..
delete -r b
ls -r
exit
put /tree/after-exit 1
"""
    result = shell(fm, stdin=script)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["Error: NoNode: no node /no/such"]
    assert result.stdout.splitlines() == [
        "/tree",
        "a",
        "b",
        "1",
        "3",
        "/tree",
        "/tree/b/z",
        "/tree/a",
        "/tree/a/x",
        "/tree/a/y",
        "/tree/b",
        "/tree/b/z",
        "/tree/b/z/deep",
        "/tree/b/z",  # a failed cd keeps the working node
        "/tree/a",  # ls -r after cd ../.. and delete -r b
        "/tree/a/x",
        "/tree/a/y",
    ]
    assert not exists(api, "/tree/b")
    assert not exists(api, "/tree/after-exit")


def test_set_with_a_wrong_version_changes_nothing(fm: Fleetmate, api: httpx.Client) -> None:
    result = shell(fm, "-c", "put /ver v0; set /ver v1; set -v 5 /ver v2; set -v 1 /ver v3; get /ver")
    assert result.returncode == 1
    assert result.stderr == "Error: BadVersion: /ver is at version 1, not 5\n"
    assert result.stdout == "v3\n"
    assert api.get("/registry/stat/ver").json()["stat"]["version"] == 2

    result = shell(fm, "-c", "set -v 0 /ver nope; delete -v 0 /ver")
    assert result.returncode == 1
    assert [e.split(":")[1].strip() for e in result.stderr.splitlines()] == ["BadVersion", "BadVersion"]
    assert data_of(api, "/ver") == "v3"
    assert shell(fm, "-c", "delete -v 2 /ver").returncode == 0
    assert not exists(api, "/ver")


def test_delete_refuses_a_parent_unless_recursive(fm: Fleetmate, api: httpx.Client) -> None:
    shell(fm, "-c", "put /del/a/b 1; put /del/c 2")
    result = shell(fm, "-c", "delete /del")
    assert result.returncode == 1
    assert result.stderr.startswith("Error: NotEmpty: ")
    assert exists(api, "/del/a/b")
    assert shell(fm, "-c", "delete -r /del").returncode == 0
    assert not exists(api, "/del")


# ---- sessions -------------------------------------------------------------------------------------


def test_ephemeral_nodes_go_when_the_shell_exits(fm: Fleetmate, api: httpx.Client) -> None:
    # -c: the session is closed when the commands are done.
    api.post("/registry/nodes/eph", json={})
    result = shell(fm, "-c", "create -e /eph/c data; create -e -s /eph/s-; ls /eph")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["/eph/c", "/eph/s-0000000001", "c", "s-0000000001"]
    assert api.get("/registry/children/eph").json()["children"] == []

    # stdin: the nodes live while the shell does, and go on `exit` and on end of input.
    for ending in ("exit\n", None):
        proc = subprocess.Popen(
            _cmd(fm.url),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=ROOT,
        )
        try:
            assert proc.stdin
            lines = Lines(proc)
            proc.stdin.write("create -e /eph/live\n")
            proc.stdin.flush()
            assert lines.next() == "/eph/live"
            owner = api.get("/registry/stat/eph/live").json()["stat"]["ephemeralOwner"]
            assert owner != 0
            session = api.get(f"/sessions/{owner}").json()
            assert session["ephemerals"] == ["/eph/live"]
            if ending:
                proc.stdin.write(ending)
                proc.stdin.flush()
            else:
                proc.stdin.close()
            assert proc.wait(10) == 0
            assert not exists(api, "/eph/live")
            assert api.get(f"/sessions/{owner}").status_code == 404
        finally:
            proc.kill()
            proc.wait()


def test_the_session_is_kept_alive(fm: Fleetmate, api: httpx.Client) -> None:
    proc = subprocess.Popen(
        _cmd(fm.url, "--timeout-ms", "1500"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=ROOT,
    )
    try:
        assert proc.stdin
        lines = Lines(proc)
        proc.stdin.write("create -e /kept\n")
        proc.stdin.flush()
        assert lines.next() == "/kept"
        owner = api.get("/registry/stat/kept").json()["stat"]["ephemeralOwner"]
        timeout_ms = api.get(f"/sessions/{owner}").json()["timeout_ms"]
        assert timeout_ms == 1500
        time.sleep(timeout_ms / 1000 * 2.5)  # several timeouts: only keepalives can have kept it
        assert exists(api, "/kept")
        proc.stdin.close()
        assert proc.wait(10) == 0
        assert not exists(api, "/kept")
    finally:
        proc.kill()
        proc.wait()


# ---- watch ---------------------------------------------------------------------------------------


def test_watch_prints_events_as_they_happen(fm: Fleetmate, api: httpx.Client) -> None:
    api.post("/registry/nodes/w", json={})
    proc = subprocess.Popen(
        _cmd(fm.url, "-c", "watch -r /w"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=ROOT,
    )
    try:
        lines = Lines(proc)
        # Changes made before the watch is registered are not seen: poke until the first event shows.
        api.post("/registry/nodes/w/probe", json={})

        def seen() -> str | None:
            api.put("/registry/nodes/w/probe", json={"data": "again"})
            with contextlib.suppress(AssertionError):
                return lines.next(timeout=0.2)
            return None

        first = wait_for(seen, 20, "the first watch event")
        assert first.startswith("changed /w/probe revision=")
        api.delete("/registry/nodes/w/probe")
        while (line := lines.next()).startswith("changed /w/probe"):
            pass
        assert line.startswith("deleted /w/probe revision=")

        created = api.post("/registry/nodes/w/a", json={"data": "1"}).json()["stat"]["czxid"]
        changed = api.put("/registry/nodes/w/a", json={"data": "2"}).json()["stat"]["mzxid"]
        api.post("/registry/nodes/elsewhere", json={})
        deleted = api.delete("/registry/nodes/w/a")
        assert deleted.status_code == 200
        expected = [f"created /w/a revision={created}", f"changed /w/a revision={changed}"]
        got = [lines.next(), lines.next(), lines.next()]
        assert got[:2] == expected
        assert got[2].startswith("deleted /w/a revision=")
        assert int(got[2].rsplit("=", 1)[1]) > changed
        assert proc.poll() is None
    finally:
        proc.terminate()
        code = proc.wait(10)
    assert code == 128 + signal.SIGTERM
    assert proc.stderr
    assert proc.stderr.read() == ""


def test_watch_of_a_bad_path_fails(fm: Fleetmate) -> None:
    result = shell(fm, "-c", "watch /bad\x01name")
    assert result.returncode == 2
    assert result.stderr == 'Error: BadArguments: Invalid path string "/bad\x01name" caused by invalid character @4\n'
    result = shell(fm, "-c", "watch /" + "x" * 5000)  # valid to ZooKeeper's rules, too long for the server
    assert result.returncode == 1
    assert result.stderr.startswith("Error: BadArguments: ")


# ---- mate-cli --------------------------------------------------------------------------------------


def mate_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """mate-cli as its console script runs it: app.cli.mate:main (what [project.scripts] names)."""
    return subprocess.run(
        [sys.executable, "-c", "import sys; from app.cli.mate import main; sys.exit(main())", *args],
        capture_output=True,
        text=True,
        env=_env(token=None),
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def test_mate_cli_is_a_console_script() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["mate-cli"] == "app.cli.mate:main"
    assert scripts["fleetmate"] == "app.cli.main:main"


def test_mate_cli_takes_mates_address_flag(fm: Fleetmate, api: httpx.Client) -> None:
    hostport = fm.url.removeprefix("http://")
    result = mate_cli("-mate-addr", hostport, "-token", TOKEN, "-c", "put /mate/a 1; get /mate/a; stat /mate/a")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:2] == [
        "1",
        "cZxid = " + hex(api.get("/registry/stat/mate/a").json()["stat"]["czxid"]),
    ]
    for flags in (["-mate-addr=" + hostport], ["--mate-addr", hostport], ["--mate-addr=" + hostport]):
        result = mate_cli(*flags, "--token=" + TOKEN, "get", "/mate/a")  # one command after the flags
        assert (result.returncode, result.stdout, result.stderr) == (0, "1\n", ""), flags
    result = mate_cli("-mate-addr", hostport, "-token", TOKEN, "deleteall", "/mate")
    assert result.returncode == 0, result.stderr
    assert not exists(api, "/mate")
    result = mate_cli("-mate-addr", "ftp://x", "ls", "/")
    assert result.returncode == 2
    assert result.stderr.startswith("mate-cli: error: -mate-addr: ")
    installed = Path(sys.executable).parent / "mate-cli"
    if installed.exists():  # the installed script itself, when the package was installed with it
        result = subprocess.run(
            [str(installed), "-mate-addr", hostport, "-token", TOKEN, "ls", "/"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr


def test_one_command_after_the_options_as_zkcli_takes_it(fm: Fleetmate) -> None:
    result = shell(fm, "put", "/one/a", "x;y")  # the words are one command: ';' is data here
    assert result.returncode == 0, result.stderr
    assert shell(fm, "get", "/one/a").stdout == "x;y\n"
    result = shell(fm, "-c", "ls /", "get", "/one/a")
    assert result.returncode == 2
    assert "not both" in result.stderr


# ---- addresses and tokens ------------------------------------------------------------------------


def test_a_dead_address_is_skipped(fm: Fleetmate, api: httpx.Client) -> None:
    result = shell(fm, "-c", "put /fo/x 1; get /fo/x; create -e /fo/e; ls /fo", addr=f"{DEAD},{fm.url}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["1", "/fo/e", "e", "x"]
    assert not exists(api, "/fo/e")

    result = shell(fm, "-c", "get /fo/x", addr=f"{DEAD},http://127.0.0.1:2")
    assert result.returncode == 1
    assert result.stderr.startswith(
        "Error: ConnectionLoss: no address answers (http://127.0.0.1:1, http://127.0.0.1:2)"
    )


def test_a_dead_address_is_skipped_by_watch(fm: Fleetmate, api: httpx.Client) -> None:
    proc = subprocess.Popen(
        _cmd(f"{DEAD},{fm.url}", "-c", "watch /fw"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=ROOT,
    )
    try:
        lines = Lines(proc)
        toggle = iter(range(1000))

        def seen() -> str | None:
            if next(toggle) % 2:
                api.delete("/registry/nodes/fw")
            else:
                api.post("/registry/nodes/fw", json={})
            with contextlib.suppress(AssertionError):
                return lines.next(timeout=0.2)
            return None

        assert wait_for(seen, 20, "a watch event").split()[1] == "/fw"
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_token_comes_from_the_flag_or_the_environment(fm: Fleetmate) -> None:
    result = shell(fm, "-c", "ls /", token=None)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: unauthorized: ")
    # The server refuses the WebSocket handshake with a bare 403 (no JSON body), whatever the token problem.
    for token in (None, "wrong"):
        result = shell(fm, "-c", "watch /", token=token)
        assert result.returncode == 1
        assert result.stderr.startswith(("Error: unauthorized: ", "Error: forbidden: ")), result.stderr
        assert "token" in result.stderr
    assert shell(fm, "--token", TOKEN, "-c", "ls /", token=None).returncode == 0
    assert shell(fm, "--token", "wrong", "-c", "ls /").returncode == 1


def test_the_address_comes_from_the_environment(fm: Fleetmate) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app", "shell", "-c", "pwd; ls /"],
        capture_output=True,
        text=True,
        env=_env(FLEETMATE_ADDR=fm.url),
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("/\n")


# ---- completion and the terminal -----------------------------------------------------------------


async def _complete(completer: ShellCompleter, text: str) -> list[str]:
    event = CompleteEvent(completion_requested=True)
    found = []
    async for completion in completer.get_completions_async(Document(text), event):
        assert completion.start_position <= 0
        found.append(text[: len(text) + completion.start_position] + completion.text)
    return found


async def test_tab_completes_commands_and_paths(fm: Fleetmate) -> None:
    cwd = "/"
    client = RegistryClient([DEAD, fm.url], TOKEN)
    completer = ShellCompleter(client, lambda: cwd)
    try:
        for path in ("/comp/alpha/x", "/comp/alpine", "/comp/beta"):
            await client.create(path, "", parents=True)
        assert await _complete(completer, "") == list(SPECS)
        assert await _complete(completer, "s") == ["set", "stat", "sync"]
        assert await _complete(completer, "help de") == ["help delete", "help deleteall"]
        assert await _complete(completer, "get /comp/al") == ["get /comp/alpha/", "get /comp/alpine"]
        assert await _complete(completer, "ls -r /comp/alpha/") == ["ls -r /comp/alpha/x"]
        assert await _complete(completer, "set -v 3 /comp/b") == ["set -v 3 /comp/beta"]
        assert await _complete(completer, "put /comp/beta /comp/") == []  # the value is not a path
        assert await _complete(completer, "get /no/such/") == []
        assert await _complete(completer, "pwd ") == []
        assert await _complete(completer, "get com") == ["get comp/"]
        cwd = "/comp"
        assert await _complete(completer, "stat ") == ["stat alpha/", "stat alpine", "stat beta"]
        assert await _complete(completer, "cd a") == ["cd alpha/", "cd alpine"]
        assert await _complete(completer, "cd ../comp/b") == ["cd ../comp/beta"]
        # The synchronous entry point offers command names only.
        sync = completer.get_completions(Document("wa"), CompleteEvent(completion_requested=True))
        assert [c.text for c in sync] == ["watch"]
    finally:
        await client.aclose()


class Terminal:
    """The master side of a pseudo-terminal: expect() consumes output up to and including a needle."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def expect(self, needle: str, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while (at := self.buf.find(needle.encode())) < 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {needle!r} on the terminal; got {self.buf!r}")
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                try:
                    self.buf += os.read(self.fd, 4096)
                except OSError:
                    continue
        seen, self.buf = self.buf[: at + len(needle)], self.buf[at + len(needle) :]
        return seen.decode("utf-8", "replace")


@pytest.mark.skipif(sys.platform != "linux", reason="drives a Linux pseudo-terminal")
def test_interactive_prompt_completion_and_ctrl_c(fm: Fleetmate, api: httpx.Client, tmp_path: Path) -> None:
    import fcntl
    import pty
    import termios

    api.post("/registry/nodes/tty/node-one", json={"data": "hello", "parents": True})
    master, slave = pty.openpty()

    def own_terminal() -> None:  # the pty becomes the controlling terminal, so ^C sends SIGINT
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        _cmd(fm.url),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=_env(HOME=str(tmp_path), TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1"),
        cwd=ROOT,
        preexec_fn=own_terminal,  # noqa: PLW1509
    )
    os.close(slave)
    term = Terminal(master)
    try:
        term.expect("fleetmate[/]>")
        term.send("cd tty\r")
        term.expect("fleetmate[/tty]>")
        term.send("get node-o\t")
        term.expect("ne")  # Tab completed the name
        term.send("\r")
        term.expect("hello")
        term.send("watch node-one\r")
        term.expect("Ctrl-C stops")
        revision = api.put("/registry/nodes/tty/node-one", json={"data": "2"}).json()["stat"]["mzxid"]
        term.expect(f"changed /tty/node-one revision={revision}")
        term.send("\x03")  # Ctrl-C ends the watch, not the shell
        term.expect("fleetmate[/tty]>")
        term.send("create -e eph\r")
        term.expect("/tty/eph")
        assert exists(api, "/tty/eph")
        term.send("exit\r")
        assert proc.wait(10) == 0
        assert not exists(api, "/tty/eph")
        history = (tmp_path / ".fleetmate_history").read_text()
        assert "+get node-one" in history
        assert "+exit" in history
    finally:
        proc.kill()
        proc.wait()
        os.close(master)


def test_lock_and_election_from_the_shell(fm: Fleetmate, api: httpx.Client) -> None:
    # One shell takes the lock and joins the election in one session...
    first = shell(fm, "-c", "lock /shlock/db one; elect /shelect alpha; leader /shelect")
    assert first.returncode == 0, first.stderr
    node, elected, leader = first.stdout.split()
    assert node.startswith("/shlock/db/lock-")
    assert (elected, leader) == ("elected", "alpha")
    # ...and its session closed on exit: both recipes are free again.
    assert api.get("/registry/children/shlock/db").json()["children"] == []
    # A second lock on the same path waits for the first, even in the same session.
    both = shell(fm, "-c", "lock /shlock/db two; lock -w 200 /shlock/db three")
    assert both.returncode == 1
    assert "LockTimeout" in both.stderr
    ok = shell(fm, "-c", "lock /shlock/x; unlock /shlock/x/lock-0000000000; leader /nobody")
    assert ok.returncode == 1
    assert ok.stdout.strip() == "/shlock/x/lock-0000000000"
    assert "Error: NoNode: no node /nobody" in ok.stderr
    assert shell(fm, "-c", "lock -w soon /x").returncode == 2


def test_sync_prints_the_revision(fm: Fleetmate, api: httpx.Client) -> None:
    result = shell(fm, "-c", "put /synced 1; sync")
    assert result.returncode == 0, result.stderr
    revision = int(result.stdout.split()[-1])
    assert revision >= api.get("/registry/stat/synced").json()["stat"]["mzxid"]


def test_output_into_a_closed_pipe_ends_the_shell_quietly(fm: Fleetmate, api: httpx.Client) -> None:
    read, write = os.pipe()
    os.close(read)  # as `fleetmate shell -c '...' | head -1` once head has gone
    try:
        result = subprocess.run(
            _cmd(fm.url, "-c", "create -e /piped x; ls /; put /after-pipe 1"),
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=ROOT,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (141, "")
    assert not exists(api, "/piped")  # the session was closed on the way out
    assert not exists(api, "/after-pipe")  # and nothing after the failed output ran
