"""The web configuration file (exporter-toolkit format): how it is read, which keys are refused and
why, and the client_allowed_sans check on certificates as ssl's getpeercert() returns them.

Every case here fails before a certificate would be loaded, so no certificate files are needed;
tests/integration/test_web_security.py serves real TLS connections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from exporter.config import ConfigError
from exporter.webconfig import (
    UNSUPPORTED_KEYS,
    WebConfig,
    certificate_sans,
    certificate_subject,
    load_web_config,
    sans_admit,
)

TLS = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
CLIENT_CERTS = TLS + "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n"


def refused(tmp_path: Path, text: str) -> str:
    path = tmp_path / "web.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_web_config(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    return message.removeprefix(f"{path}: ")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (
            TLS + "  cipher_suites:\n    - TLS_AES_128_GCM_SHA256\n",
            "tls_server_config.cipher_suites",
        ),
        (TLS + "  curve_preferences: [CurveP256]\n", "tls_server_config.curve_preferences"),
        ("tls_server_config:\n  cert: |\n    PEM\n  key_file: k\n", "tls_server_config.cert"),
        ("tls_server_config:\n  cert_file: c\n  key: |\n    PEM\n", "tls_server_config.key"),
        ("rate_limit:\n  interval: 1s\n  burst: 0\n", "rate_limit"),
    ],
)
def test_every_toolkit_key_that_cannot_be_honoured_is_refused_by_name(
    tmp_path: Path, text: str, key: str
) -> None:
    message = refused(tmp_path, text)
    assert message.startswith(f"{key}: not supported by this exporter: "), message
    assert key in UNSUPPORTED_KEYS


def test_a_key_nobody_knows_is_still_an_unknown_key(tmp_path: Path) -> None:
    message = refused(tmp_path, TLS + "  cipher_suite: [X]\n")
    assert message.startswith("tls_server_config.cipher_suite: unknown key; allowed: ")
    allowed = message.split("allowed: ")[1].split(", ")
    assert "client_allowed_sans" in allowed and "cipher_suites" not in allowed


@pytest.mark.parametrize("written", ["true", "yes", "on", "True"])
def test_http2_on_is_refused_because_only_http1_is_served(tmp_path: Path, written: str) -> None:
    message = refused(tmp_path, f"http_server_config:\n  http2: {written}\n")
    assert message.startswith("http_server_config.http2: HTTP/2 is not supported")


@pytest.mark.parametrize("written", ["false", "no", "off", "False"])
def test_http2_off_is_what_is_served_and_accepted(tmp_path: Path, written: str) -> None:
    path = tmp_path / "web.yml"
    path.write_text(
        f"http_server_config:\n  http2: {written}\n  headers:\n    X-Frame-Options: deny\n"
    )
    assert load_web_config(str(path)).headers == {"X-Frame-Options": "deny"}


def test_a_boolean_that_is_not_one_is_refused(tmp_path: Path) -> None:
    message = refused(tmp_path, TLS + "  prefer_server_cipher_suites: maybe\n")
    assert message == "tls_server_config.prefer_server_cipher_suites: must be true or false, " + (
        "not 'maybe'"
    )


@pytest.mark.parametrize(
    "text",
    [
        TLS + "  key_file: other.key\n",
        "basic_auth_users:\n  u: $2y$10$abc\n  u: $2y$10$def\n",
        "http_server_config:\n  headers: {}\nhttp_server_config:\n  http2: false\n",
    ],
)
def test_a_key_written_twice_is_refused_with_its_line(tmp_path: Path, text: str) -> None:
    message = refused(tmp_path, text)
    assert message.startswith("line "), message
    assert "defined twice" in message


def test_values_are_read_as_written(tmp_path: Path) -> None:
    # `no` stays a user name and `0123` a header value: the strict loader keeps scalars as text.
    path = tmp_path / "web.yml"
    path.write_text(
        "basic_auth_users:\n  no: $2y$10$abc\nhttp_server_config:\n  headers:\n    X-Id: 0123\n"
    )
    config = load_web_config(str(path))
    assert config.auth is not None and list(config.auth.users) == ["no"]
    assert config.headers == {"X-Id": "0123"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            "  client_allowed_sans: [a.example]\n",
            "tls_server_config.client_allowed_sans: needs client certificates, but "
            "client_auth_type is NoClientCert",
        ),
        (
            "  client_auth_type: NoClientCert\n  client_ca_file: ca.crt\n",
            "tls_server_config.client_ca_file: is set but client_auth_type is NoClientCert",
        ),
        (
            "  client_auth_type: RequireAndVerifyClientCert\n",
            "tls_server_config.client_ca_file: is required with RequireAndVerifyClientCert",
        ),
        (
            "  client_auth_type: RequireAnyClientCert\n  client_ca_file: ca.crt\n",
            "tls_server_config.client_auth_type: RequireAnyClientCert is not supported",
        ),
        ("  max_version: TLS11\n", "tls_server_config.max_version: TLS11 is below min_version"),
        ("  max_version: TLS14\n", "tls_server_config.max_version: 'TLS14' is not one of"),
    ],
)
def test_tls_settings_that_contradict_each_other_are_refused(
    tmp_path: Path, extra: str, message: str
) -> None:
    assert refused(tmp_path, TLS + extra).startswith(message)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[]", "is empty"),
        ("scraper.example", "must be a list"),
        ("[a.example, [b]]", "is not a SAN"),
        ("\n    -\n", "None is not a SAN"),
    ],
)
def test_a_bad_client_allowed_sans_is_refused(tmp_path: Path, value: str, message: str) -> None:
    text = refused(tmp_path, CLIENT_CERTS + f"  client_allowed_sans: {value}\n")
    assert text.startswith("tls_server_config.client_allowed_sans: "), text
    assert message in text


def test_client_ca_and_client_ca_file_are_one_or_the_other(tmp_path: Path) -> None:
    message = refused(tmp_path, CLIENT_CERTS + "  client_ca: PEM\n")
    assert message == "tls_server_config.client_ca: set client_ca_file or client_ca, not both"


def cert(*sans: tuple[str, str], cn: str = "scraper") -> dict[str, Any]:
    """A verified certificate as ssl's getpeercert() returns it."""
    return {
        "subject": ((("organizationName", "Example, Inc"),), (("commonName", cn),)),
        "subjectAltName": sans,
    }


