"""Tab completion for the shell: command names, then node paths fetched from the registry."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Iterable

from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document

from app.cli.shell_client import RegistryClient, ShellError
from app.cli.shell_commands import SPECS
from app.cli.shell_paths import InvalidPath, resolve


class ShellCompleter(Completer):
    """Completes the command name, `help`'s argument, and the path argument of every path command."""

    def __init__(self, client: RegistryClient, cwd: Callable[[], str]) -> None:
        self.client = client
        self.cwd = cwd

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterable[Completion]:
        """Command names only: paths need the server, which get_completions_async asks."""
        word, before = self._split(document)
        if not before or before[0] == "help":
            yield from self._commands(word)

    async def get_completions_async(
        self, document: Document, complete_event: CompleteEvent
    ) -> AsyncGenerator[Completion, None]:
        """Command names, or the children of the node whose path is being typed."""
        word, before = self._split(document)
        if not before or (before[0] == "help" and len(before) == 1):
            for completion in self._commands(word):
                yield completion
            return
        spec = SPECS.get(before[0])
        if spec is None or spec.paths[1] == 0 or word.startswith("-") or self._positionals(before) != 0:
            return
        cut = word.rfind("/")
        head, prefix = word[: cut + 1], word[cut + 1 :]
        try:
            # head ends with '/' (the node whose children are wanted), as cd accepts it.
            parent = resolve(self.cwd(), head, directory=True) if head else self.cwd()
        except InvalidPath:
            return
        try:
            view = await self.client.children_stat(parent)
        except ShellError:
            return
        for child in view.children:
            if child.name.startswith(prefix):
                # A trailing slash on a node with children lets the next Tab go one level down.
                more = "/" if child.stat is not None and child.stat.num_children else ""
                yield Completion(head + child.name + more, start_position=-len(word), display=child.name + more)

    @staticmethod
    def _split(document: Document) -> tuple[str, list[str]]:
        """The word under the cursor and the words before it."""
        text = document.text_before_cursor
        word = document.get_word_before_cursor(WORD=True)
        return word, text[: len(text) - len(word)].split()

    @staticmethod
    def _positionals(before: list[str]) -> int:
        """How many positional arguments precede the word (flags and their values skipped)."""
        spec = SPECS[before[0]]
        count, skip = 0, False
        for token in before[1:]:
            if skip:
                skip = False
            elif token.startswith("-") and len(token) > 1:
                skip = token[-1] in spec.valued and len(token) == 2
            else:
                count += 1
        return count

    @staticmethod
    def _commands(word: str) -> Iterable[Completion]:
        for name in SPECS:
            if name.startswith(word):
                yield Completion(name, start_position=-len(word))
