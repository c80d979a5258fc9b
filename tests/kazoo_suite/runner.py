"""Fetch kazoo's sdist once into .venv/test-tools and run its own test suite in a subprocess against one server."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.kazoo_suite import RESULTS_ENV, SERVER_ENV

ROOT = Path(__file__).resolve().parents[2]
KAZOO_VERSION = "2.11.0"
SDIST = f"kazoo-{KAZOO_VERSION}.tar.gz"
# PyPI's sha256 of kazoo-2.11.0.tar.gz (its simple index lists it beside the file)
SDIST_SHA256 = "57e7e6f69295c8f922511488eeb79680729e14bb8eb382d5cad83aa11345c36c"
TOOLS = ROOT / ".venv" / "test-tools"
SUITE_DIR = TOOLS / f"kazoo-{KAZOO_VERSION}"  # the unpacked sdist; kazoo/tests is the suite
_COMPLETE = ".fleetmate-unpacked"  # written last: a directory without it is a broken unpack

# Environment of the suite's pytest that must not come from ours: kazoo's tests read CI (sleeps, a
# build check), ZOOKEEPER_* (its cluster and version guesses), and PYTEST_ADDOPTS would change the run.
_DROP_ENV = ("CI", "PYTEST_ADDOPTS", "PYTEST_PLUGINS")


def kazoo_suite_dir() -> Path:
    """The unpacked kazoo sdist, downloaded with pip and unpacked the first time only."""
    if (SUITE_DIR / _COMPLETE).exists():
        return SUITE_DIR
    TOOLS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=TOOLS, prefix="kazoo-download-") as tmp:
        work = Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        cmd += ["--dest", str(work), f"kazoo=={KAZOO_VERSION}"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        archive = work / SDIST
        if done.returncode != 0 or not archive.exists():
            raise RuntimeError(f"pip could not download {SDIST}: {done.stdout[-2000:]}{done.stderr[-2000:]}")
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != SDIST_SHA256:
            raise RuntimeError(f"{SDIST} has sha256 {digest}, expected {SDIST_SHA256}")
        with tarfile.open(archive) as tar:
            tar.extractall(work / "unpacked", filter="data")
        unpacked = work / "unpacked" / f"kazoo-{KAZOO_VERSION}"
        (unpacked / _COMPLETE).write_text(f"{SDIST} sha256 {digest}\n")
        shutil.rmtree(SUITE_DIR, ignore_errors=True)  # a broken earlier unpack
        try:
            unpacked.rename(SUITE_DIR)
        except OSError:
            if not (SUITE_DIR / _COMPLETE).exists():  # else another process unpacked it meanwhile
                raise
    return SUITE_DIR


@dataclass
class SuiteRun:
    """Outcome of one run of kazoo's suite: per-test outcomes as written by the plugin, and pytest's output."""

    server: str
    returncode: int
    seconds: float
    output: str
    tests: dict[str, dict[str, Any]] = field(default_factory=dict)
    deselected: dict[str, str] = field(default_factory=dict)

    def ids(self, *outcomes: str) -> list[str]:
        return sorted(nodeid for nodeid, t in self.tests.items() if t["outcome"] in outcomes)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tests.values():
            out[t["outcome"]] = out.get(t["outcome"], 0) + 1
        out["deselected"] = len(self.deselected)
        return out

    def summary(self) -> str:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(self.counts().items()))
        return f"kazoo {KAZOO_VERSION} suite against {self.server}: {counts} in {self.seconds:.0f} s"


def run_suite(
    server: str, workdir: Path, args: list[str] | None = None, timeout: float = 1500, workers: int = 0
) -> SuiteRun:
    """Run kazoo's tests (or `args`, e.g. node ids relative to the sdist) against server (host:port).

    workers > 0 spreads the tests over that many pytest-xdist processes (when it is installed): the
    suite mostly waits (timeouts, sleeps, watches), so 4 workers take a third of the serial time.
    """
    suite = kazoo_suite_dir()
    workdir.mkdir(parents=True, exist_ok=True)
    results = workdir / "kazoo-results.json"
    log = workdir / "kazoo-output.txt"
    env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV and not k.startswith("ZOOKEEPER_")}
    # the sdist's kazoo first (the suite imports kazoo.testing and kazoo.tests from it), then this project
    env["PYTHONPATH"] = os.pathsep.join([str(suite), str(ROOT)])
    env[SERVER_ENV] = server
    env[RESULTS_ENV] = str(results)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    # none of our venv's pytest plugins (asyncio, anyio, hypothesis) but pytest-timeout, which kazoo's ini
    # uses; hypothesis would even fail two tests: its plugin keeps a `TreeNode` of its own alive, and
    # test_cache counts TreeNode objects by class name to find leaks
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-p", "pytest_timeout", "-p", "tests.kazoo_suite.plugin"]
    # kazoo's warnings (mostly "No chroot path exists") fill a summary that buries the failures
    cmd += ["-p", "no:cacheprovider", "-p", "no:warnings"]
    # kazoo's ini turns on live logging at INFO (thousands of lines); its -ra -v and 180 s timeout stay
    cmd += ["-o", "log_cli=false", "--color=no"]
    if workers > 0 and importlib.util.find_spec("xdist") is not None:
        cmd += ["-p", "xdist.plugin", "-n", str(workers)]
    cmd += args or ["kazoo/tests"]
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=suite, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        try:
            returncode = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            returncode = proc.wait()
            out.write(f"\n!! kazoo suite killed after {timeout:g} s\n")
    run = SuiteRun(server, returncode, time.monotonic() - started, log.read_text(errors="replace"))
    with contextlib.suppress(FileNotFoundError, ValueError):
        body = json.loads(results.read_text())
        run.tests, run.deselected = body["tests"], body["deselected"]
    return run
