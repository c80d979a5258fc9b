"""TLS on the HTTPS gateway and the ZooKeeper secure port: curl, httpx, the shell, kazoo and Curator, with and
without client certificates; the ZooKeeper checks run against a real ZooKeeper 3.8 with secureClientPort too."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from kazoo.client import KazooClient
from kazoo.handlers.threading import KazooTimeoutError

from app.cli.shell_client import RegistryClient, WatchMessage
from bench.zkserver import ZooKeeper, four_letter, zookeeper_classpath
from tests.harness import ROOT, Fleetmate, free_port, run_cli, running, wait_for
from tests.harness.tlscerts import CertAuthority, Pair, have_openssl
from tests.test_curator import RESULT, SCENARIOS, Classes, curator_check  # noqa: F401  (a fixture, used below)

pytestmark = pytest.mark.skipif(not have_openssl(), reason="the openssl command makes the test certificates")

JAVA_DIR = Path("/usr/share/java")
# What ZooKeeper's Netty server and client need besides the jars zookeeper.jar's manifest names.
NETTY_JARS = ("netty-codec.jar", "netty-resolver.jar", "netty-transport-native-unix-common.jar")
SERVERS = ("zookeeper", "fleetmate")
# Curator over TLS: every scenario of tests/test_curator.py (the same program), with the Java client's
# TLS settings as system properties; its proxy scenarios relay the TLS bytes unchanged.
CURATOR_TLS_SCENARIOS = SCENARIOS


@dataclass(frozen=True)
class Certs:
    """The test PKI: a CA, a server and a client certificate it signed, and a client of another CA."""

    ca: Path
    server: Pair
    client: Pair
    stranger: Pair  # signed by another CA


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """Certificates made for this module with the openssl command."""
    base = tmp_path_factory.mktemp("pki")
    ca = CertAuthority(base / "ca")
    other = CertAuthority(base / "other", "other CA")
    return Certs(
        ca.cert, ca.issue("server", server=True), ca.issue("client", server=False), other.issue("client", server=False)
    )


def client_context(certs: Certs, pair: Pair | None = None) -> ssl.SSLContext:
    """A client context trusting the test CA, presenting pair when given."""
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    if pair is not None:
        ctx.load_cert_chain(str(pair.cert), str(pair.key))
    return ctx


def hostport(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


# ---- servers --------------------------------------------------------------------------------------------


@dataclass
class Target:
    """A server under test: its ZooKeeper TLS address, its plaintext one, and (fleetmate) its HTTPS URL."""

    name: str
    secure: str
    plain: str = ""
    url: str = ""
    log: Any = None  # a callable returning the server's log tail, for failure messages


class ZooKeeperTls(ZooKeeper):
    """A real ZooKeeper 3.8 with secureClientPort: Netty connection factory, PEM key and trust stores."""

    def __init__(self, classpath: str, certs: Certs, client_auth: str) -> None:
        super().__init__(classpath)
        self.secure_port = free_port()
        self.certs = certs
        self.client_auth = client_auth  # ZooKeeper's ssl.clientAuth: none, want or need

    def config(self) -> str:
        # zoo.cfg keys ZooKeeper does not know become system properties prefixed with "zookeeper."
        # (ssl.keyStore.location -> zookeeper.ssl.keyStore.location), which its X509Util reads.
        lines = [
            f"secureClientPort={self.secure_port}",
            "serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory",
            f"ssl.keyStore.location={self.certs.server.combined()}",
            "ssl.keyStore.type=PEM",
            f"ssl.trustStore.location={self.certs.ca}",
            "ssl.trustStore.type=PEM",
            f"ssl.clientAuth={self.client_auth}",
        ]
        return super().config() + "\n".join(lines) + "\n"


def zookeeper_tls_classpath() -> str | None:
    base = zookeeper_classpath()
    if base is None or not all((JAVA_DIR / jar).exists() for jar in NETTY_JARS):
        return None
    return ":".join([base, *(str(JAVA_DIR / jar) for jar in NETTY_JARS)])


def fleetmate_env(certs: Certs, client_ca: bool) -> dict[str, str]:
    """HTTPS and the ZooKeeper secure port; with client_ca, both want client certificates and the
    plaintext ZooKeeper port is off."""
    env = {
        "FLEETMATE_HTTP_TLS_CERT": str(certs.server.cert),
        "FLEETMATE_HTTP_TLS_KEY": str(certs.server.key),
        "FLEETMATE_ZK_SECURE_ENABLED": "true",
        "FLEETMATE_ZK_SECURE_PORT": "0",
    }
    if client_ca:
        env |= {
            "FLEETMATE_HTTP_TLS_CLIENT_CA": str(certs.ca),
            "FLEETMATE_ZK_TLS_CLIENT_CA": str(certs.ca),
            "FLEETMATE_ZK_PLAINTEXT_ENABLED": "false",
        }
    return env


@contextlib.contextmanager
def serving(kind: str, certs: Certs, workdir: Path, client_auth: bool) -> Iterator[Target]:
    """A fleetmate or a real ZooKeeper with a TLS client port (client certificates required with client_auth)."""
    if kind == "zookeeper":
        classpath = zookeeper_tls_classpath()
        if classpath is None:
            pytest.fail("no ZooKeeper 3.8 with Netty: install Debian's zookeeper package (make test-deps does)")
        zk = ZooKeeperTls(classpath, certs, "need" if client_auth else "none")
        try:
            zk.start()
            yield Target(
                "zookeeper",
                f"127.0.0.1:{zk.secure_port}",
                f"127.0.0.1:{zk.port}",
                log=lambda: zk.log.read_text(errors="replace")[-3000:],
            )
        finally:
            zk.stop()
        return
    with running(Fleetmate(workdir, env=fleetmate_env(certs, client_auth))) as fm:
        ready = fm.logged("fleetmate ready")[0]
        yield Target("fleetmate", ready["zk_secure"], ready["zk"], fm.url, log=lambda: "\n".join(fm.raw[-30:]))


@pytest.fixture(scope="module", params=SERVERS)
def tls_server(
    request: pytest.FixtureRequest, certs: Certs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    """A server whose TLS port takes any client that trusts its CA."""
    with serving(request.param, certs, tmp_path_factory.mktemp("tls"), client_auth=False) as target:
        yield target


@pytest.fixture(scope="module", params=SERVERS)
def mtls_server(
    request: pytest.FixtureRequest, certs: Certs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    """A server whose TLS port wants a client certificate signed by the test CA."""
    with serving(request.param, certs, tmp_path_factory.mktemp("mtls"), client_auth=True) as target:
        yield target


@pytest.fixture(scope="module")
def fm_tls(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """fleetmate with HTTPS and a ZooKeeper secure port, no client certificates asked for."""
    with serving("fleetmate", certs, tmp_path_factory.mktemp("fm-tls"), client_auth=False) as target:
        yield target


@pytest.fixture(scope="module")
def fm_mtls(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """fleetmate wanting client certificates on HTTPS and on its only (TLS) ZooKeeper port."""
    with serving("fleetmate", certs, tmp_path_factory.mktemp("fm-mtls"), client_auth=True) as target:
        yield target


# ---- ZooKeeper clients ----------------------------------------------------------------------------------


def kazoo(address: str, certs: Certs, pair: Pair | None = None) -> KazooClient:
    """A kazoo client over TLS that checks the server's certificate and name against the test CA."""
    return KazooClient(
        hosts=address,
        use_ssl=True,
        ca=str(certs.ca),
        certfile=str(pair.cert) if pair else None,
        keyfile=str(pair.key) if pair else None,
        verify_certs=True,
        check_hostname=True,
        timeout=10,
    )


