"""The shell's command-line options, kept apart so that building `fleetmate`'s parser imports nothing heavy."""

from __future__ import annotations

import argparse

from app.cli.api import add_tls_options

DEFAULT_ADDR = "http://127.0.0.1:21510"


def add_arguments(parser: argparse.ArgumentParser, addr: tuple[str, ...] = ("--addr",), go: bool = False) -> None:
    """The shell's options on parser; addr names the address flag, go adds Go's single-dash spellings."""

    def names(flag: str) -> tuple[str, ...]:
        return (flag[1:], flag) if go else (flag,)

    parser.add_argument(
        *addr,
        dest="addr",
        metavar="URL[,URL...]",
        help=f"server HTTP addresses (HOST:PORT or URLs), tried in order (default: $FLEETMATE_ADDR or {DEFAULT_ADDR})",
    )
    parser.add_argument(*names("--token"), help="API token sent as 'Authorization: Bearer' (default: $FLEETMATE_TOKEN)")
    add_tls_options(parser, names)
    parser.add_argument("-c", dest="commands", metavar="CMDS", help="run these ';'-separated commands, then exit")
    parser.add_argument(
        *names("--timeout-ms"),
        dest="timeout_ms",
        type=int,
        default=10000,
        metavar="N",
        help="session timeout for ephemeral nodes (10000)",
    )
    parser.add_argument(
        "words",  # not "command": `fleetmate` keeps its subcommand there
        nargs=argparse.REMAINDER,
        metavar="COMMAND ...",
        help="one command to run, then exit (as `zkCli.sh -server HOST:PORT get /a`)",
    )
