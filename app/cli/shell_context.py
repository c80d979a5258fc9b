"""What every shell command works with: the registry client, the session, the working node and the output."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import TextIO

from app.cli.shell_client import RegistryClient, Session
from app.cli.shell_paths import resolve
from app.cli.shell_syntax import Args

Handler = Callable[[str, Args], Awaitable[None]]  # a command: its name (as typed) and its parsed arguments


class ShellState:
    """The shell's state shared by its command groups: client, session, working node, output streams."""

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

    def say(self, text: str) -> None:
        """A result line on stdout, flushed at once (watch output is read as it comes)."""
        print(text, file=self.out, flush=True)

    def note(self, text: str) -> None:
        """A line on stderr."""
        print(text, file=self.err, flush=True)

    def path(self, arg: str, *, sequential: bool = False) -> str:
        """arg resolved against the working node; InvalidPath when ZooKeeper would refuse it."""
        return resolve(self.cwd, arg, sequential=sequential)
