"""The shell's recipe commands on this shell's session: lock, unlock, elect, leader."""

from __future__ import annotations

from app.cli.shell_client import ShellError
from app.cli.shell_context import Handler, ShellState
from app.cli.shell_syntax import Args, Spec, wait_option

RECIPE_SPECS: dict[str, Spec] = {
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
}


class RecipeCommands:
    """Locks and elections held by this shell's session."""

    def __init__(self, shell: ShellState) -> None:
        self.shell = shell

    def handlers(self) -> dict[str, Handler]:
        """Each command name and the method that runs it."""
        return {"lock": self._lock, "unlock": self._unlock, "elect": self._elect, "leader": self._leader}

    async def _lock(self, name: str, args: Args) -> None:
        path, wait_ms = self.shell.path(args.paths[0]), wait_option(args, name)
        session_id = await self.shell.session.ensure()
        held = await self.shell.client.lock(path, session_id, wait_ms, args.value or "")
        self.shell.say(held.node)

    async def _unlock(self, name: str, args: Args) -> None:
        await self.shell.client.unlock(self.shell.path(args.paths[0]))

    async def _elect(self, name: str, args: Args) -> None:
        path, wait_ms = self.shell.path(args.paths[0]), wait_option(args, name)
        session_id = await self.shell.session.ensure()
        view = await self.shell.client.elect(path, session_id, args.value or "", wait_ms)
        self.shell.say("elected" if view.elected else f"waiting; {view.leader} leads")

    async def _leader(self, name: str, args: Args) -> None:
        view = await self.shell.client.election(self.shell.path(args.paths[0]))
        if view.leader is None:
            raise ShellError("NoNode", f"nobody stands in {view.path}")
        self.shell.say(view.leader)
