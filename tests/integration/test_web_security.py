"""--web.config.file: TLS, client certificates (and their allowed SANs) and basic auth on every
path; a real Prometheus scrapes through both; a key the exporter cannot honour is exit 2."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest
import requests
import structlog
import yaml

from exporter.config import ConfigError, ListenAddress
from exporter.metrics import build_registry
from exporter.server import ExporterServer
from exporter.views import CounterState, ProjectView
from exporter.webconfig import load_web_config
from tests.helpers import ROOT, free_port, wait_for

PASSWORD = "s3cret-scrape-password"
PATHS = ("/", "/metrics", "/-/healthy", "/-/ready", "/nope")
# Client certificates signed by the test CA, by name: the extension file of each.
SAN_CLIENTS = {
    "scraper": "subjectAltName=DNS:scraper.example,URI:spiffe://example.org/prometheus",
    # ssl shows this SAN as 2001:DB8:0:0:0:0:0:1; the toolkit compares Go's 2001:db8::1.
    "ipv6-scraper": "subjectAltName=IP:2001:db8:0:0:0:0:0:1",
    "intruder": "subjectAltName=DNS:intruder.example,IP:127.0.0.1,"
    "email:intruder@example.org,URI:spiffe://example.org/intruder",
}
ALLOWED_SANS = ["scraper.example", "2001:db8::1", "ops@example.org"]


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1, a client certificate without SANs and those of
    SAN_CLIENTS, all from openssl."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not installed: run `make test` (it installs it)")
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.crt", "-days", "2", "-subj", "/CN=test-ca", cwd=d)  # fmt: skip
    clients = (("server", "subjectAltName=IP:127.0.0.1"), ("client", ""), *SAN_CLIENTS.items())
    for name, extra in clients:
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                f"{name}.csr", "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        (d / f"{name}.ext").write_text(extra + "\n" if extra else "basicConstraints=CA:FALSE\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile",
                f"{name}.ext", cwd=d)  # fmt: skip
    return d


def web_config(pki: Path, **sections: object) -> Path:
    path = pki / f"web-{len(list(pki.glob('web-*')))}.yml"
    path.write_text(yaml.safe_dump(sections))
    return path


def serve(config: Path) -> Iterator[str]:
    view = ProjectView(name="p", polled=True, up=True)
    registry = build_registry(lambda: [view], CounterState.zero)
    web = load_web_config(str(config))
    server = ExporterServer(
        ListenAddress("127.0.0.1", 0), registry, lambda: [view], lambda: True, web
    )
    server.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.stop()


HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()


@pytest.fixture
def tls_and_auth(pki: Path) -> Iterator[str]:
    config = web_config(
        pki,
        tls_server_config={"cert_file": "server.crt", "key_file": "server.key"},
        basic_auth_users={"prometheus": HASH},
    )
    yield from serve(config)


def test_basic_auth_on_every_path(tls_and_auth: str, pki: Path) -> None:
    ca = str(pki / "ca.crt")
    for path in PATHS:
        url = f"https://{tls_and_auth}{path}"
        none = requests.get(url, verify=ca, timeout=5)
        assert none.status_code == 401, path
        assert none.headers["WWW-Authenticate"].startswith("Basic")
        wrong = requests.get(url, verify=ca, auth=("prometheus", "nope"), timeout=5)
        assert wrong.status_code == 401, path
        other = requests.get(url, verify=ca, auth=("admin", PASSWORD), timeout=5)
        assert other.status_code == 401, path
        right = requests.get(url, verify=ca, auth=("prometheus", PASSWORD), timeout=5)
        assert right.status_code == (404 if path == "/nope" else 200), path


def test_plain_http_is_refused_when_tls_is_on(tls_and_auth: str) -> None:
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://{tls_and_auth}/metrics", timeout=5)


def test_a_stalled_tls_handshake_does_not_block_other_clients(tls_and_auth: str, pki: Path) -> None:
    host, port = tls_and_auth.split(":")
    stalled = socket.create_connection((host, int(port)))  # connects, never says hello
    try:
        response = requests.get(
            f"https://{tls_and_auth}/-/healthy",
            verify=str(pki / "ca.crt"),
            auth=("prometheus", PASSWORD),
            timeout=5,
        )
        assert response.status_code == 200
    finally:
        stalled.close()


def test_client_certificates_are_required_and_verified(pki: Path) -> None:
    config = web_config(
        pki,
        tls_server_config={
            "cert_file": "server.crt",
            "key_file": "server.key",
            "client_auth_type": "RequireAndVerifyClientCert",
            "client_ca_file": "ca.crt",
            "min_version": "TLS12",
        },
    )
    for address in serve(config):
        url = f"https://{address}/metrics"
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(url, verify=str(pki / "ca.crt"), timeout=5)
        ok = requests.get(
            url,
            verify=str(pki / "ca.crt"),
            cert=(str(pki / "client.crt"), str(pki / "client.key")),
            timeout=5,
        )
        assert ok.status_code == 200
        assert "signalwire_up" in ok.text


def test_min_version_is_enforced(pki: Path) -> None:
    config = web_config(
        pki,
        tls_server_config={
            "cert_file": "server.crt",
            "key_file": "server.key",
            "min_version": "TLS13",
        },
    )
    for address in serve(config):
        host, port = address.split(":")
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        with (
            pytest.raises(ssl.SSLError),
            socket.create_connection((host, int(port)), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            pass


@pytest.mark.parametrize(
    ("sections", "key"),
    [
        ({"tls_server_config": {"cert_file": "server.crt"}}, "tls_server_config.key_file"),
        ({"tls_server_config": {"cert_file": "x.crt", "key_file": "x.key"}}, "cert_file"),
        ({"basic_auth_users": {"u": "plaintext"}}, "basic_auth_users.u"),
        ({"basic_auth": {"u": HASH}}, "basic_auth"),
        (
            {
                "tls_server_config": {
                    "cert_file": "server.crt",
                    "key_file": "server.key",
                    "client_auth_type": "Sometimes",
                }
            },
            "client_auth_type",
        ),
        (
            {
                "tls_server_config": {
                    "cert_file": "server.crt",
                    "key_file": "server.key",
                    "min_version": "TLS99",
                }
            },
            "min_version",
        ),
    ],
)
def test_a_bad_web_config_is_a_clear_error(
    pki: Path, sections: dict[str, object], key: str
) -> None:
    path = web_config(pki, **sections)
    with pytest.raises(ConfigError) as info:
        load_web_config(str(path))
    assert str(info.value).startswith(str(path))
    assert key in str(info.value)


def run_with_web_config(path: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`python -m exporter run` with a valid configuration and the web configuration `path`."""
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {"projects": [{"name": "p", "space": "x", "project_id": "i", "api_token": "t"}]}
        )
    )
    return subprocess.run(
        [sys.executable, "-m", "exporter", "run", "--config.file", str(config),
         "--web.config.file", str(path), "--web.listen-address", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def test_a_bad_web_config_exits_2_with_one_line(pki: Path, tmp_path: Path) -> None:
    path = web_config(pki, basic_auth_users={"u": "plaintext"})
    result = run_with_web_config(path, tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "basic_auth_users.u" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


TLS_FILES = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (TLS_FILES + "  cipher_suites: [TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384]\n",
         "tls_server_config.cipher_suites"),
        (TLS_FILES + "  curve_preferences: [X25519]\n", "tls_server_config.curve_preferences"),
        ("tls_server_config:\n  cert: PEM\n  key_file: server.key\n", "tls_server_config.cert"),
        ("tls_server_config:\n  cert_file: server.crt\n  key: PEM\n", "tls_server_config.key"),
        ("rate_limit:\n  interval: 1s\n  burst: 20\n", "rate_limit"),
        ("http_server_config:\n  http2: true\n", "http_server_config.http2"),
    ],
)  # fmt: skip
def test_a_toolkit_key_this_exporter_cannot_honour_exits_2_naming_it(
    pki: Path, tmp_path: Path, text: str, key: str
) -> None:
    path = pki / f"unsupported-{key}.yml"
    path.write_text(text)
    result = run_with_web_config(path, tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{path}: {key}: " in lines[0] and "not supported" in lines[0], lines[0]


def test_a_key_written_twice_exits_2_naming_file_and_line(pki: Path, tmp_path: Path) -> None:
    path = pki / "twice.yml"
    path.write_text(TLS_FILES + "  client_auth_type: NoClientCert\n  cert_file: other.crt\n")
    result = run_with_web_config(path, tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{path}: line 5, column 3: " in lines[0] and "'cert_file'" in lines[0], lines[0]


def allowed_sans_config(pki: Path, auth_type: str = "RequireAndVerifyClientCert") -> Path:
    return web_config(
        pki,
        tls_server_config={
            "cert_file": "server.crt",
            "key_file": "server.key",
            "client_auth_type": auth_type,
            "client_ca_file": "ca.crt",
            "client_allowed_sans": ALLOWED_SANS,
        },
    )


def get_with(pki: Path, address: str, client: str | None) -> requests.Response:
    cert = None if client is None else (str(pki / f"{client}.crt"), str(pki / f"{client}.key"))
    return requests.get(
        f"https://{address}/metrics", verify=str(pki / "ca.crt"), cert=cert, timeout=5
    )


def test_client_allowed_sans_serves_a_listed_san_and_refuses_the_others(pki: Path) -> None:
    for address in serve(allowed_sans_config(pki)):
        with structlog.testing.capture_logs() as logs:
            for client in ("scraper", "ipv6-scraper"):
                ok = get_with(pki, address, client)
                assert ok.status_code == 200, client
                assert "signalwire_up" in ok.text
            # Signed by the same CA, but no SAN in the list (or no SAN at all): refused.
            for client in ("intruder", "client"):
                with pytest.raises(requests.ConnectionError):
                    get_with(pki, address, client)
        refusals = [e for e in logs if e["log_level"] == "warning"]
        assert [e["subject"] for e in refusals] == ["CN=intruder", "CN=client"], logs
        assert "client_allowed_sans" in refusals[0]["event"]
        assert "intruder.example" in refusals[0]["sans"]


def test_a_refused_client_is_closed_before_its_request_is_read(pki: Path) -> None:
    for address in serve(allowed_sans_config(pki)):
        host, port = address.split(":")
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        context.load_cert_chain(str(pki / "intruder.crt"), str(pki / "intruder.key"))
        received = b""
        with (
            contextlib.suppress(OSError),  # ssl.SSLError and resets are OSErrors
            socket.create_connection((host, int(port)), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            # With TLS 1.3 the client's handshake ends before the server has checked its
            # certificate, so the request may go out; nothing may come back.
            tls.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            while chunk := tls.recv(4096):
                received += chunk
        assert received == b""


def test_client_allowed_sans_with_verify_if_given_refuses_a_client_without_certificate(
    pki: Path,
) -> None:
    for address in serve(allowed_sans_config(pki, "VerifyClientCertIfGiven")):
        assert get_with(pki, address, "scraper").status_code == 200
        for client in (None, "intruder"):
            with pytest.raises(requests.ConnectionError):
                get_with(pki, address, client)


def test_an_inline_client_ca_verifies_client_certificates(pki: Path) -> None:
    config = web_config(
        pki,
        tls_server_config={
            "cert_file": "server.crt",
            "key_file": "server.key",
            "client_auth_type": "RequireAndVerifyClientCert",
            "client_ca": (pki / "ca.crt").read_text(),
        },
    )
    for address in serve(config):
        assert get_with(pki, address, "client").status_code == 200
        with pytest.raises(requests.ConnectionError):
            get_with(pki, address, None)


def test_max_version_is_enforced(pki: Path) -> None:
    config = web_config(
        pki,
        tls_server_config={
            "cert_file": "server.crt",
            "key_file": "server.key",
            "max_version": "TLS12",
        },
    )
    for address in serve(config):
        host, port = address.split(":")
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        with (
            pytest.raises(ssl.SSLError),
            socket.create_connection((host, int(port)), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=host),
        ):
            pass


@pytest.mark.parametrize(("written", "server_order"), [("false", False), ("true", True)])
def test_prefer_server_cipher_suites_sets_who_picks_the_cipher(
    pki: Path, written: str, server_order: bool
) -> None:
    path = pki / f"prefer-{written}.yml"
    path.write_text(TLS_FILES + f"  prefer_server_cipher_suites: {written}\n")
    context = load_web_config(str(path)).tls
    assert context is not None
    assert bool(context.options & ssl.OP_CIPHER_SERVER_PREFERENCE) is server_order


def test_real_prometheus_scrapes_through_tls_and_basic_auth(
    tls_and_auth: str, pki: Path, tmp_path: Path
) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.fail("prometheus is not installed: run `make test` (it installs it)")
    (tmp_path / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "signalwire",
                        "scheme": "https",
                        "tls_config": {"ca_file": str(pki / "ca.crt")},
                        "basic_auth": {"username": "prometheus", "password": PASSWORD},
                        "static_configs": [{"targets": [tls_and_auth]}],
                    }
                ],
            }
        )
    )
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=log,
    )  # fmt: skip
    try:

        def scraped() -> bool:
            result = requests.get(
                f"http://127.0.0.1:{port}/api/v1/query",
                params={"query": 'signalwire_up{job="signalwire"}'},
                timeout=2,
            ).json()["data"]["result"]
            return bool(result) and result[0]["value"][1] == "1"

        wait_for(scraped, 60, "Prometheus scraping through TLS and basic auth")
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        log.close()


def test_concurrent_scrapes_with_auth_stay_fast(tls_and_auth: str, pki: Path) -> None:
    errors: list[BaseException] = []

    def scrape() -> None:
        try:
            response = requests.get(
                f"https://{tls_and_auth}/metrics",
                verify=str(pki / "ca.crt"),
                auth=("prometheus", PASSWORD),
                timeout=5,
            )
            assert response.status_code == 200
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=scrape) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
