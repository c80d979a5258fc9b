"""`fleetmate agent` as a subprocess for tests: start, read its JSON log lines, stop or kill -9."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.harness.fleetmate import ROOT
from tests.harness.wait import wait_for

INTERVAL = 0.5  # heartbeat interval the tests' agents use, in seconds


class Agent:
    """`fleetmate agent` as a subprocess; its JSON log lines are collected in `lines`."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.dir = workdir
        self.env = {
            "FLEETMATE_DATA_DIR": str(workdir / "data"),
            "FLEETMATE_LOG_FORMAT": "json",
            "FLEETMATE_MEMBERSHIP_HEARTBEAT_INTERVAL": str(INTERVAL),
            "FLEETMATE_AGENT_LOG_CLEAN_INTERVAL": "0",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._reader: threading.Thread | None = None

    def start(self, wait_started: bool = True) -> Agent:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETMATE_")}
        env.update(self.env)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app", "agent"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait_started:
            wait_for(self._started, 15, "the 'agent started' line")
        return self

    def _read(self) -> None:
        assert self.proc
        assert self.proc.stderr
        for raw in self.proc.stderr:
            text = raw.decode("utf-8", "replace").rstrip()
            self.raw.append(text)
            with contextlib.suppress(ValueError):
                self.lines.append(json.loads(text))

    def _started(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise AssertionError(f"agent exited with {self.proc.returncode}: {self.raw[-10:]}")
        return bool(self.logged("agent started"))

    def logged(self, msg: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("msg") == msg]

    def wait(self, timeout: float) -> int:
        assert self.proc
        code = self.proc.wait(timeout)
        if self._reader:
            self._reader.join(2)
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        assert self.proc
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def agent_running(agent: Agent) -> Iterator[Agent]:
    agent.start()
    try:
        yield agent
    finally:
        agent.kill()
