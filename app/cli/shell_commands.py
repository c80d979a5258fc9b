"""The shell's commands: line splitting, argument parsing, paths relative to the working node, output."""

from __future__ import annotations

import enum
import shlex
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TextIO

import msgspec

from app.cli.audit import table
from app.cli.shell_client import RegistryClient, Session, ShellError, WatchMessage
from app.cli.shell_paths import InvalidPath, join, resolve
from app.services.registry.messages import Stat
from app.web.routes.audit_models import MAX_LIMIT


class Status(enum.IntEnum):
    """A command's outcome, also the script's exit code (the worst one wins)."""

    OK = 0
    FAILED = 1
    USAGE = 2


class UsageError(ShellError):
    """A command line the shell itself rejects (reported as BadArguments, exit code 2)."""

    def __init__(self, message: str) -> None:
        super().__init__("BadArguments", message)


@dataclass(frozen=True)
class Spec:
    """A command's syntax: boolean flags, flags with a value, positional paths, and a trailing value."""

    usage: str
    summary: str
    options: tuple[str, ...] = ()  # lines describing the flags, for `CMD -h`
    flags: str = ""  # boolean one-letter flags
    valued: str = ""  # one-letter flags that take a value
    paths: tuple[int, int] = (1, 1)  # min and max positional paths
    value: str = ""  # "required" or "optional": the rest of the line after the path


SPECS: dict[str, Spec] = {
    "ls": Spec("ls [-r] [path]", "list a node's children", ("-r  every descendant path",), "r", paths=(0, 1)),
    "cd": Spec("cd [path]", "change the working node (default /)", paths=(0, 1)),
    "pwd": Spec("pwd", "print the working node", paths=(0, 0)),
    "put": Spec("put path value", "create or set a node, creating missing parents", value="required"),
    "create": Spec(
        "create [-e] [-s] path [value]",
        "create a node and print its path",
        ("-e  ephemeral: deleted when this shell exits", "-s  sequential: a 10-digit counter is appended"),
        "es",
        value="optional",
    ),
    "get": Spec("get path", "print a node's data"),
    "set": Spec(
        "set [-v version] path value",
        "replace a node's data",
        ("-v  only if the node is at this version",),
        valued="v",
        value="required",
    ),
    "stat": Spec("stat path", "print a node's stat"),
    "delete": Spec(
        "delete [-v version] [-r] path",
        "delete a node",
        ("-v  only if the node is at this version", "-r  with all its descendants"),
        "r",
        "v",
    ),
    "deleteall": Spec(
        "deleteall [-b batch] path",
        "delete a node with all its descendants (zkCli's name for delete -r)",
        ("-b  accepted for zkCli scripts and ignored: the server deletes the tree in one step",),
        valued="b",
    ),
    "rmr": Spec("rmr path", "delete a node with all its descendants (zkCli's old name for deleteall)"),
    "watch": Spec(
        "watch [-r] path",
        "print changes as they happen, until Ctrl-C",
        ("-r  the node and all its descendants",),
        "r",
    ),
    "lock": Spec(
        "lock [-w wait_ms] path [owner]",
        "take a lock, held by this shell's session until unlock or exit; prints the lock node",
        ("-w  wait this long for the holder to let go (default 0: try once)",),
        valued="w",
        value="optional",
    ),
    "unlock": Spec("unlock node", "release a lock taken with lock (give the node it printed)"),
    "elect": Spec(
        "elect [-w wait_ms] path candidate",
        "join an election as candidate for this shell's session; prints elected or who leads",
        ("-w  wait this long to be elected (default 0: join and return)",),
        valued="w",
        value="required",
    ),
    "leader": Spec("leader path", "print the candidate that leads the election at path"),
    "audit": Spec(
        "audit [-t trace_id] [-s ha|node] [-n subject] [-l limit]",
        "recorded decisions (HA steps, node state changes), newest first, with their trace ids",
        (
            "-t  only the decisions of this trace (32 hex digits)",
            "-s  only this source: ha or node",
            "-n  only this cluster name or node id",
            "-l  at most this many (1..1000, default 20)",
        ),
        valued="tsnl",
        paths=(0, 0),
    ),
    "sync": Spec(
        "sync",
        "wait until this server has applied every write made before, anywhere; print the revision",
        paths=(0, 0),
    ),
    "help": Spec("help [command]", "list commands, or describe one", paths=(0, 1)),
    "exit": Spec("exit", "close the session and leave", paths=(0, 0)),
    "quit": Spec("quit", "close the session and leave", paths=(0, 0)),
}