ALLOWED = frozenset(
    {"scraper.example", "ops@example.org", "spiffe://example.org/prom", "10.0.0.7", "2001:db8::1"}
)


@pytest.mark.parametrize(
    "san",
    [
        ("DNS", "scraper.example"),
        ("email", "ops@example.org"),
        ("URI", "spiffe://example.org/prom"),
        ("IP Address", "10.0.0.7"),
        # ssl writes IPv6 as eight uppercase groups; the toolkit compares Go's RFC 5952 form,
        # and Go writes an IPv4-mapped address as the IPv4 address.
        ("IP Address", "2001:DB8:0:0:0:0:0:1"),
        ("IP Address", "0:0:0:0:0:FFFF:A00:7"),
    ],
)
def test_a_certificate_with_one_allowed_san_is_admitted(san: tuple[str, str]) -> None:
    assert sans_admit(cert(("DNS", "other.example"), san), ALLOWED)
    assert WebConfig(client_allowed_sans=ALLOWED).admits(cert(san))


@pytest.mark.parametrize(
    "sans",
    [
        (),
        (("DNS", "Scraper.example"),),  # exact match, as the toolkit: case counts
        (("DNS", "sub.scraper.example"),),  # no wildcards, no suffixes
        (("URI", "spiffe://example.org/prom/x"),),
        (("IP Address", "10.0.0.8"),),
        (("DirName", "scraper.example"), ("othername", "<unsupported>")),  # not compared
    ],
)
def test_a_certificate_without_an_allowed_san_is_refused(sans: tuple[tuple[str, str], ...]) -> None:
    assert not sans_admit(cert(*sans), ALLOWED)
    assert not WebConfig(client_allowed_sans=ALLOWED).admits(cert(*sans))


def test_the_common_name_is_not_a_san() -> None:
    assert not sans_admit(cert(cn="scraper.example"), ALLOWED)


def test_no_certificate_is_refused_when_sans_are_required() -> None:
    assert not WebConfig(client_allowed_sans=ALLOWED).admits(None)
    assert WebConfig().admits(None)


def test_certificate_sans_and_subject_as_logged() -> None:
    c = cert(("DNS", "a.example"), ("IP Address", "2001:DB8:0:0:1:0:0:1"), ("URI", "urn:x"))
    assert certificate_sans(c) == ["a.example", "2001:db8::1:0:0:1", "urn:x"]
    assert certificate_subject(c) == "CN=scraper,O=Example\\, Inc"
    assert certificate_subject(None) == "(no certificate)"
