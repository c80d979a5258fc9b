"""Static checks of the deployment files: compose.yaml and the Containerfile (no Docker needed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
CONTAINERFILE = ROOT / "Containerfile"
NATS_NODES = ("nats-1", "nats-2", "nats-3")


def _load_compose() -> dict[str, Any]:
    """Parse compose.yaml with PyYAML, or ruamel.yaml (a check-jsonschema dependency) when PyYAML is missing."""
    text = COMPOSE.read_text(encoding="utf-8")
    try:
        import yaml
    except ImportError:
        from ruamel.yaml import YAML

        data = YAML(typ="safe", pure=True).load(text)
    else:
        data = yaml.safe_load(text)
    assert isinstance(data, dict), "compose.yaml is not a mapping"
    return data


def _services() -> dict[str, dict[str, Any]]:
    services = _load_compose()["services"]
    assert isinstance(services, dict)
    return services


def _image(service: dict[str, Any]) -> str:
    return str(service.get("image", ""))


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """The service environment as a dict, whether written as a mapping or a list of NAME=VALUE."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(str(item).partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _fleetmate_services() -> dict[str, dict[str, Any]]:
    """The replicas (`fleetmate serve`): services with a node id that do not run the agent."""
    return {
        name: svc
        for name, svc in _services().items()
        if "FLEETMATE_NODE_ID" in _environment(svc) and svc.get("command") != ["agent"]
    }


def _agent_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in _services().items() if svc.get("command") == ["agent"]}


def _containerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with comments dropped and continuation lines joined."""
    joined = re.sub(r"\\\n", " ", CONTAINERFILE.read_text(encoding="utf-8"))
    result = []
    for line in joined.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        keyword, _, args = stripped.partition(" ")
        result.append((keyword.upper(), args.strip()))
    return result


def test_compose_validates_against_compose_spec() -> None:
    checker = Path(sys.executable).parent / "check-jsonschema"
    if not checker.exists():
        pytest.skip(f"check-jsonschema not installed next to {sys.executable}")
    proc = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"check-jsonschema failed:\n{proc.stdout}\n{proc.stderr}"


def test_compose_has_three_nats_nodes_with_jetstream_cluster() -> None:
    nats = {name: svc for name, svc in _services().items() if _image(svc).startswith("nats:")}
    assert sorted(nats) == sorted(NATS_NODES)
    for name, svc in nats.items():
        command = " ".join(svc["command"]) if isinstance(svc["command"], list) else svc["command"]
        assert "-js" in command.split(), name
        assert "--cluster_name" in command, name
        assert "--cluster=nats://0.0.0.0:6222" in command, name
        others = [node for node in NATS_NODES if node != name]
        for other in others:
            assert f"nats://{other}:6222" in command, f"{name} has no route to {other}"
        assert svc.get("volumes"), f"{name} has no volume"


def test_compose_has_one_minio() -> None:
    minio = [name for name, svc in _services().items() if _image(svc).startswith("minio/minio")]
    assert len(minio) == 1
    svc = _services()[minio[0]]
    assert svc.get("volumes")
    env = _environment(svc)
    assert "MINIO_ROOT_USER" in env
    assert "MINIO_ROOT_PASSWORD" in env


def test_compose_has_three_fleetmate_replicas_on_the_nats_cluster() -> None:
    replicas = _fleetmate_services()
    assert len(replicas) == 3
    node_ids = {_environment(svc)["FLEETMATE_NODE_ID"] for svc in replicas.values()}
    assert len(node_ids) == 3, f"node ids are not distinct: {node_ids}"
    host_ports = set()
    for name, svc in replicas.items():
        env = _environment(svc)
        assert svc["build"]["dockerfile"] == "Containerfile", name
        urls = env["FLEETMATE_NATS_URL"].split(",")
        for node in NATS_NODES:
            assert f"nats://{node}:4222" in urls, f"{name}: FLEETMATE_NATS_URL lacks {node}"
        assert env["FLEETMATE_HTTP_HOST"] == "0.0.0.0", name
        assert env.get("FLEETMATE_AUTH_TOKENS"), f"{name} binds 0.0.0.0 without a token"
        assert set(NATS_NODES) <= set(svc["depends_on"]), name
        assert "minio" in svc["depends_on"], f"{name} keeps snapshots in MinIO: it must wait for it"
        assert env["FLEETMATE_SNAPSHOT_STORE"] == "s3", name
        assert env["FLEETMATE_ZK_HOST"] == "0.0.0.0", name
        assert svc.get("volumes"), name
        assert svc.get("healthcheck"), name
        host_ports.update(str(port).rsplit(":", 1)[0] for port in svc["ports"])
    assert host_ports == {"21511", "21512", "21513", "2182", "2183", "2184"}


def test_compose_fleetmate_env_uses_only_known_variables() -> None:
    """An unknown FLEETMATE_* variable stops start-up, so compose must set only real keys."""
    from app.config import RESERVED_ENV, env_keys

    known = set(env_keys()) | set(RESERVED_ENV)
    for name, svc in _fleetmate_services().items():
        unknown = {var for var in _environment(svc) if var.startswith("FLEETMATE_")} - known
        assert not unknown, f"{name} sets unknown variables {sorted(unknown)}"


def test_compose_has_an_agent_on_the_nats_cluster_with_known_variables() -> None:
    from app.config import RESERVED_ENV, env_keys

    agents = _agent_services()
    assert len(agents) == 1
    for name, svc in agents.items():
        env = _environment(svc)
        assert svc["image"] == "fleetmate:local", name
        assert env["FLEETMATE_NODE_ID"] not in {
            _environment(r)["FLEETMATE_NODE_ID"] for r in _fleetmate_services().values()
        }
        urls = env["FLEETMATE_NATS_URL"].split(",")
        assert {f"nats://{node}:4222" for node in NATS_NODES} <= set(urls), name
        assert set(NATS_NODES) <= set(svc["depends_on"]), name
        unknown = {var for var in env if var.startswith("FLEETMATE_")} - set(env_keys()) - set(RESERVED_ENV)
        assert not unknown, f"{name} sets unknown variables {sorted(unknown)}"


def test_the_agent_unit_file_runs_fleetmate_agent() -> None:
    unit = (ROOT / "deploy" / "fleetmate-agent.service").read_text()
    assert re.search(r"^ExecStart=\S*fleetmate agent$", unit, re.M)
    assert re.search(r"^Restart=always$", unit, re.M)
    assert "FLEETMATE_NATS_URL" in unit


def test_containerfile_runs_fleetmate_serve_as_non_root() -> None:
    instructions = _containerfile_instructions()
    keywords = [keyword for keyword, _ in instructions]
    assert keywords[0] == "FROM"
    assert instructions[0][1].startswith("python:3.11-slim")

    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "no USER instruction"
    assert users[-1].split(":")[0] not in {"root", "0"}

    assert "VOLUME" in keywords
    exposed = " ".join(args for keyword, args in instructions if keyword == "EXPOSE").split()
    assert "21510" in exposed
    assert "HEALTHCHECK" in keywords

    entrypoint = [args for keyword, args in instructions if keyword == "ENTRYPOINT"][-1]
    cmd = [args for keyword, args in instructions if keyword == "CMD"][-1]
    assert "fleetmate" in entrypoint
    assert "serve" in cmd
