"""A command whose output's reader has gone (`fleetmate config keys | head -1`) ends quietly."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable

EXIT_PIPE = 128 + signal.SIGPIPE  # 141: what a shell reports for a tool that SIGPIPE ended


def quiet_pipe(command: Callable[[], int]) -> int:
    """Run command; when stdout's reader has gone, return 141 without a traceback.

    Python ignores SIGPIPE, so a write to a closed pipe raises BrokenPipeError; tools like `ls`
    would just end. stdout is pointed at /dev/null so that the interpreter's last flush at exit
    does not fail again ("Exception ignored ... BrokenPipeError").
    """
    try:
        code = command()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return EXIT_PIPE