def tls_word(address: str, word: str, ctx: ssl.SSLContext, timeout: float = 5.0) -> str:
    """A four-letter word's answer over TLS."""
    host, port = hostport(address)
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as s,
    ):
        s.sendall(word.encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def refused(address: str, ctx: ssl.SSLContext) -> bool:
    """True when the server ends the TLS connection instead of answering `ruok` (the handshake fails, or
    with TLS 1.3 the server's alert comes on the first read)."""
    try:
        return tls_word(address, "ruok", ctx) != "imok"
    except (ssl.SSLError, ConnectionError, TimeoutError):
        return True


def kazoo_session(client: KazooClient, path: str) -> None:
    """Create, read, watch and delete through a started client."""
    fired: list[Any] = []
    client.ensure_path(path)
    client.create(f"{path}/node", b"over tls")
    data, stat = client.get(f"{path}/node", watch=fired.append)
    assert data == b"over tls"
    assert stat.version == 0
    client.set(f"{path}/node", b"changed")
    wait_for(lambda: fired, 10, "the data watch to fire")
    assert fired[0].type == "CHANGED"
    client.delete(path, recursive=True)


def test_kazoo_over_tls(tls_server: Target, certs: Certs) -> None:
    """kazoo (use_ssl, ca, verify_certs, check_hostname) creates, reads and watches over the TLS port."""
    client = kazoo(tls_server.secure, certs)
    client.start(timeout=15)
    try:
        kazoo_session(client, "/kazoo-tls")
        assert client.client_state == "CONNECTED"
    finally:
        client.stop()
        client.close()


def test_clients_refuse_a_server_they_do_not_trust(tls_server: Target, certs: Certs, tmp_path: Path) -> None:
    """A client that trusts another CA does not get through the handshake: it checks the certificate."""
    other = CertAuthority(tmp_path / "elsewhere", "elsewhere CA")
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_word(tls_server.secure, "ruok", ssl.create_default_context(cafile=str(other.cert)))
    client = kazoo(tls_server.secure, Certs(other.cert, certs.server, certs.client, certs.stranger))
    with pytest.raises(KazooTimeoutError):
        client.start(timeout=4)
    client.stop()
    client.close()


def test_four_letter_words_over_tls(tls_server: Target, certs: Certs) -> None:
    """ruok and conf answer on the TLS port; conf reports clientPort and secureClientPort as ZooKeeper does."""
    ctx = client_context(certs)
    assert tls_word(tls_server.secure, "ruok", ctx) == "imok"
    conf = dict(line.split("=", 1) for line in tls_word(tls_server.secure, "conf", ctx).splitlines() if "=" in line)
    assert conf["secureClientPort"] == str(hostport(tls_server.secure)[1])
    assert conf["clientPort"] == str(hostport(tls_server.plain)[1])


def test_plaintext_client_gets_nothing_on_the_tls_port(tls_server: Target) -> None:
    """A plaintext four-letter word on the TLS port is not answered (it is not a TLS handshake)."""
    host, port = hostport(tls_server.secure)
    try:
        answer = four_letter(host, port, "ruok", timeout=5)
    except (ConnectionError, TimeoutError):
        answer = ""
    assert answer != "imok"


def test_client_certificate_required(mtls_server: Target, certs: Certs) -> None:
    """With client certificates checked: kazoo with the CA's client certificate works; no certificate, or
    one from another CA, is refused (kazoo cannot start; a raw TLS client gets no answer)."""
    client = kazoo(mtls_server.secure, certs, certs.client)
    client.start(timeout=15)
    try:
        kazoo_session(client, "/kazoo-mtls")
    finally:
        client.stop()
        client.close()
    assert tls_word(mtls_server.secure, "ruok", client_context(certs, certs.client)) == "imok"
    assert refused(mtls_server.secure, client_context(certs)), mtls_server.log()
    assert refused(mtls_server.secure, client_context(certs, certs.stranger)), mtls_server.log()
    for pair in (None, certs.stranger):
        rejected = kazoo(mtls_server.secure, certs, pair)
        with pytest.raises(KazooTimeoutError):
            rejected.start(timeout=4)
        rejected.stop()
        rejected.close()


# ---- Curator (Java) over TLS ----------------------------------------------------------------------------


def _run_curator(classes: Classes, connect: str, props: dict[str, str], scenarios: tuple[str, ...]) -> dict[str, Any]:
    """Run CuratorCheck's scenarios with ZooKeeper's client TLS settings as system properties."""
    netty = ":".join(str(JAVA_DIR / jar) for jar in NETTY_JARS)
    cmd = [
        "java",
        "-XX:+UseSerialGC",
        "-XX:TieredStopAtLevel=1",
        "-Xmx256m",
        "-Djava.net.preferIPv4Stack=true",
        *(f"-D{k}={v}" for k, v in props.items()),
        "-cp",
        f"{classes.classpath}:{netty}",
        "CuratorCheck",
        connect,
        *scenarios,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    results = {
        m.group(2): (m.group(1) == "PASS", m.group(3) or "") for m in map(RESULT.match, done.stdout.splitlines()) if m
    }
    return {"results": results, "output": done.stdout + "\n".join(done.stderr.splitlines()[-40:])}


def curator_tls_props(certs: Certs, pair: Pair | None = None) -> dict[str, str]:
    """ZooKeeper's Java client over TLS: the Netty socket, secure mode, a PEM trust store (3.8 reads PEM),
    and a PEM key store (key then certificate in one file) when a client certificate is presented."""
    props = {
        "zookeeper.clientCnxnSocket": "org.apache.zookeeper.ClientCnxnSocketNetty",
        "zookeeper.client.secure": "true",
        "zookeeper.ssl.trustStore.location": str(certs.ca),
        "zookeeper.ssl.trustStore.type": "PEM",
    }
    if pair is not None:
        props |= {"zookeeper.ssl.keyStore.location": str(pair.combined()), "zookeeper.ssl.keyStore.type": "PEM"}
    return props


@pytest.mark.timeout(900)
def test_curator_over_tls(tls_server: Target, certs: Certs, curator_check: Classes) -> None:  # noqa: F811
    """Curator 5.4 on ZooKeeper's Netty client with a PEM trust store passes its scenarios over TLS.

    On the reference server alone, a failed scenario runs once more: in 1 of 9 runs here ZooKeeper
    3.8's Netty client logged an EOFException during digest_acl, which CuratorCheck counts as a
    dropped connection. fleetmate gets no second try."""
    props = curator_tls_props(certs)
    run = _run_curator(curator_check, tls_server.secure, props, CURATOR_TLS_SCENARIOS)
    failed = {name: why for name, (ok, why) in run["results"].items() if not ok}
    if failed and tls_server.name == "zookeeper":
        warnings.warn(f"ZooKeeper 3.8 (the reference) failed {sorted(failed)} over TLS; once more", stacklevel=1)
        print(run["output"])
        again = _run_curator(curator_check, tls_server.secure, props, tuple(failed))
        run["results"].update(again["results"])
        run["output"] += again["output"]
        failed = {name: why for name, (ok, why) in run["results"].items() if not ok}
    missing = set(CURATOR_TLS_SCENARIOS) - set(run["results"])
    assert not failed, f"{tls_server.name}: {failed}\n{run['output']}\n{tls_server.log()}"
    assert not missing, f"{tls_server.name}: no result for {missing}\n{run['output']}"


@pytest.mark.timeout(900)
def test_curator_with_client_certificate(mtls_server: Target, certs: Certs, curator_check: Classes) -> None:  # noqa: F811
    """Curator presents a client certificate from a PEM key store where the server wants one."""
    run = _run_curator(curator_check, mtls_server.secure, curator_tls_props(certs, certs.client), ("crud", "mutex"))
    assert run["results"] == {"crud": (True, ""), "mutex": (True, "")}, f"{run['output']}\n{mtls_server.log()}"


# ---- HTTPS ----------------------------------------------------------------------------------------------


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", *args], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_curl_https(fm_tls: Target, certs: Certs) -> None:
    """curl --cacert reaches the HTTPS API; without the CA it refuses the server's certificate (exit 60)."""
    assert fm_tls.url.startswith("https://127.0.0.1:")
    ok = curl("--cacert", str(certs.ca), "-w", "%{http_code}", "-o", "/dev/null", fm_tls.url + "/api/v1/health")
    assert (ok.returncode, ok.stdout) == (0, "200"), ok.stderr
    put = curl(
        "--cacert",
        str(certs.ca),
        "--fail-with-body",
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-d",
        '{"data": "via curl"}',
        fm_tls.url + "/api/v1/registry/nodes/curl-tls",
    )
    assert put.returncode == 0, put.stdout + put.stderr
    got = curl("--cacert", str(certs.ca), fm_tls.url + "/api/v1/registry/nodes/curl-tls")
    assert '"via curl"' in got.stdout, got.stdout
    refused_ = curl(fm_tls.url + "/api/v1/health")
    assert refused_.returncode == 60, (refused_.returncode, refused_.stderr)
    plain = curl("http://" + fm_tls.url.removeprefix("https://") + "/api/v1/health")
    assert plain.returncode != 0 or "200" not in plain.stdout


def test_httpx_https(fm_tls: Target, certs: Certs) -> None:
    """httpx with the CA in its context talks to the API; with the system's store alone it cannot."""
    with httpx.Client(verify=client_context(certs), timeout=10) as client:
        assert client.get(fm_tls.url + "/api/v1/health").status_code == 200
        created = client.post(fm_tls.url + "/api/v1/registry/nodes/httpx-tls", json={"data": "via httpx"})
        assert created.status_code == 201, created.text
        assert client.get(fm_tls.url + "/api/v1/registry/nodes/httpx-tls").json()["data"] == "via httpx"
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(fm_tls.url + "/api/v1/health", timeout=10)


def test_shell_with_cacert(fm_tls: Target, certs: Certs, tmp_path: Path) -> None:
    """fleetmate shell and mate-cli over https:// with --cacert (or $FLEETMATE_CACERT); without it, a clear error."""
    done = run_cli(
        ["shell", "--addr", fm_tls.url, "--cacert", str(certs.ca), "-c", "create /shell-tls hi; get /shell-tls"],
        env={},
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "hi" in done.stdout.splitlines()
    by_env = run_cli(
        ["shell", "--addr", fm_tls.url, "get", "/shell-tls"], env={"FLEETMATE_CACERT": str(certs.ca)}, cwd=tmp_path
    )
    assert by_env.returncode == 0, by_env.stderr
    assert by_env.stdout.strip() == "hi"
    mate = subprocess.run(
        [sys.executable, "-m", "app.cli.mate", f"-mate-addr={fm_tls.url}", f"-cacert={certs.ca}", "get", "/shell-tls"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (mate.returncode, mate.stdout.strip()) == (0, "hi"), mate.stderr
    without = run_cli(["shell", "--addr", fm_tls.url, "get", "/shell-tls"], env={}, cwd=tmp_path)
    assert without.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in without.stderr, without.stderr
    assert "--cacert" in without.stderr  # the hint
    missing = run_cli(
        ["shell", "--addr", fm_tls.url, "--cacert", str(tmp_path / "none.pem"), "ls", "/"], env={}, cwd=tmp_path
    )
    assert missing.returncode == 2
    assert "--cacert: file not found" in missing.stderr


def test_cluster_status_and_node_cli_with_cacert(fm_tls: Target, certs: Certs, tmp_path: Path) -> None:
    """The API commands (app/cli/api.py) take --cacert and https:// addresses."""
    status = run_cli(["cluster", "status", "--addr", fm_tls.url, "--cacert", str(certs.ca)], env={}, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "registry: revision" in status.stdout
    nodes = run_cli(
        ["node", "list", "--addr", fm_tls.url, "--json"], env={"FLEETMATE_CACERT": str(certs.ca)}, cwd=tmp_path
    )
    assert nodes.returncode == 0, nodes.stderr
    refused_ = run_cli(["cluster", "status", "--addr", fm_tls.url], env={}, cwd=tmp_path)
    assert refused_.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in refused_.stderr, refused_.stderr


async def test_shell_watch_over_wss(fm_tls: Target, certs: Certs) -> None:
    """The shell's watch WebSocket goes over wss:// with the same context."""
    client = RegistryClient([fm_tls.url], tls=client_context(certs))
    got: asyncio.Queue[WatchMessage] = asyncio.Queue()
    task = asyncio.create_task(client.watch("/wss-tls", True, got.put_nowait))
    try:
        async with asyncio.timeout(15):
            assert (await got.get()).type == "ready"
            await client.create("/wss-tls", "x")
            event = await got.get()
        assert event.path == "/wss-tls"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.aclose()


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_https_client_certificates(fm_mtls: Target, certs: Certs, tmp_path: Path) -> None:
    """With http.tls_client_ca: a client certificate from that CA gets through; none, or another CA's, is refused."""
    url = fm_mtls.url + "/api/v1/health"
    ok = curl(
        "--cacert",
        str(certs.ca),
        "--cert",
        str(certs.client.cert),
        "--key",
        str(certs.client.key),
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        url,
    )
    assert (ok.returncode, ok.stdout) == (0, "200"), ok.stderr
    bare = curl("--cacert", str(certs.ca), url)
    assert bare.returncode != 0, bare.stdout
    stranger = curl(
        "--cacert", str(certs.ca), "--cert", str(certs.stranger.cert), "--key", str(certs.stranger.key), url
    )
    assert stranger.returncode != 0, stranger.stdout
    with httpx.Client(verify=client_context(certs, certs.client), timeout=10) as client:
        assert client.get(url).status_code == 200
    with pytest.raises(httpx.TransportError):
        httpx.get(url, verify=client_context(certs), timeout=10)
    shell = run_cli(
        [
            "shell",
            "--addr",
            fm_mtls.url,
            "--cacert",
            str(certs.ca),
            "--cert",
            str(certs.client.cert),
            "--key",
            str(certs.client.key),
            "ls",
            "/",
        ],
        env={},
        cwd=tmp_path,
    )
    assert shell.returncode == 0, shell.stderr
    no_cert = run_cli(["shell", "--addr", fm_mtls.url, "--cacert", str(certs.ca), "ls", "/"], env={}, cwd=tmp_path)
    assert no_cert.returncode != 0


def test_secure_only_zookeeper_port(fm_mtls: Target, certs: Certs) -> None:
    """zk.plaintext_enabled = false: the ready line has no plaintext address and conf says clientPort=-1."""
    assert fm_mtls.plain == ""
    conf = tls_word(fm_mtls.secure, "conf", client_context(certs, certs.client))
    assert "clientPort=-1\n" in conf
    assert f"secureClientPort={hostport(fm_mtls.secure)[1]}\n" in conf


# ---- configuration ---------------------------------------------------------------------------------------


def _serve_fails(env: dict[str, str], tmp_path: Path) -> str:
    """Run `fleetmate serve` with env; it must stop with exit 2 before starting anything; returns stderr."""
    started = time.monotonic()
    done = run_cli(["serve"], env={"FLEETMATE_DATA_DIR": str(tmp_path / "data"), **env}, cwd=tmp_path)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert time.monotonic() - started < 20
    return done.stderr


def test_bad_tls_files_stop_start_up(certs: Certs, tmp_path: Path) -> None:
    """Each bad TLS setting stops `fleetmate serve` with exit 2 and a line naming the key."""
    pair = {"FLEETMATE_HTTP_TLS_CERT": str(certs.server.cert), "FLEETMATE_HTTP_TLS_KEY": str(certs.server.key)}
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        ["openssl", "pkey", "-in", str(certs.server.key), "-aes256", "-passout", "pass:secret", "-out", str(encrypted)],
        check=True,
        capture_output=True,
    )
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    garbled = tmp_path / "garbled.pem"
    garbled.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    cases = [
        (
            {**pair, "FLEETMATE_HTTP_TLS_CERT": str(tmp_path / "missing.pem")},
            "http.tls_cert (FLEETMATE_HTTP_TLS_CERT): file not found",
        ),
        (
            {**pair, "FLEETMATE_HTTP_TLS_CERT": str(tmp_path)},
            "http.tls_cert (FLEETMATE_HTTP_TLS_CERT): " + f"{tmp_path} is a directory",
        ),
        (
            {**pair, "FLEETMATE_HTTP_TLS_CERT": str(not_pem)},
            "http.tls_cert (FLEETMATE_HTTP_TLS_CERT): " + f"{not_pem} is not a PEM certificate",
        ),
        (
            {**pair, "FLEETMATE_HTTP_TLS_CERT": str(garbled)},
            "http.tls_cert (FLEETMATE_HTTP_TLS_CERT): " + f"{garbled} holds no usable PEM certificate",
        ),
        (
            {**pair, "FLEETMATE_HTTP_TLS_KEY": str(certs.client.key)},
            "http.tls_key (FLEETMATE_HTTP_TLS_KEY): " + f"{certs.client.key} is not the private key",
        ),
        (
            {**pair, "FLEETMATE_HTTP_TLS_KEY": str(certs.server.cert)},
            "http.tls_key (FLEETMATE_HTTP_TLS_KEY): " + f"{certs.server.cert} is not a PEM private key",
        ),
        (
            {**pair, "FLEETMATE_HTTP_TLS_KEY": str(encrypted)},
            "http.tls_key (FLEETMATE_HTTP_TLS_KEY): " + f"{encrypted} is encrypted",
        ),
        (
            {"FLEETMATE_HTTP_TLS_CERT": str(certs.server.cert)},
            "http.tls_key: http.tls_cert and http.tls_key go together",
        ),
        (
            {**pair, "FLEETMATE_HTTP_TLS_CLIENT_CA": str(not_pem)},
            "http.tls_client_ca (FLEETMATE_HTTP_TLS_CLIENT_CA): " + f"{not_pem} is not a PEM CA bundle",
        ),
        (
            {"FLEETMATE_HTTP_TLS_CLIENT_CA": str(certs.ca)},
            "http.tls_client_ca (FLEETMATE_HTTP_TLS_CLIENT_CA): checks the certificates of HTTPS clients",
        ),
        (
            {"FLEETMATE_ZK_SECURE_ENABLED": "true"},
            "zk.secure_enabled (FLEETMATE_ZK_SECURE_ENABLED): needs a certificate",
        ),
        (
            {
                "FLEETMATE_ZK_SECURE_ENABLED": "true",
                "FLEETMATE_ZK_TLS_CERT": str(certs.server.cert),
                "FLEETMATE_ZK_TLS_KEY": str(certs.client.key),
            },
            "zk.tls_key (FLEETMATE_ZK_TLS_KEY): " + f"{certs.client.key} is not the private key",
        ),
        (
            {**pair, "FLEETMATE_ZK_SECURE_ENABLED": "true", "FLEETMATE_ZK_TLS_CLIENT_CA": str(tmp_path / "nope")},
            "zk.tls_client_ca (FLEETMATE_ZK_TLS_CLIENT_CA): file not found",
        ),
        (
            {"FLEETMATE_ZK_PLAINTEXT_ENABLED": "false"},
            "zk.plaintext_enabled (FLEETMATE_ZK_PLAINTEXT_ENABLED): false leaves no ZooKeeper port",
        ),
        (
            {"FLEETMATE_ZK_TLS_CLIENT_CA": str(certs.ca)},
            "zk.tls_client_ca (FLEETMATE_ZK_TLS_CLIENT_CA): is for the secure port",
        ),
    ]
    for env, expected in cases:
        stderr = _serve_fails(env, tmp_path)
        assert f"fleetmate: config error: {expected}" in stderr, (env, stderr)
    flags = run_cli(
        ["serve", "--http-tls-cert", str(certs.server.cert), "--http-tls-key", str(certs.ca)],
        env={"FLEETMATE_DATA_DIR": str(tmp_path / "data")},
        cwd=tmp_path,
    )
    assert flags.returncode == 2
    assert "http.tls_key (--http-tls-key):" in flags.stderr


def test_https_ready_line_and_advertised_url(fm_tls: Target, certs: Certs) -> None:
    """The ready line gives the https:// URL and both ZooKeeper addresses."""
    assert fm_tls.url.startswith("https://")
    assert fm_tls.secure
    assert fm_tls.plain
    assert fm_tls.secure != fm_tls.plain
    # /api/v1/cluster gives both ZooKeeper addresses too, for this replica and in its replica list.
    ctx = ssl.create_default_context(cafile=str(certs.ca))

    def cluster() -> dict[str, Any]:
        answer: dict[str, Any] = httpx.get(fm_tls.url + "/api/v1/cluster", verify=ctx, timeout=10).json()
        return answer

    assert (cluster()["zk_address"], cluster()["zk_secure_address"]) == (fm_tls.plain, fm_tls.secure)
    wait_for(lambda: cluster()["replicas"][0]["zk_secure_address"] == fm_tls.secure or None, 10, "the replica record")


def test_workers_share_the_tls_ports(certs: Certs, tmp_path: Path) -> None:
    """With --workers 2 the supervisor hands every worker the same HTTPS and ZooKeeper TLS ports."""
    fm = Fleetmate(tmp_path, env={**fleetmate_env(certs, client_ca=False), "FLEETMATE_WORKERS": "2"})
    with running(fm):
        ready = fm.logged("fleetmate ready")[-1]
        assert ready["http"].startswith("https://")
        ctx = client_context(certs)
        answers = {tls_word(ready["zk_secure"], "ruok", ctx) for _ in range(6)}
        assert answers == {"imok"}
        with httpx.Client(verify=ctx, timeout=10) as client:
            assert client.get(ready["http"] + "/api/v1/health").status_code == 200
