"""The shell's commands: the table of every command, dispatch of a line, and the shell's own commands."""

from __future__ import annotations

import shlex
from typing import TextIO

from app.cli.shell_audit_command import AUDIT_SPECS, AuditCommand
from app.cli.shell_client import RegistryClient, Session, ShellError
from app.cli.shell_context import Handler, ShellState
from app.cli.shell_kv_commands import KV_SPECS, KvCommands
from app.cli.shell_node_commands import NODE_SPECS, NodeCommands
from app.cli.shell_paths import InvalidPath
from app.cli.shell_recipe_commands import RECIPE_SPECS, RecipeCommands
from app.cli.shell_syntax import Args, Spec, Status, UsageError, parse, split_commands

# Every command, in the order help lists them.
SPECS: dict[str, Spec] = {
    **NODE_SPECS,
    **RECIPE_SPECS,
    **AUDIT_SPECS,
    **KV_SPECS,
    "sync": Spec(
        "sync",
        "wait until this server has applied every write made before, anywhere; print the revision",
        paths=(0, 0),
    ),
    "help": Spec("help [command]", "list commands, or describe one", paths=(0, 1)),
    "exit": Spec("exit", "close the session and leave", paths=(0, 0)),
    "quit": Spec("quit", "close the session and leave", paths=(0, 0)),
}


class Commands(ShellState):
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
        super().__init__(client, session, interactive=interactive, out=out, err=err)
        self._handlers: dict[str, Handler] = {
            **NodeCommands(self).handlers(),
            **RecipeCommands(self).handlers(),
            **AuditCommand(self).handlers(),
            **KvCommands(self).handlers(),
            "sync": self._sync,
            "help": self._help,
            "exit": self._exit,
            "quit": self._exit,
        }

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

    async def _sync(self, name: str, args: Args) -> None:
        self.say(f"revision {await self.client.sync()}")

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
