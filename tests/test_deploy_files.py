"""Checks of the deployment files: compose.yaml, the Containerfile (no Docker needed), and the systemd
units with their EnvironmentFile (`systemd-analyze verify`, from Debian's systemd package).

deploy/fleetmate.env is rendered from the configuration schema and config/default.toml; after a key
changes, write it again with: python -m tests.test_deploy_files
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
CONTAINERFILE = ROOT / "Containerfile"
DEPLOY = ROOT / "deploy"
SERVE_UNIT = DEPLOY / "fleetmate.service"
AGENT_UNIT = DEPLOY / "fleetmate-agent.service"
ENV_FILE = DEPLOY / "fleetmate.env"
INSTALLED = "/opt/fleetmate/bin/fleetmate"  # where the units expect the console script
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
    checker = Path(sys.executable).parent / "check-jsonschema"  # a test dependency (pyproject.toml)
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
    unit = AGENT_UNIT.read_text()
    assert re.search(r"^ExecStart=\S*fleetmate agent$", unit, re.M)
    assert re.search(r"^Restart=always$", unit, re.M)
    assert "FLEETMATE_NATS_URL" in unit


# ---- systemd units --------------------------------------------------------------------------------


def _unit_environment(unit: str) -> dict[str, str]:
    """The unit's Environment=NAME=VALUE lines."""
    return dict(m.groups() for m in re.finditer(r"^Environment=([A-Z0-9_]+)=(.*)$", unit, re.M))


def render_env_file() -> str:
    """deploy/fleetmate.env as the schema and config/default.toml make it: every variable documented,
    commented out with its default (the unit's value where the unit's Environment= sets one)."""
    from app import config

    unit_env = _unit_environment(SERVE_UNIT.read_text())
    docs = config.key_docs()
    out = [
        "# Settings of `fleetmate serve` under deploy/fleetmate.service, installed as",
        "# /etc/fleetmate/fleetmate.env (mode 0600: it may hold tokens and passwords).",
        "#",
        "# Every FLEETMATE_* variable, commented out with its default: uncomment and change what you need.",
        "# These override the unit's Environment= lines; flags added to ExecStart override these.",
        "# One VAR=value a line, taken as written (no shell quoting or expansion; a backslash escapes the",
        "# next character). Lists are comma-separated. A bad value stops start-up with exit code 2 and a",
        "# journal line naming the key; `fleetmate config show` prints what a set of values gives.",
        "# Generated from config/default.toml by `python -m tests.test_deploy_files`.",
    ]
    section = None
    for key in config.key_names():
        this = key.split(".", 1)[0] if "." in key else ""
        if this != section:
            section = this
            out += ["", f"# ==== [{section}]" if section else "# ==== top level"]
        env = config.env_name(key)
        out.append("")
        out += [f"# {line}" for line in docs[key].splitlines()]  # as config/default.toml words it
        if env in unit_env:
            out.append(f"# (set by the unit; built in: {config.default_text(key) or 'empty'})")
            out.append(f"#{env}={unit_env[env]}")
        else:
            out.append(f"#{env}={config.default_text(key)}")
    return "\n".join(out) + "\n"


def _env_file_values() -> dict[str, str]:
    """The variables of deploy/fleetmate.env as if every commented setting were uncommented."""
    values = {}
    for line in ENV_FILE.read_text().splitlines():
        match = re.fullmatch(r"#?(FLEETMATE_[A-Z0-9_]+)=(.*)", line)
        if match:
            assert match.group(1) not in values, f"{match.group(1)} twice"
            values[match.group(1)] = match.group(2)
    return values


def _verify(unit: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` on a copy of unit whose ExecStart runs this checkout's fleetmate."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: `make test-deps` installs Debian's systemd package"
    here = Path(sys.executable).parent / "fleetmate"
    assert here.exists(), f"{here}: the fleetmate console script (pip install -e .)"
    copy = tmp_path / unit.name
    text = unit.read_text()
    assert f"ExecStart={INSTALLED} " in text
    copy.write_text(text.replace(f"ExecStart={INSTALLED} ", f"ExecStart={here} "))
    return subprocess.run(
        [analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("unit", [SERVE_UNIT, AGENT_UNIT], ids=lambda p: p.name)
def test_systemd_units_verify_cleanly(unit: Path, tmp_path: Path) -> None:
    result = _verify(unit, tmp_path)
    # verify exits 0 on unknown keys and bad values, only warning: any output is a failure.
    assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), result.stderr


def test_systemd_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key, a bad value, a missing binary are reported."""
    broken = tmp_path / "src" / "fleetmate.service"
    broken.parent.mkdir()
    broken.write_text(SERVE_UNIT.read_text().replace("Restart=on-failure", "Restart=sometimes\nRestartSecs=2"))
    result = _verify(broken, tmp_path)
    assert "sometimes" in result.stderr
    assert "RestartSecs" in result.stderr
    missing = tmp_path / "missing.service"
    missing.write_text(SERVE_UNIT.read_text())
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(missing)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0
    assert INSTALLED in result.stderr


def test_the_serve_unit_runs_fleetmate_serve_with_the_environment_file() -> None:
    unit = SERVE_UNIT.read_text()
    assert re.search(rf"^ExecStart={INSTALLED} serve$", unit, re.M)
    assert re.search(r"^EnvironmentFile=-?/etc/fleetmate/fleetmate\.env$", unit, re.M)
    assert re.search(r"^RestartPreventExitStatus=2$", unit, re.M)  # a configuration error is not retried
    assert re.search(r"^KillMode=mixed$", unit, re.M)  # fleetmate stops its workers and nats-server itself
    assert re.search(r"^StateDirectory=fleetmate$", unit, re.M)
    assert _unit_environment(unit)["FLEETMATE_DATA_DIR"] == "/var/lib/fleetmate"
    assert re.search(r"^User=fleetmate$", unit, re.M)


def test_the_environment_file_documents_every_variable_with_its_default() -> None:
    from app.config import env_keys

    assert ENV_FILE.read_text() == render_env_file(), "deploy/fleetmate.env is stale: python -m tests.test_deploy_files"
    lines = ENV_FILE.read_text().splitlines()
    values = _env_file_values()
    assert list(values) == list(env_keys())  # every variable, once, in the schema's order
    for i, line in enumerate(lines):
        assert not line or line.startswith("#"), f"line {i + 1} sets a value: {line}"  # all commented out
        if re.match(r"#FLEETMATE_", line):
            assert lines[i - 1].startswith("# "), f"{line} has no documentation above"


def test_the_environment_file_uncommented_gives_the_defaults(tmp_path: Path) -> None:
    """Uncommenting every line must start fleetmate as the unit would without the file."""
    from app import config

    values = _env_file_values()
    unit_env = _unit_environment(SERVE_UNIT.read_text())
    data = str(tmp_path / "data")
    with_file = config.load(None, {**values, "FLEETMATE_DATA_DIR": data})
    without = config.load(None, {**unit_env, "FLEETMATE_DATA_DIR": data})
    assert with_file == without


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


if __name__ == "__main__":
    ENV_FILE.write_text(render_env_file())
    print(f"wrote {ENV_FILE}")
