"""The shell's kv commands: kvget, kvput, kvdel, kvscan and kvshards on the sharded KV store."""

from __future__ import annotations

import msgspec

from app.cli.shell_context import Handler, ShellState
from app.cli.shell_syntax import Args, Spec, UsageError

KV = "/api/v1/kv"
KV_SPECS: dict[str, Spec] = {
    "kvget": Spec("kvget [-s] key", "a KV key's value (-s: serializable, the holder's copy at once)", flags="s"),
    "kvput": Spec(
        "kvput [-r revision] [-t ttl_s] key value",
        "set a KV key (-r: only at that revision, 0: only if absent; -t: it ends after so many seconds)",
        valued="rt",
        value="required",
    ),
    "kvdel": Spec("kvdel [-r revision] key", "delete a KV key (-r: only at that revision)", valued="r"),
    "kvscan": Spec(
        "kvscan [-l limit] prefix", "KV keys with a prefix, in order (-l: at most, default 100)", valued="l"
    ),
    "kvshards": Spec("kvshards", "the KV store's shards: range, partition, holders (leader*), size", paths=(0, 0)),
}


def _int(args: Args, flag: str, name: str, default: int) -> int:
    raw = args.valued.get(flag)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"{name}: -{flag} needs an integer, not {raw!r}") from None


class KvCommands:
    """The kv commands, through the gateway's /api/v1/kv."""

    def __init__(self, shell: ShellState) -> None:
        self.shell = shell

    def handlers(self) -> dict[str, Handler]:
        """Command names and the methods that run them."""
        return {
            "kvget": self._get,
            "kvput": self._put,
            "kvdel": self._del,
            "kvscan": self._scan,
            "kvshards": self._shards,
        }

    async def _json(
        self, method: str, url: str, body: dict[str, object] | None = None, params: dict[str, str] | None = None
    ) -> object:
        raw = await self.shell.client.request(method, url, body=body, params=params)
        return msgspec.json.decode(raw)

    async def _get(self, name: str, args: Args) -> None:
        params = {"key": args.paths[0], "serializable": "true" if "s" in args.flags else "false"}
        item = await self._json("GET", f"{KV}/get", params=params)
        assert isinstance(item, dict)
        self.shell.say(str(item["value"]))
        self.shell.note(f"revision = {item['revision']}, version = {item['version']}")

    async def _put(self, name: str, args: Args) -> None:
        body: dict[str, object] = {
            "key": args.paths[0],
            "value": args.value or "",
            "if_revision": _int(args, "r", name, -1),
        }
        if "t" in args.valued:
            body["ttl"] = _int(args, "t", name, 0)
        done = await self._json("POST", f"{KV}/put", body=body)
        assert isinstance(done, dict)
        self.shell.note(f"revision = {done['revision']}, shard = {done['shard']}")

    async def _del(self, name: str, args: Args) -> None:
        body = {"key": args.paths[0], "if_revision": _int(args, "r", name, -1)}
        done = await self._json("POST", f"{KV}/delete", body=body)
        assert isinstance(done, dict)
        self.shell.note(f"deleted = {done['deleted']}")

    async def _scan(self, name: str, args: Args) -> None:
        limit = _int(args, "l", name, 100)
        if not 1 <= limit <= 10_000:
            raise UsageError(f"{name}: -l needs a number from 1 to 10000")
        page = await self._json("GET", f"{KV}/scan", params={"prefix": args.paths[0], "limit": str(limit)})
        assert isinstance(page, dict)
        for item in page["items"]:
            self.shell.say(f"{item['key']} = {item['value']}")
        if page["more"]:
            self.shell.note(f"more after {page['next']!r} (-l to see more)")

    async def _shards(self, name: str, args: Args) -> None:
        shards = await self._json("GET", f"{KV}/shards")
        assert isinstance(shards, list)
        for s in shards:
            holders = " ".join(f"{h['node']}{'*' if h['role'] == 'leader' else ''}" for h in s["holders"])
            rng = f"[{s['start'] or '-'}, {s['end'] or '-'})"
            self.shell.say(f"shard {s['id']} partition {s['partition']} {rng} size {s['size']} on {holders}")