AUDIT_FLAGS = {"t": "trace_id", "s": "source", "n": "subject", "l": "limit"}  # audit's flags: query parameters
AUDIT_LIMIT = 20  # a screenful

# zkCli's stat lines in zkCli's order, each with the REST API's name of the field.
STAT_FIELDS = (
    ("cZxid", "czxid"),
    ("ctime", "ctime"),
    ("mZxid", "mzxid"),
    ("mtime", "mtime"),
    ("pZxid", "pzxid"),
    ("cversion", "cversion"),
    ("dataVersion", "version"),
    ("aclVersion", "aversion"),
    ("ephemeralOwner", "ephemeralOwner"),
    ("dataLength", "dataLength"),
    ("numChildren", "numChildren"),
)
_HEX = ("czxid", "mzxid", "pzxid", "ephemeralOwner")
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@dataclass
class Args:
    """A parsed command line."""

    flags: set[str] = field(default_factory=set)
    valued: dict[str, str] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)
    value: str | None = None
    help: bool = False


def split_commands(line: str) -> list[str]:
    """Split a line at `;` outside quotes (a value may contain a quoted `;`)."""
    parts: list[str] = []
    current: list[str] = []
    quote, escaped = "", False
    for ch in line:
        if escaped:
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == ";":
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse(name: str, spec: Spec, tokens: list[str]) -> Args:
    """Parse a command's tokens: flags (combinable, -vN or -v N), paths, then the rest as the value."""
    args = Args()
    i, options_done = 0, False
    while i < len(tokens):
        token = tokens[i]
        if spec.value and args.paths:
            break  # after the path, everything is the value, dashes included
        i += 1
        if not options_done and token in ("-h", "--help"):
            args.help = True
        elif not options_done and token == "--":
            options_done = True
        elif not options_done and token.startswith("-") and len(token) > 1:
            letters = token[1:]
            for j, letter in enumerate(letters):
                if letter in spec.valued:
                    value = letters[j + 1 :]
                    if not value:
                        if i >= len(tokens):
                            raise UsageError(f"{name}: -{letter} needs a value")
                        value, i = tokens[i], i + 1
                    args.valued[letter] = value
                    break
                if letter not in spec.flags:
                    raise UsageError(f"{name}: unknown option -{letter}")
                args.flags.add(letter)
        else:
            args.paths.append(token)
    if args.help:
        return args
    lo, hi = spec.paths
    if len(args.paths) < lo:
        raise UsageError(f"{name}: a path is needed")
    if len(args.paths) > hi:
        raise UsageError(f"{name}: unexpected argument {args.paths[hi]!r}")
    if spec.value:
        rest = tokens[i:]
        if not rest and spec.value == "required":
            raise UsageError(f'{name}: a value is needed (use "" for empty data)')
        args.value = " ".join(rest) if rest else None
    return args


def _version(args: Args, name: str) -> int:
    raw = args.valued.get("v")
    if raw is None:
        return -1
    try:
        version = int(raw)
    except ValueError:
        raise UsageError(f"{name}: -v needs an integer version, not {raw!r}") from None
    if version < -1:
        raise UsageError(f"{name}: -v must be >= -1")
    return version


def _wait_ms(args: Args, name: str) -> int:
    raw = args.valued.get("w")
    if raw is None:
        return 0
    if not raw.isdigit() or int(raw) > 300_000:
        raise UsageError(f"{name}: -w needs milliseconds from 0 to 300000, not {raw!r}")
    return int(raw)


