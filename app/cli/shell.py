"""`fleetmate shell`: a zkCli-style shell on the registry's REST API, interactive or fed by -c or stdin."""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import os
import shlex
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prompt_toolkit import PromptSession
from prompt_toolkit.history import FileHistory, History, InMemoryHistory

from app.cli.api import tls_context
from app.cli.shell_args import DEFAULT_ADDR
from app.cli.shell_client import RegistryClient, Session
from app.cli.shell_commands import Commands
from app.cli.shell_complete import ShellCompleter
from app.cli.shell_syntax import Status
from app.tls import TlsFileError

HISTORY_FILE = "~/.fleetmate_history"
EXIT_USAGE = 2
CLOSE_TIMEOUT = 5.0

NextLine = Callable[[], Awaitable[str | None]]


def parse_addrs(text: str) -> list[str]:
    """Comma-separated base URLs, normalised (http:// assumed, no trailing slash); ValueError when bad."""
    addrs = []
    for raw in text.split(","):
        addr = raw.strip().rstrip("/")
        if not addr:
            continue
        if "://" not in addr:
            addr = f"http://{addr}"
        parts = urlsplit(addr)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query:
            raise ValueError(f"{raw.strip()!r} is not an http(s)://host[:port] address")
        _ = parts.port  # raises ValueError on a bad port
        addrs.append(addr)
    if not addrs:
        raise ValueError("no address given")
    return addrs


def run(args: argparse.Namespace, prog: str = "fleetmate shell") -> int:
    """Run the shell for parsed arguments (see add_arguments); returns the exit code."""
    flag = "--addr" if prog == "fleetmate shell" else "-mate-addr"
    try:
        addrs = parse_addrs(args.addr or os.environ.get("FLEETMATE_ADDR") or DEFAULT_ADDR)
    except ValueError as exc:
        print(f"{prog}: error: {flag}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.timeout_ms <= 0:
        print(f"{prog}: error: --timeout-ms must be > 0", file=sys.stderr)
        return EXIT_USAGE
    script: str | None = args.commands
    if args.words:
        if script is not None:
            print(f"{prog}: error: give commands with -c or after the options, not both", file=sys.stderr)
            return EXIT_USAGE
        script = shlex.join(args.words)  # one command: a ';' among its words is not a separator
    token = args.token or os.environ.get("FLEETMATE_TOKEN") or None
    try:
        tls = tls_context(args)
    except TlsFileError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    interactive = script is None and sys.stdin is not None and sys.stdin.isatty()
    try:
        return asyncio.run(_main(RegistryClient(addrs, token, tls=tls), args.timeout_ms, script, interactive))
    except KeyboardInterrupt:
        return 128 + signal.SIGINT


async def _main(client: RegistryClient, timeout_ms: int, script: str | None, interactive: bool) -> int:
    addrs = client.addrs
    session = Session(client, timeout_ms, lambda text: print(f"warning: {text}", file=sys.stderr, flush=True))
    commands = Commands(client, session, interactive=interactive)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    stopped_by: list[int] = []

    def stop(signum: int) -> None:
        if not stopped_by:
            stopped_by.append(signum)
            main.cancel()

    # SIGTERM (and SIGINT in a script) end the shell the way `exit` does: the session is closed.
    handled = [signal.SIGTERM] if interactive else [signal.SIGTERM, signal.SIGINT]
    for sig in handled:
        loop.add_signal_handler(sig, stop, sig)
    status = 0
    try:
        if interactive:
            await _interactive(commands, addrs)
        else:
            status = await _script(commands, _text_lines(script) if script is not None else _stdin_lines())
    except asyncio.CancelledError:
        if not stopped_by:
            raise
        main.uncancel()
        status = 128 + stopped_by[0]
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await commands.session.close()
        except TimeoutError:
            print("warning: the session could not be closed in time; it will expire", file=sys.stderr)
        await client.aclose()
    return status


async def _script(commands: Commands, next_line: NextLine) -> int:
    """Run lines until the input ends or `exit`; the worst status is the exit code."""
    worst = Status.OK
    while not commands.exiting:
        line = await next_line()
        if line is None:
            break
        line = line.strip()
        if line and not line.startswith("#"):
            worst = max(worst, await commands.execute_line(line))
    return int(worst)


def _text_lines(text: str) -> NextLine:
    lines = iter(text.splitlines())

    async def next_line() -> str | None:
        return next(lines, None)

    return next_line


def _stdin_lines() -> NextLine:
    """Lines of stdin as they arrive, read by a daemon thread.

    The thread uses os.read, not sys.stdin: a daemon thread blocked inside a buffered reader would hold
    its lock and abort the interpreter at exit while input is still open.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def put(item: str | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the shell has ended
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def pump() -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        pending = ""
        with contextlib.suppress(OSError, ValueError, AttributeError):
            fd = sys.stdin.fileno()
            while chunk := os.read(fd, 65536):
                *lines, pending = (pending + decoder.decode(chunk)).split("\n")
                for line in lines:
                    put(line)
        pending += decoder.decode(b"", final=True)
        if pending:
            put(pending)
        put(None)

    threading.Thread(target=pump, name="fleetmate-shell-stdin", daemon=True).start()
    return queue.get


async def _interactive(commands: Commands, addrs: list[str]) -> None:
    prompt: PromptSession[str] = PromptSession(
        history=_history(),
        completer=ShellCompleter(commands.client, lambda: commands.cwd),
        complete_while_typing=False,
    )
    commands.say(f"fleetmate shell on {', '.join(addrs)}: `help` lists the commands, Ctrl-D leaves")
    while not commands.exiting:
        try:
            line = await prompt.prompt_async(f"fleetmate[{commands.cwd}]> ")
        except KeyboardInterrupt:
            continue
        except EOFError:
            break
        await _interruptible(commands.execute_line(line))


async def _interruptible(command: Coroutine[Any, Any, Status]) -> Status:
    """Run a command that Ctrl-C cancels (ending a watch, say) without leaving the shell."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(command)
    interrupted = False

    def interrupt() -> None:
        nonlocal interrupted
        interrupted = True
        task.cancel()

    loop.add_signal_handler(signal.SIGINT, interrupt)
    try:
        return await task
    except asyncio.CancelledError:
        if not interrupted:
            raise
        return Status.OK
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def _history() -> History:
    path = Path(HISTORY_FILE).expanduser()
    try:
        with path.open("a", encoding="utf-8"):
            pass
    except OSError:
        return InMemoryHistory()
    return FileHistory(str(path))
