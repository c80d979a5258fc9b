"""`mate-cli`: the shell under Mate's name and flags (`-mate-addr HOST:PORT`, Go's single-dash spelling)."""

from __future__ import annotations

import argparse
import sys

from app.cli import shell_args
from app.cli.pipes import quiet_pipe


def parser() -> argparse.ArgumentParser:
    """mate-cli's options: Mate's `-mate-addr` (or `--mate-addr`), then the shell's own."""
    out = argparse.ArgumentParser(
        prog="mate-cli",
        description="fleetmate's shell (the commands of `fleetmate shell`) for Mate users and scripts.",
        epilog="Flags take one dash or two, as Go's do: -mate-addr=HOST:PORT, --mate-addr HOST:PORT.",
    )
    shell_args.add_arguments(out, addr=("-mate-addr", "--mate-addr"), go=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run mate-cli; returns the process exit code."""
    args = parser().parse_args(argv)
    from app.cli import shell

    return quiet_pipe(lambda: shell.run(args, prog="mate-cli"))


if __name__ == "__main__":
    sys.exit(main())