def java_date(ms: int) -> str:
    """A time in ms as zkCli prints it (Java's Date.toString): `Mon Dec 07 12:43:46 UTC 2026`, local time."""
    t = time.localtime(ms // 1000)
    clock = f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
    return f"{_DAYS[t.tm_wday]} {_MONTHS[t.tm_mon - 1]} {t.tm_mday:02d} {clock} {t.tm_zone} {t.tm_year}"


def format_stat(stat: Stat) -> list[str]:
    """zkCli's `name = value` lines: its names and order, zxids and the owner in hex, times as Java prints them."""
    fields = msgspec.to_builtins(stat)
    lines = []
    for label, name in STAT_FIELDS:
        value: int = fields[name]
        if name in _HEX:
            lines.append(f"{label} = 0x{value & 0xFFFF_FFFF_FFFF_FFFF:x}")  # Long.toHexString
        elif name in ("ctime", "mtime"):
            lines.append(f"{label} = {java_date(value)}")
        else:
            lines.append(f"{label} = {value}")
    return lines


class Commands:
    """Runs command lines against the registry; keeps the working node and the session."""

    def __init__(
        self,
        client: RegistryClient,
        session: Session,
        *,
        interactive: bool = False,
        out: TextIO | None = None,
        err: TextIO | None = None,
    ) -> None:
        self.client = client
        self.session = session
        self.interactive = interactive
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.cwd = "/"
        self.exiting = False
        self._handlers: dict[str, Callable[[str, Args], Awaitable[None]]] = {
            "ls": self._ls,
            "cd": self._cd,
            "pwd": self._pwd,
            "put": self._put,
            "create": self._create,
            "get": self._get,
            "set": self._set,
            "stat": self._stat,
            "delete": self._delete,
            "deleteall": self._deleteall,
            "rmr": self._deleteall,
            "watch": self._watch,
            "sync": self._sync,
            "audit": self._audit,
            "lock": self._lock,
            "unlock": self._unlock,
            "elect": self._elect,
            "leader": self._leader,
            "help": self._help,
            "exit": self._exit,
            "quit": self._exit,
        }

    def say(self, text: str) -> None:
        """A result line on stdout, flushed at once (watch output is read as it comes)."""
        print(text, file=self.out, flush=True)

    def note(self, text: str) -> None:
        """A line on stderr."""
        print(text, file=self.err, flush=True)

    def path(self, arg: str, *, sequential: bool = False) -> str:
        """arg resolved against the working node; InvalidPath when ZooKeeper would refuse it."""
        return resolve(self.cwd, arg, sequential=sequential)

    async def execute_line(self, line: str) -> Status:
        """Run every `;`-separated command of a line; the worst status wins. Stops after exit."""
        worst = Status.OK
        for text in split_commands(line):
            if self.exiting:
                break
            worst = max(worst, await self.execute(text))
        return worst

    async def execute(self, text: str) -> Status:
        """Run one command and report its error on stderr as `Error: <code>: <message>`."""
        name = ""
        try:
            try:
                tokens = shlex.split(text)
            except ValueError as exc:
                raise UsageError(f"cannot split the line: {exc}") from None
            if not tokens:
                return Status.OK
            name, rest = tokens[0], tokens[1:]
            spec = SPECS.get(name)
            if spec is None:
                raise UsageError(f"unknown command {name!r} (help lists them)")
            args = parse(name, spec, rest)
            if args.help:
                self._describe(name)
                return Status.OK
            await self._handlers[name](name, args)
        except InvalidPath as exc:
            self.note(f"Error: {exc.code}: {exc.message}")  # ZooKeeper's message; no usage line
            return Status.USAGE
        except UsageError as exc:
            self.note(f"Error: {exc.code}: {exc.message}")
            if name in SPECS:
                self.note(f"usage: {SPECS[name].usage}")
            return Status.USAGE
        except ShellError as exc:
            self.note(f"Error: {exc.code}: {exc.message}")
            return Status.FAILED
        except BrokenPipeError:
            raise  # the output's reader has gone: the shell ends (its session closed), quietly
        except Exception as exc:  # a bug must not end an interactive shell and its session
            self.note(f"Error: SystemError: {type(exc).__name__}: {exc}")
            return Status.FAILED
        return Status.OK

    def _describe(self, name: str) -> None:
        spec = SPECS[name]
        self.say(f"usage: {spec.usage}")
        self.say(f"  {spec.summary}")
        for line in spec.options:
            self.say(f"  {line}")

    # ---- commands -------------------------------------------------------------------------------

    async def _ls(self, name: str, args: Args) -> None:
        path = self.path(args.paths[0]) if args.paths else self.cwd
        if "r" not in args.flags:
            for child in (await self.client.children(path)).children:
                self.say(child)
            return
        await self._walk(path, top=True)

    async def _walk(self, path: str, top: bool) -> None:
        try:
            view = await self.client.children_stat(path)
        except ShellError as exc:
            if exc.code == "NoNode" and not top:
                return  # deleted while we were listing
            raise
        for child in view.children:
            child_path = join(path, child.name)
            self.say(child_path)
            if child.stat is None or child.stat.num_children:
                await self._walk(child_path, top=False)

    async def _cd(self, name: str, args: Args) -> None:
        path = resolve(self.cwd, args.paths[0], directory=True) if args.paths else "/"
        await self.client.stat(path)
        self.cwd = path

    async def _pwd(self, name: str, args: Args) -> None:
        self.say(self.cwd)

    async def _put(self, name: str, args: Args) -> None:
        path, value = self.path(args.paths[0]), args.value or ""
        try:
            await self.client.create(path, value, parents=True)
        except ShellError as exc:
            if exc.code != "NodeExists":
                raise
            await self.client.set(path, value)

    async def _create(self, name: str, args: Args) -> None:
        path = self.path(args.paths[0], sequential="s" in args.flags)
        session_id = await self.session.ensure() if "e" in args.flags else 0
        created = await self.client.create(path, args.value or "", session_id=session_id, sequential="s" in args.flags)
        self.say(created.path)

    async def _get(self, name: str, args: Args) -> None:
        node = await self.client.get(self.path(args.paths[0]))
        if node.data is None:
            self.say("null")  # ZooKeeper's null data, as zkCli prints it
        else:
            self.say(node.data if node.encoding == "utf-8" else f"base64:{node.data}")

    async def _set(self, name: str, args: Args) -> None:
        await self.client.set(self.path(args.paths[0]), args.value or "", _version(args, name))

    async def _stat(self, name: str, args: Args) -> None:
        view = await self.client.stat(self.path(args.paths[0]))
        for line in format_stat(view.stat):
            self.say(line)

    async def _delete(self, name: str, args: Args) -> None:
        await self.client.delete(self.path(args.paths[0]), _version(args, name), "r" in args.flags)

    async def _deleteall(self, name: str, args: Args) -> None:
        batch = args.valued.get("b")
        if batch is not None and not (batch.isdigit() and int(batch) > 0):
            raise UsageError(f"{name}: -b needs a positive batch size, not {batch!r}")
        await self.client.delete(self.path(args.paths[0]), -1, recursive=True)

    async def _watch(self, name: str, args: Args) -> None:
        path, recursive = self.path(args.paths[0]), "r" in args.flags

        def show(msg: WatchMessage) -> None:
            if msg.type == "ready":
                if self.interactive:
                    below = " and below" if recursive else ""
                    self.note(f"watching {path}{below} from revision {msg.revision}; Ctrl-C stops")
            elif msg.type != "keepalive":
                self.say(f"{msg.type} {msg.path} revision={msg.revision}")

        await self.client.watch(path, recursive, show)

    async def _sync(self, name: str, args: Args) -> None:
        self.say(f"revision {await self.client.sync()}")

    async def _audit(self, name: str, args: Args) -> None:
        params = {key: args.valued[flag] for flag, key in AUDIT_FLAGS.items() if flag in args.valued}
        limit = params.setdefault("limit", str(AUDIT_LIMIT))
        if not limit.isdigit() or not 1 <= int(limit) <= MAX_LIMIT:
            raise UsageError(f"{name}: -l needs a number from 1 to {MAX_LIMIT}, not {limit!r}")
        entries = await self.client.audit(params)
        if not entries:
            self.note("no recorded decision matches")
            return
        for line in table(entries):
            self.say(line)

    async def _lock(self, name: str, args: Args) -> None:
        path, wait_ms = self.path(args.paths[0]), _wait_ms(args, name)
        session_id = await self.session.ensure()
        held = await self.client.lock(path, session_id, wait_ms, args.value or "")
        self.say(held.node)

    async def _unlock(self, name: str, args: Args) -> None:
        await self.client.unlock(self.path(args.paths[0]))

    async def _elect(self, name: str, args: Args) -> None:
        path, wait_ms = self.path(args.paths[0]), _wait_ms(args, name)
        session_id = await self.session.ensure()
        view = await self.client.elect(path, session_id, args.value or "", wait_ms)
        self.say("elected" if view.elected else f"waiting; {view.leader} leads")

    async def _leader(self, name: str, args: Args) -> None:
        view = await self.client.election(self.path(args.paths[0]))
        if view.leader is None:
            raise ShellError("NoNode", f"nobody stands in {view.path}")
        self.say(view.leader)

    async def _help(self, name: str, args: Args) -> None:
        if args.paths:
            if args.paths[0] not in SPECS:
                raise UsageError(f"help: unknown command {args.paths[0]!r}")
            self._describe(args.paths[0])
            return
        self.say("Commands (paths are relative to the working node unless they start with /; . and .. work in")
        self.say("relative paths; an absolute path is a ZooKeeper path, taken exactly as written):")
        for spec in SPECS.values():
            self.say(f"  {spec.usage:<32} {spec.summary}")
        self.say("Several commands may share a line, separated by ';'. `CMD -h` describes one.")

    async def _exit(self, name: str, args: Args) -> None:
        self.exiting = True
