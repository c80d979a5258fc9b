"""API tokens: 401 without one, 403 for a read token on an admin route, open health/ready/metrics."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from app.web.auth import bearer_token
from tests.harness import Fleetmate, running

READ = "read-token-1234"
ADMIN = "admin-token-5678"
FILE_ADMIN = "file-admin-token-9"


def test_tokens_guard_api_routes(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"# ops team\nadmin:{FILE_ADMIN}\n")
    fm = Fleetmate(
        tmp_path,
        env={"FLEETMATE_AUTH_TOKENS": f"read:{READ},admin:{ADMIN}", "FLEETMATE_AUTH_TOKENS_FILE": str(tokens_file)},
    )
    with running(fm):
        # Open routes.
        for path in ("/api/v1/health", "/api/v1/ready", "/metrics", "/schema/openapi.json"):
            assert fm.get(path).status_code == 200, path

        # No token, a malformed header, a wrong token: 401 with a JSON body naming no secret.
        no_token = fm.get("/api/v1/cluster")
        assert no_token.status_code == 401
        assert no_token.json()["error"] == "unauthorized"
        assert no_token.headers["www-authenticate"] == "Bearer"
        basic = httpx.get(fm.url + "/api/v1/cluster", headers={"Authorization": "Basic Zm9vOmJhcg=="})
        assert basic.status_code == 401
        wrong = fm.get("/api/v1/cluster", token="not-a-real-token")
        assert wrong.status_code == 401
        assert wrong.json() == {"error": "unauthorized", "message": "the API token is not valid"}
        for response in (no_token, basic, wrong):
            for secret in (READ, ADMIN, FILE_ADMIN, "not-a-real-token"):
                assert secret not in response.text

        # Read token: read routes yes, admin route no.
        assert fm.get("/api/v1/cluster", token=READ).status_code == 200
        forbidden = fm.get("/api/v1/config", token=READ)
        assert forbidden.status_code == 403
        assert forbidden.json()["error"] == "forbidden"

        # Admin tokens (config and file): everything; the config view masks the secrets.
        for token in (ADMIN, FILE_ADMIN):
            shown = fm.get("/api/v1/config", token=token)
            assert shown.status_code == 200
            assert shown.json()["auth"]["tokens"] == ["read:***", "admin:***"]
            assert READ not in shown.text
            assert ADMIN not in shown.text

        # The lean path (a node's GET and PUT) and the watch socket check the same tokens.
        node = "/api/v1/registry/nodes/auth-probe"
        assert fm.get(node).status_code == 401
        assert (
            httpx.put(fm.url + node, json={"data": "x"}, headers={"Authorization": f"Bearer {READ}"}).status_code == 403
        )
        watch = fm.url.replace("http", "ws", 1) + "/api/v1/watch?path=/&recursive=true"
        with pytest.raises(InvalidStatus):
            connect(watch, open_timeout=5).close()
        with connect(watch, open_timeout=5, additional_headers={"Authorization": f"Bearer {READ}"}):
            pass

        # Unknown routes stay 404 JSON (routing comes before the guard).
        assert fm.get("/api/v1/nothing", token=READ).json()["error"] == "not_found"
        assert fm.stop() == 0

    # No secret ever reached the log.
    log_text = "\n".join(fm.raw)
    for secret in (READ, ADMIN, FILE_ADMIN):
        assert secret not in log_text


def test_public_bind_with_token_starts(tmp_path: Path) -> None:
    # 0.0.0.0 is allowed once a token exists; the server is still reached over loopback here.
    fm = Fleetmate(tmp_path, env={"FLEETMATE_HTTP_HOST": "0.0.0.0", "FLEETMATE_AUTH_TOKENS": f"admin:{ADMIN}"})
    with running(fm):
        port = fm.url.rsplit(":", 1)[1]
        assert fm.url == f"http://{socket.gethostname()}:{port}"
        r = httpx.get(f"http://127.0.0.1:{port}/api/v1/cluster", headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 200
        assert fm.stop() == 0


def test_bearer_token_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    for header in (None, "", "Bearer", "Bearer   ", "Basic Zm9vOmJhcg==", "abc"):
        assert bearer_token(header) is None, header
