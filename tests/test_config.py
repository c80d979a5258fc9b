"""The configuration loader: defaults, files, environment, and every bad value stopping start-up."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import msgspec
import pytest

from app import config
from tests.harness import run_cli


def test_default_toml_matches_struct_defaults() -> None:
    # A wheel install has no config/default.toml: the Struct defaults must say the same.
    with config.DEFAULT_TOML.open("rb") as fh:
        from_file = msgspec.convert(tomllib.load(fh), config.Config)
    assert from_file == config.Config()


def test_every_key_is_documented_in_default_toml() -> None:
    lines = config.DEFAULT_TOML.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+ = ", line):
            assert lines[i - 1].startswith("#"), f"key without a comment: {line}"
    keys = set(config.env_keys().values())
    text = config.DEFAULT_TOML.read_text()
    for key in keys:
        assert re.search(rf"^{key.rsplit('.', 1)[-1]} = ", text, re.M), key


def test_env_names_cover_every_key() -> None:
    keys = config.env_keys()
    assert keys["FLEETMATE_HTTP_PORT"] == "http.port"
    assert keys["FLEETMATE_NATS_URL"] == "nats.url"
    assert keys["FLEETMATE_DATA_DIR"] == "data_dir"
    assert keys["FLEETMATE_NODE_ID"] == "node_id"
    assert keys["FLEETMATE_LOG_LEVEL"] == "log_level"
    assert keys["FLEETMATE_NATS_SYNC_ALWAYS"] == "nats.sync_always"


def test_precedence_file_then_env(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('log_level = "debug"\n[http]\nport = 1234\nhost = "localhost"\n')
    env = {"FLEETMATE_DATA_DIR": str(tmp_path / "d"), "FLEETMATE_HTTP_PORT": "4321"}
    cfg = config.load(path, env)
    assert cfg.log_level == "debug"
    assert cfg.http.port == 4321
    assert cfg.http.host == "localhost"
    assert cfg.data_path == (tmp_path / "d").resolve()


def test_env_lists_and_bools(tmp_path: Path) -> None:
    env = {
        "FLEETMATE_DATA_DIR": str(tmp_path),
        "FLEETMATE_NATS_URL": "nats://a:4222, nats://b:4222",
        "FLEETMATE_NATS_SYNC_ALWAYS": "false",
        "FLEETMATE_AUTH_TOKENS": "read:readsecret1,admin:adminsecret1",
    }
    cfg = config.load(None, env)
    assert cfg.nats.url == ("nats://a:4222", "nats://b:4222")
    assert not cfg.embedded_nats
    assert cfg.nats.sync_always is False
    assert [t.scope for t in config.parse_tokens(cfg)] == ["read", "admin"]


def test_node_id_defaults_to_host_name(tmp_path: Path) -> None:
    cfg = config.load(None, {"FLEETMATE_DATA_DIR": str(tmp_path)})
    assert config.NODE_ID_RE.match(cfg.node_id)


def test_secrets_masked_in_dict(tmp_path: Path) -> None:
    cfg = config.load(None, {"FLEETMATE_DATA_DIR": str(tmp_path), "FLEETMATE_AUTH_TOKENS": "admin:topsecret99"})
    assert config.to_dict(cfg)["auth"]["tokens"] == ["admin:***"]
    assert "topsecret99" not in config.to_toml(config.to_dict(cfg))
    assert config.secrets(cfg) == ("topsecret99",)


def test_store_secrets_masked_and_redacted(tmp_path: Path) -> None:
    env = {
        "FLEETMATE_DATA_DIR": str(tmp_path),
        "FLEETMATE_SQL_DSN": "mysql://fm:dbpass-77@db:3306/fleet",
        "FLEETMATE_S3_ENDPOINT": "http://minio:9000",
        "FLEETMATE_S3_SECRET_KEY": "s3secret-88",
        "FLEETMATE_LEASE_BACKEND": "sql",
        "FLEETMATE_SNAPSHOT_STORE": "s3",
    }
    cfg = config.load(None, env)
    shown = config.to_toml(config.to_dict(cfg))
    assert "dbpass-77" not in shown
    assert "s3secret-88" not in shown
    assert config.to_dict(cfg)["sql"]["dsn"] == "mysql://fm:***@db:3306/fleet"
    assert set(config.secrets(cfg)) == {"dbpass-77", "s3secret-88"}
    assert config.sql_flavor(cfg.sql.dsn) == "mysql"
    assert config.sql_flavor("postgres://u@h/db") == "postgresql"


BAD_ENV = [
    ({"FLEETMATE_HTTP_PORT": "abc"}, "http.port (FLEETMATE_HTTP_PORT): expected an integer, got 'abc'"),
    ({"FLEETMATE_HTTP_PORT": "70000"}, "http.port (FLEETMATE_HTTP_PORT): must be <= 65535"),
    ({"FLEETMATE_NATS_PORT": "-1"}, "nats.port (FLEETMATE_NATS_PORT): must be >= 0"),
    ({"FLEETMATE_LOG_LEVEL": "loud"}, "log_level (FLEETMATE_LOG_LEVEL): expected one of 'debug', 'info'"),
    ({"FLEETMATE_LOG_FORMAT": "xml"}, "log_format (FLEETMATE_LOG_FORMAT): expected one of 'json', 'text'"),
    ({"FLEETMATE_TELEMETRY_EXPORTER": "jaeger"}, "telemetry.exporter (FLEETMATE_TELEMETRY_EXPORTER)"),
    ({"FLEETMATE_TELEMETRY_EXPORTER": "otlp"}, "telemetry.endpoint: required when telemetry.exporter is 'otlp'"),
    ({"FLEETMATE_TELEMETRY_SAMPLE_RATIO": "2"}, "telemetry.sample_ratio (FLEETMATE_TELEMETRY_SAMPLE_RATIO)"),
    ({"FLEETMATE_NATS_CONNECT_TIMEOUT": "0"}, "nats.connect_timeout (FLEETMATE_NATS_CONNECT_TIMEOUT): must be > 0"),
    ({"FLEETMATE_NATS_SYNC_ALWAYS": "maybe"}, "nats.sync_always (FLEETMATE_NATS_SYNC_ALWAYS): expected true or false"),
    ({"FLEETMATE_NATS_URL": "http://x:1"}, "nats.url (FLEETMATE_NATS_URL): 'http://x:1' is not a nats://host:port URL"),
    ({"FLEETMATE_NODE_ID": "a b"}, "node_id (FLEETMATE_NODE_ID): 'a b' must be 1-64 letters"),
    ({"FLEETMATE_AUTH_TOKENS": "root:whatever99"}, "auth.tokens (FLEETMATE_AUTH_TOKENS): each token must be"),
    ({"FLEETMATE_AUTH_TOKENS": "admin:short"}, "auth.tokens (FLEETMATE_AUTH_TOKENS): a admin token must be at least"),
    ({"FLEETMATE_AUTH_TOKENS_FILE": "/nonexistent/tokens"}, "auth.tokens_file (FLEETMATE_AUTH_TOKENS_FILE): cannot"),
    ({"FLEETMATE_HTTP_HOST": "0.0.0.0"}, "http.host (FLEETMATE_HTTP_HOST): binding 0.0.0.0 (not loopback) needs"),
    ({"FLEETMATE_HTTP_ADVERTISE_URL": "ftp://x"}, "http.advertise_url (FLEETMATE_HTTP_ADVERTISE_URL): 'ftp://x' is"),
    ({"FLEETMATE_HTTP_PROT": "1"}, "FLEETMATE_HTTP_PROT: unknown FLEETMATE_ variable"),
    ({"FLEETMATE_LEASE_BACKEND": "zookeeper"}, "lease.backend (FLEETMATE_LEASE_BACKEND): expected one of 'nats'"),
    ({"FLEETMATE_LEASE_BACKEND": "sql"}, "lease.backend (FLEETMATE_LEASE_BACKEND): 'sql' needs sql.dsn"),
    ({"FLEETMATE_LEASE_BACKEND": "s3"}, "lease.backend (FLEETMATE_LEASE_BACKEND): 's3' needs s3.endpoint"),
    ({"FLEETMATE_LEASE_NAME": "a/b"}, "lease.name (FLEETMATE_LEASE_NAME): "),
    ({"FLEETMATE_SQL_DSN": "sqlite:///x.db"}, "sql.dsn (FLEETMATE_SQL_DSN): must look like mysql://"),
    ({"FLEETMATE_SQL_TABLE_PREFIX": "1; drop"}, "sql.table_prefix (FLEETMATE_SQL_TABLE_PREFIX): "),
    ({"FLEETMATE_S3_ENDPOINT": "minio:9000"}, "s3.endpoint (FLEETMATE_S3_ENDPOINT): 'minio:9000' is not an http(s)"),
    ({"FLEETMATE_S3_BUCKET": "Bad_Bucket"}, "s3.bucket (FLEETMATE_S3_BUCKET): "),
    ({"FLEETMATE_SNAPSHOT_STORE": "tape"}, "snapshot.store (FLEETMATE_SNAPSHOT_STORE): expected one of 'file'"),
    ({"FLEETMATE_SNAPSHOT_STORE": "s3"}, "snapshot.store (FLEETMATE_SNAPSHOT_STORE): 's3' needs s3.endpoint"),
    ({"FLEETMATE_SNAPSHOT_STORE": "mysql"}, "snapshot.store (FLEETMATE_SNAPSHOT_STORE): 'mysql' needs sql.dsn"),
    (
        {"FLEETMATE_SNAPSHOT_STORE": "mysql", "FLEETMATE_SQL_DSN": "postgresql://u@h/db"},
        "snapshot.store (FLEETMATE_SNAPSHOT_STORE): 'mysql' does not match the scheme of sql.dsn",
    ),
    ({"FLEETMATE_SNAPSHOT_KEEP": "0"}, "snapshot.keep (FLEETMATE_SNAPSHOT_KEEP): must be >= 1"),
    ({"FLEETMATE_SNAPSHOT_EVERY_ENTRIES": "-5"}, "snapshot.every_entries (FLEETMATE_SNAPSHOT_EVERY_ENTRIES): must be"),
    (
        {"FLEETMATE_REGISTRY_STREAM_REPLICAS": "7"},
        "registry.stream_replicas (FLEETMATE_REGISTRY_STREAM_REPLICAS): must",
    ),
    (
        {"FLEETMATE_REGISTRY_WATCH_MAX_PENDING": "0"},
        "registry.watch_max_pending (FLEETMATE_REGISTRY_WATCH_MAX_PENDING)",
    ),
    (
        {"FLEETMATE_AGENT_LOG_RULES": '[{"directory": "rel"}]'},
        "agent.log_rules[0].directory: 'rel' must be an absolute",
    ),
    ({"FLEETMATE_AGENT_LOG_RULES": "nope"}, "agent.log_rules (FLEETMATE_AGENT_LOG_RULES): expected a JSON list of"),
    ({"FLEETMATE_AGENT_LOG_RULES": '[{"directory": "/x", "keep_days": -1}]'}, "agent.log_rules[0].keep_days: must be"),
    ({"FLEETMATE_NATS_TOKEN": "short"}, "nats.token (FLEETMATE_NATS_TOKEN): must be at least 8 characters"),
    ({"FLEETMATE_NATS_TOKEN_FILE": "/nonexistent/t"}, "nats.token_file (FLEETMATE_NATS_TOKEN_FILE): file not found"),
    ({"FLEETMATE_NATS_TLS_CERT": "/etc/hostname"}, "nats.tls_cert (FLEETMATE_NATS_TLS_CERT): nats.tls_cert and"),
    ({"FLEETMATE_NATS_TLS_CA": "/nonexistent/ca.pem"}, "nats.tls_ca (FLEETMATE_NATS_TLS_CA): file not found"),
    (
        {"FLEETMATE_MEMBERSHIP_DOWN_AFTER": "2", "FLEETMATE_MEMBERSHIP_HEARTBEAT_INTERVAL": "5"},
        "membership.down_after (FLEETMATE_MEMBERSHIP_DOWN_AFTER): must be longer than",
    ),
    (
        {"FLEETMATE_MEMBERSHIP_SUSPECT_AFTER": "0"},
        "membership.suspect_after (FLEETMATE_MEMBERSHIP_SUSPECT_AFTER): must",
    ),
    ({"FLEETMATE_METRICS_BATCH_POINTS": "0"}, "metrics.batch_points (FLEETMATE_METRICS_BATCH_POINTS): must be >= 1"),
    ({"FLEETMATE_METRICS_ROLLUP_STEP": "0.5"}, "metrics.rollup_step (FLEETMATE_METRICS_ROLLUP_STEP): must be >= 1"),
    ({"FLEETMATE_HA_SECRETS_FILE": "/nonexistent/s.toml"}, "ha.secrets_file (FLEETMATE_HA_SECRETS_FILE): file not"),
    ({"FLEETMATE_HA_POLL_INTERVAL": "0"}, "ha.poll_interval (FLEETMATE_HA_POLL_INTERVAL): must be >= 0.1"),
    ({"FLEETMATE_HA_REJOIN": "maybe"}, "ha.rejoin (FLEETMATE_HA_REJOIN)"),
    ({"FLEETMATE_HA_REJOIN_TIMEOUT": "0"}, "ha.rejoin_timeout (FLEETMATE_HA_REJOIN_TIMEOUT): must be > 0"),
]


def test_nats_token_and_ha_passwords_masked_and_redacted(tmp_path: Path) -> None:
    env = {
        "FLEETMATE_DATA_DIR": str(tmp_path),
        "FLEETMATE_NATS_TOKEN": "natstoken-123",
        "FLEETMATE_HA_PASSWORD": "hapass-456",
        "FLEETMATE_HA_REPLICATION_PASSWORD": "replpass-789",
    }
    cfg = config.load(None, env)
    shown = config.to_toml(config.to_dict(cfg))
    for secret in ("natstoken-123", "hapass-456", "replpass-789"):
        assert secret not in shown
        assert secret in config.secrets(cfg)
    assert config.to_dict(cfg)["ha"]["password"] == "***"


def test_log_rules_from_env_are_a_json_list(tmp_path: Path) -> None:
    rules = '[{"name": "binlogs", "directory": "/var/log/mysql", "pattern": "*.log.*", "keep_days": 7}]'
    cfg = config.load(None, {"FLEETMATE_DATA_DIR": str(tmp_path), "FLEETMATE_AGENT_LOG_RULES": rules})
    (rule,) = cfg.agent.log_rules
    assert (rule.name, rule.directory, rule.pattern, rule.keep_days) == ("binlogs", "/var/log/mysql", "*.log.*", 7)
    assert 'name = "binlogs"' in config.to_toml(config.to_dict(cfg))


@pytest.mark.parametrize(
    ("env", "message"), BAD_ENV, ids=[next(iter(e)) + "=" + next(iter(e.values())) for e, _ in BAD_ENV]
)
def test_bad_env_value_raises_naming_the_key(tmp_path: Path, env: dict[str, str], message: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.load(None, {"FLEETMATE_DATA_DIR": str(tmp_path), **env})
    assert str(err.value).startswith(message), str(err.value)


def test_unwritable_data_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(config.ConfigError) as err:
        config.load(None, {"FLEETMATE_DATA_DIR": str(blocker / "sub")})
    assert str(err.value).startswith("data_dir (FLEETMATE_DATA_DIR): ")
    assert "not writable" in str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[http]\nport = "x"\n', "http.port: expected an integer, got a value of type str"),
        ("[http]\nbogus = 1\n", "http.bogus: unknown key in"),
        ("surprise = 1\n", "surprise: unknown key in"),
        ("http = 3\n", "http: expected a table in"),
        ("[nats]\nurl = [1]\n", "nats.url: "),
        ("this is not toml", "--config: "),
    ],
)
def test_bad_config_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as err:
        config.load(path, {"FLEETMATE_DATA_DIR": str(tmp_path)})
    assert str(err.value).startswith(message), str(err.value)


# The same through the real command: exit code 2 and one line naming the key.
@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"FLEETMATE_HTTP_PORT": "abc"}, "http.port (FLEETMATE_HTTP_PORT)"),
        ({"FLEETMATE_LOG_LEVEL": "loud"}, "log_level (FLEETMATE_LOG_LEVEL)"),
        ({"FLEETMATE_DATA_DIR": "/proc/forbidden/data"}, "data_dir (FLEETMATE_DATA_DIR)"),
        ({"FLEETMATE_HTTP_HOST": "0.0.0.0"}, "http.host (FLEETMATE_HTTP_HOST)"),
    ],
)
def test_serve_exits_2_on_bad_value(tmp_path: Path, env: dict[str, str], key: str) -> None:
    full = {"FLEETMATE_DATA_DIR": str(tmp_path / "data"), **env}
    result = run_cli(["serve"], full, tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"fleetmate: config error: {key}: ")
    assert not (tmp_path / "data" / "nats").exists()  # nothing was started


def test_serve_exits_2_on_missing_config_file(tmp_path: Path) -> None:
    result = run_cli(
        ["serve", "--config", str(tmp_path / "nope.toml")], {"FLEETMATE_DATA_DIR": str(tmp_path)}, tmp_path
    )
    assert result.returncode == 2
    assert result.stderr.startswith("fleetmate: config error: --config: file not found")


def test_config_show_masks_secrets(tmp_path: Path) -> None:
    env = {
        "FLEETMATE_DATA_DIR": str(tmp_path),
        "FLEETMATE_AUTH_TOKENS": "admin:verysecret1",
        "FLEETMATE_HTTP_PORT": "9",
    }
    result = run_cli(["config", "show"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "verysecret1" not in result.stdout
    shown = tomllib.loads(result.stdout)
    assert shown["auth"]["tokens"] == ["admin:***"]
    assert shown["http"]["port"] == 9
    as_json = run_cli(["config", "show", "--json"], env, tmp_path)
    assert msgspec.json.decode(as_json.stdout)["http"]["port"] == 9


def test_config_keys_lists_every_variable(tmp_path: Path) -> None:
    result = run_cli(["config", "keys"], {}, tmp_path)
    assert result.returncode == 0
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows == [[env, key, config.flag_name(key)] for env, key in config.env_keys().items()]
    assert ["FLEETMATE_HTTP_PORT", "http.port", "--http-port"] in rows


# ---- flags ----------------------------------------------------------------------------------------


def test_flags_variables_and_toml_keys_come_from_one_schema() -> None:
    keys = config.key_names()
    assert len(set(keys)) == len(keys)
    assert list(config.env_keys().values()) == keys
    assert list(config.flag_keys().values()) == keys  # one flag per key, none shared
    flags = config.flag_keys()
    for flag, key in [
        ("--http-port", "http.port"),
        ("--zk-port", "zk.port"),
        ("--data-dir", "data_dir"),
        ("--nats-url", "nats.url"),
        ("--log-level", "log_level"),
        ("--registry-rate-limit-total", "registry.rate_limit_total"),
        ("--workers", "workers"),
    ]:
        assert flags[flag] == key
    # Every key has its documentation (shown by --help) in config/default.toml.
    docs = config.key_docs()
    assert set(docs) == set(keys)
    assert all(docs.values())


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('log_level = "debug"\n[http]\nport = 1234\nhost = "localhost"\n[zk]\nport = 1\n')
    env = {"FLEETMATE_DATA_DIR": str(tmp_path / "d"), "FLEETMATE_HTTP_PORT": "4321", "FLEETMATE_ZK_PORT": "2"}
    flags = {"http.port": "5555", "log_level": "warning", "nats.url": "nats://a:1,nats://b:2", "zk.enabled": "false"}
    cfg = config.load(path, env, flags)
    assert cfg.http.port == 5555  # flag over variable over file
    assert cfg.log_level == "warning"  # flag over file
    assert cfg.zk.port == 2  # variable over file
    assert cfg.http.host == "localhost"  # file alone
    assert cfg.nats.url == ("nats://a:1", "nats://b:2")
    assert cfg.zk.enabled is False


BAD_FLAGS = [
    ({"http.port": "abc"}, "http.port (--http-port): expected an integer, got 'abc'"),
    ({"workers": "65"}, "workers (--workers): must be <= 64"),
    ({"log_level": "loud"}, "log_level (--log-level): expected one of 'debug', 'info'"),
    ({"registry.rate_limit_total": "-1"}, "registry.rate_limit_total (--registry-rate-limit-total): must be >= 0"),
    ({"http.host": "0.0.0.0"}, "http.host (--http-host): binding 0.0.0.0 (not loopback) needs"),
    ({"nats.sync_always": "maybe"}, "nats.sync_always (--nats-sync-always): expected true or false"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS, ids=[next(iter(f)) for f, _ in BAD_FLAGS])
def test_bad_flag_value_raises_naming_the_key_and_the_flag(tmp_path: Path, flags: dict[str, str], message: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        # The variable says something valid: the flag wins, so the flag is what is reported.
        config.load(None, {"FLEETMATE_DATA_DIR": str(tmp_path), "FLEETMATE_WORKERS": "1"}, flags)
    assert str(err.value).startswith(message), str(err.value)


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--http-port", "abc"], "http.port (--http-port)"),
        (["--workers", "99"], "workers (--workers)"),
        (["--log-level=loud"], "log_level (--log-level)"),
        (["--data-dir", "/proc/forbidden/data"], "data_dir (--data-dir)"),
        (["--zk-enabled", "perhaps"], "zk.enabled (--zk-enabled)"),
    ],
)
def test_serve_exits_2_on_bad_flag(tmp_path: Path, args: list[str], key: str) -> None:
    result = run_cli(["serve", *args], {"FLEETMATE_DATA_DIR": str(tmp_path / "data")}, tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"fleetmate: config error: {key}: ")
    assert not (tmp_path / "data" / "nats").exists()  # nothing was started


def test_serve_help_lists_every_flag(tmp_path: Path) -> None:
    result = run_cli(["serve", "--help"], {}, tmp_path)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines
    for flag, key in config.flag_keys().items():
        assert f"{flag} " in text, flag
        assert f"${config.env_name(key)}]" in text, key
    assert "--config PATH" in text
    # Abbreviations are refused: a typo is an error, not another key.
    assert run_cli(["serve", "--http-p", "1"], {}, tmp_path).returncode == 2


def test_config_show_takes_the_flags_over_the_variables(tmp_path: Path) -> None:
    env = {"FLEETMATE_DATA_DIR": str(tmp_path), "FLEETMATE_HTTP_PORT": "8", "FLEETMATE_ZK_ENABLED": "false"}
    result = run_cli(["config", "show", "--http-port", "9", "--zk-enabled", "--nats-sync-always=false"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    shown = tomllib.loads(result.stdout)
    assert shown["http"]["port"] == 9
    assert shown["zk"]["enabled"] is True  # a boolean flag alone means true
    assert shown["nats"]["sync_always"] is False


def test_auto_workers_leave_a_core_to_the_embedded_nats_server(tmp_path: Path) -> None:
    embedded = config.load(None, {"FLEETMATE_DATA_DIR": str(tmp_path)})
    external = config.load(None, {"FLEETMATE_DATA_DIR": str(tmp_path), "FLEETMATE_NATS_URL": "nats://n1:4222"})
    assert embedded.workers == 0
    assert [config.auto_workers(embedded, n) for n in (1, 2, 8)] == [1, 1, 7]
    assert [config.auto_workers(external, n) for n in (1, 2, 8)] == [1, 2, 8]


# ---- output into a pipe that closes -------------------------------------------------------------


def _into_closed_pipe(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run fleetmate with stdout on a pipe whose reader is already gone (what `| head -1` leads to)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [sys.executable, "-m", "app", *args],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd,
            timeout=30,
            check=False,
        )
    finally:
        os.close(write)


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    for args in (["config", "keys"], ["config", "show", "--data-dir", str(tmp_path)]):
        result = _into_closed_pipe(args, tmp_path)
        assert (result.returncode, result.stderr) == (141, ""), args  # 128 + SIGPIPE, as `yes | head` gives
    piped = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {shlex.quote(sys.executable)} -m app config keys | head -1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=30,
        check=False,
    )
    assert piped.stdout.startswith("FLEETMATE_NODE_ID ")
    assert piped.stderr == ""
    assert piped.returncode in (0, 141)  # 0 when everything fit in the pipe before head left
