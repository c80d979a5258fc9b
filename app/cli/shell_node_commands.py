"""The shell's node commands: ls, cd, pwd, put, create, get, set, stat, delete, deleteall, rmr, watch."""

from __future__ import annotations

import time

import msgspec

from app.cli.shell_client import ShellError, WatchMessage
from app.cli.shell_context import Handler, ShellState
from app.cli.shell_paths import join, resolve
from app.cli.shell_syntax import Args, Spec, UsageError, version_option
from app.services.registry.messages import Stat

NODE_SPECS: dict[str, Spec] = {
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
}

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


class NodeCommands:
    """Reads, writes, deletes and watches of registry nodes, relative to the working node."""

    def __init__(self, shell: ShellState) -> None:
        self.shell = shell

    def handlers(self) -> dict[str, Handler]:
        """Each command name and the method that runs it."""
        return {
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
        }

    async def _ls(self, name: str, args: Args) -> None:
        path = self.shell.path(args.paths[0]) if args.paths else self.shell.cwd
        if "r" not in args.flags:
            for child in (await self.shell.client.children(path)).children:
                self.shell.say(child)
            return
        await self._walk(path, top=True)

    async def _walk(self, path: str, top: bool) -> None:
        try:
            view = await self.shell.client.children_stat(path)
        except ShellError as exc:
            if exc.code == "NoNode" and not top:
                return  # deleted while we were listing
            raise
        for child in view.children:
            child_path = join(path, child.name)
            self.shell.say(child_path)
            if child.stat is None or child.stat.num_children:
                await self._walk(child_path, top=False)

    async def _cd(self, name: str, args: Args) -> None:
        path = resolve(self.shell.cwd, args.paths[0], directory=True) if args.paths else "/"
        await self.shell.client.stat(path)
        self.shell.cwd = path

    async def _pwd(self, name: str, args: Args) -> None:
        self.shell.say(self.shell.cwd)

    async def _put(self, name: str, args: Args) -> None:
        path, value = self.shell.path(args.paths[0]), args.value or ""
        try:
            await self.shell.client.create(path, value, parents=True)
        except ShellError as exc:
            if exc.code != "NodeExists":
                raise
            await self.shell.client.set(path, value)

    async def _create(self, name: str, args: Args) -> None:
        path = self.shell.path(args.paths[0], sequential="s" in args.flags)
        session_id = await self.shell.session.ensure() if "e" in args.flags else 0
        created = await self.shell.client.create(
            path, args.value or "", session_id=session_id, sequential="s" in args.flags
        )
        self.shell.say(created.path)

    async def _get(self, name: str, args: Args) -> None:
        node = await self.shell.client.get(self.shell.path(args.paths[0]))
        if node.data is None:
            self.shell.say("null")  # ZooKeeper's null data, as zkCli prints it
        else:
            self.shell.say(node.data if node.encoding == "utf-8" else f"base64:{node.data}")

    async def _set(self, name: str, args: Args) -> None:
        await self.shell.client.set(self.shell.path(args.paths[0]), args.value or "", version_option(args, name))

    async def _stat(self, name: str, args: Args) -> None:
        view = await self.shell.client.stat(self.shell.path(args.paths[0]))
        for line in format_stat(view.stat):
            self.shell.say(line)

    async def _delete(self, name: str, args: Args) -> None:
        await self.shell.client.delete(self.shell.path(args.paths[0]), version_option(args, name), "r" in args.flags)

    async def _deleteall(self, name: str, args: Args) -> None:
        batch = args.valued.get("b")
        if batch is not None and not (batch.isdigit() and int(batch) > 0):
            raise UsageError(f"{name}: -b needs a positive batch size, not {batch!r}")
        await self.shell.client.delete(self.shell.path(args.paths[0]), -1, recursive=True)

    async def _watch(self, name: str, args: Args) -> None:
        path, recursive = self.shell.path(args.paths[0]), "r" in args.flags

        def show(msg: WatchMessage) -> None:
            if msg.type == "ready":
                if self.shell.interactive:
                    below = " and below" if recursive else ""
                    self.shell.note(f"watching {path}{below} from revision {msg.revision}; Ctrl-C stops")
            elif msg.type != "keepalive":
                self.shell.say(f"{msg.type} {msg.path} revision={msg.revision}")

        await self.shell.client.watch(path, recursive, show)
