"""No silent stall: a writer failure fails one write and the log goes on; a long-lived task that stops
is logged with its traceback and ends the process non-zero (its service manager restarts it)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx

from tests.harness import Fleetmate, run_cli, running, wait_for


def test_a_stopped_applier_is_logged_and_ends_the_process_non_zero(tmp_path: Path) -> None:
    # The 40th entry this replica applies raises inside the apply loop (a bug, or a lost disk).
    fm = Fleetmate(tmp_path, env={"FLEETMATE_FAILPOINTS": "log.apply=40*raise"})
    with running(fm):
        assert fm.proc is not None
        for i in range(200):
            try:
                httpx.post(f"{fm.url}/api/v1/registry/nodes/n{i}", json={"data": "x"}, timeout=2)
            except httpx.HTTPError:
                break
            if fm.proc.poll() is not None:
                break
        try:
            code = fm.proc.wait(20)
        except subprocess.TimeoutExpired:
            raise AssertionError("the replica kept running with its applier stopped") from None
        assert code == 1
        wait_for(lambda: fm.logged("exiting: a long-lived task stopped"), 5, "the exit reason in the log")
        (stopped,) = fm.logged("a long-lived task stopped; this replica cannot go on")
        assert stopped["level"] == "critical"
        assert "FailpointError: failpoint log.apply" in stopped["exc"]  # with its traceback
        assert "applier" in fm.logged("exiting: a long-lived task stopped")[0]["reason"]


def test_a_failed_append_fails_its_writes_only_and_the_writer_goes_on(tmp_path: Path) -> None:
    fm = Fleetmate(tmp_path, env={"FLEETMATE_FAILPOINTS": "log.before_append=30*raise"})
    with running(fm), httpx.Client(base_url=fm.url, timeout=5) as http:
        codes = [http.post(f"/api/v1/registry/nodes/w{i}", json={"data": "x"}).status_code for i in range(40)]
        assert 503 in codes  # the entry whose publish raised: its writer is told, nothing hangs
        assert codes.count(503) == 1
        assert codes[-1] == 201
        assert http.get("/api/v1/ready").json()["ready"] is True
        assert fm.alive


def test_a_bad_failpoint_setting_stops_start_up_naming_it(tmp_path: Path) -> None:
    done = run_cli(
        ["serve"], {"FLEETMATE_FAILPOINTS": "log.apply=explode", "FLEETMATE_DATA_DIR": str(tmp_path)}, tmp_path
    )
    assert done.returncode == 2
    assert "FLEETMATE_FAILPOINTS" in done.stderr
