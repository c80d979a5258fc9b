"""The shell's audit command: recorded decisions with their trace ids, newest first."""

from __future__ import annotations

from app.cli.audit import table
from app.cli.shell_context import Handler, ShellState
from app.cli.shell_syntax import Args, Spec, UsageError
from app.web.routes.audit_models import MAX_LIMIT

AUDIT_SPECS: dict[str, Spec] = {
    "audit": Spec(
        "audit [-t trace_id] [-s ha|node|scheduler] [-n subject] [-l limit]",
        "recorded decisions (HA steps, node state changes), newest first, with their trace ids",
        (
            "-t  only the decisions of this trace (32 hex digits)",
            "-s  only this source: ha, node or scheduler",
            "-n  only this cluster name or node id",
            "-l  at most this many (1..1000, default 20)",
        ),
        valued="tsnl",
        paths=(0, 0),
    ),
}
AUDIT_FLAGS = {"t": "trace_id", "s": "source", "n": "subject", "l": "limit"}  # audit's flags: query parameters
AUDIT_LIMIT = 20  # a screenful


class AuditCommand:
    """Queries the audit API with the command's flags as its parameters."""

    def __init__(self, shell: ShellState) -> None:
        self.shell = shell

    def handlers(self) -> dict[str, Handler]:
        """The command name and the method that runs it."""
        return {"audit": self._audit}

    async def _audit(self, name: str, args: Args) -> None:
        params = {key: args.valued[flag] for flag, key in AUDIT_FLAGS.items() if flag in args.valued}
        limit = params.setdefault("limit", str(AUDIT_LIMIT))
        if not limit.isdigit() or not 1 <= int(limit) <= MAX_LIMIT:
            raise UsageError(f"{name}: -l needs a number from 1 to {MAX_LIMIT}, not {limit!r}")
        entries = await self.shell.client.audit(params)
        if not entries:
            self.shell.note("no recorded decision matches")
            return
        for line in table(entries):
            self.shell.say(line)
