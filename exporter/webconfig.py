"""`--web.config.file`: TLS and basic auth for every endpoint, in the format of the Prometheus
exporter-toolkit, so the file users already have for node_exporter works here too:

    tls_server_config:
      cert_file: server.crt
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # default NoClientCert
      client_ca_file: ca.crt
      client_allowed_sans: [prometheus.example.com]  # optional: SANs a client certificate needs
      min_version: TLS12
    basic_auth_users:
      prometheus: $2y$10$...           # a bcrypt hash: htpasswd -nBC 10 "" | tr -d ':\n'

Relative paths are relative to the web configuration file, as in the toolkit. The file is read
like the main configuration (keys written twice are refused), and every key of the toolkit's
format that this exporter cannot honour is refused by name rather than ignored: see
docs/web-config.md.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import ipaddress
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import structlog

from exporter.config import ConfigError, load_yaml

CLIENT_AUTH_TYPES = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
# Python's TLS cannot ask for a client certificate without verifying it. (RequireClientCert is
# the toolkit's old name for RequireAnyClientCert.)
UNSUPPORTED_CLIENT_AUTH_TYPES = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")
TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_TOP_KEYS = {"tls_server_config", "http_server_config", "basic_auth_users"}
_TLS_KEYS = {
    "cert_file",
    "key_file",
    "client_auth_type",
    "client_ca_file",
    "client_ca",
    "client_allowed_sans",
    "min_version",
    "max_version",
    "prefer_server_cipher_suites",
}
_HTTP_KEYS = {"headers", "http2"}
# Keys of the exporter-toolkit's format that this exporter refuses instead of ignoring, and why.
UNSUPPORTED_KEYS = {
    "rate_limit": "this exporter does not rate-limit requests; remove the key",
    "tls_server_config.cert": (
        "an inline certificate is not supported; put it in a file and use cert_file"
    ),
    "tls_server_config.key": (
        "an inline private key is not supported; put it in a file only the exporter can read "
        "and use key_file"
    ),
    "tls_server_config.cipher_suites": (
        "cipher suites cannot be chosen here (the names are those of Go's TLS library, this "
        "exporter's TLS is OpenSSL with its default suites); remove the key"
    ),
    "tls_server_config.curve_preferences": (
        "curves cannot be chosen here (Python's ssl module cannot set a preference list); "
        "remove the key"
    ),
}
# Booleans as the toolkit's YAML library (yaml.v2, YAML 1.1) reads them.
_TRUE = {"y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"}
_FALSE = {"n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"}
# Short names of subject attributes, for log lines.
_SUBJECT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "domainComponent": "DC",
    "streetAddress": "STREET",
    "userId": "UID",
}

Error = Callable[[str, str], ConfigError]


@dataclass
class BasicAuth:
    """Checks credentials against bcrypt hashes, remembering successes: bcrypt is slow on
    purpose, and Prometheus sends the same credentials every scrape."""

    users: dict[str, bytes]
    _verified: set[bytes] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self, authorization: str | None) -> bool:
        if not authorization or not authorization.startswith("Basic "):
            return False
        try:
            decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return False
        user, sep, password = decoded.partition(":")
        hashed = self.users.get(user)
        if not sep or hashed is None:
            return False
        key = hashlib.sha256(user.encode() + b"\0" + password.encode() + b"\0" + hashed).digest()
        with self._lock:
            if any(hmac.compare_digest(key, known) for known in self._verified):
                return True
        try:
            ok = bcrypt.checkpw(password.encode(), hashed)
        except ValueError:
            return False
        if ok:
            with self._lock:
                self._verified.add(key)
        return ok


@dataclass(frozen=True)
class WebConfig:
    tls: ssl.SSLContext | None = None
    auth: BasicAuth | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # tls_server_config.client_allowed_sans; None when not set. The TLS context enforces it on
    # every connection (see _AllowedSansSocket).
    client_allowed_sans: frozenset[str] | None = None

    def admits(self, cert: Mapping[str, Any] | None) -> bool:
        """Whether a client presenting `cert` (as ssl's getpeercert() returns it: None when the
        client sent no certificate) may be served."""
        if self.client_allowed_sans is None:
            return True
        return sans_admit(cert, self.client_allowed_sans)


def certificate_sans(cert: Mapping[str, Any]) -> list[str]:
    """The SANs of a certificate that the toolkit compares, written as it writes them: DNS names,
    e-mail addresses and URIs as in the certificate, IP addresses as Go prints them."""
    sans = []
    for kind, value in cert.get("subjectAltName", ()):
        if kind in ("DNS", "email", "URI"):
            sans.append(str(value))
        elif kind == "IP Address":
            sans.append(_go_ip(str(value)))
    return sans


def sans_admit(cert: Mapping[str, Any] | None, allowed: frozenset[str]) -> bool:
    """The toolkit's check: at least one SAN of the certificate is exactly one of `allowed`.
    No certificate passes no check."""
    return cert is not None and any(san in allowed for san in certificate_sans(cert))


def certificate_subject(cert: Mapping[str, Any] | None) -> str:
    """The subject of a certificate as one string, most specific first (`CN=x,O=y`)."""
    if not cert:
        return "(no certificate)"
    parts = []
    for rdn in reversed(cert.get("subject", ())):
        parts.append(
            "+".join(
                f"{_SUBJECT_NAMES.get(name, name)}={_escape_dn(str(value))}" for name, value in rdn
            )
        )
    return ",".join(parts) or "(empty subject)"


def _escape_dn(value: str) -> str:
    return "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)


def _go_ip(text: str) -> str:
    """An IP address as Go's net.IP.String() writes it (RFC 5952 for IPv6, dotted quad for IPv4
    and IPv4-mapped IPv6); ssl writes IPv6 SANs as eight uppercase groups."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return text
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class ClientCertificateRefused(ssl.SSLError):
    """A client's certificate has none of client_allowed_sans, or the client sent none."""


class _AllowedSansSocket(ssl.SSLSocket):
    """A server-side TLS socket that, once the handshake has verified the client's certificate,
    refuses a client without an allowed SAN: the toolkit checks the same in the handshake (Go's
    VerifyPeerCertificate); Python's ssl has no such hook, so the check follows the handshake,
    before a byte of the request is read. The caller closes the socket on the error, as on any
    failed handshake."""

    allowed_sans: frozenset[str] = frozenset()

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        cert = self.getpeercert()
        if sans_admit(cert, self.allowed_sans):
            return
        client = "unknown"
        with contextlib.suppress(OSError):
            client = str(self.getpeername()[0])
        found = certificate_sans(cert) if cert else []
        structlog.get_logger().warning(
            "client certificate refused: no SAN in client_allowed_sans",
            subject=certificate_subject(cert),
            sans=",".join(found) or "(none)",
            client=client,
        )
        raise ClientCertificateRefused("client certificate has no SAN in client_allowed_sans")


def _allowed_sans_socket(allowed: frozenset[str]) -> type[ssl.SSLSocket]:
    class AllowedSansSocket(_AllowedSansSocket):
        allowed_sans = allowed

    return AllowedSansSocket


def load_web_config(path: str) -> WebConfig:
    """Read and validate a web configuration file; raises ConfigError (one line)."""

    def error(key: str, message: str) -> ConfigError:
        return ConfigError(f"{path}: {key}: {message}")

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: web configuration file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: cannot read: not UTF-8 text") from None
    data = load_yaml(text, path)
    if data is None:
        return WebConfig()
    if not isinstance(data, dict):
        raise error("(top level)", "must be a mapping")
    _known(data, _TOP_KEYS, "", error)
    tls, allowed = _tls(data.get("tls_server_config"), Path(path).parent, error)
    auth = _auth(data.get("basic_auth_users"), error)
    headers = _headers(data.get("http_server_config"), error)
    return WebConfig(tls, auth, headers, allowed)


def _known(section: dict[str, Any], allowed: set[str], prefix: str, error: Error) -> None:
    for key in section:
        name = f"{prefix}{key}"
        if name in UNSUPPORTED_KEYS:
            raise error(name, f"not supported by this exporter: {UNSUPPORTED_KEYS[name]}")
        if key not in allowed:
            raise error(name, f"unknown key; allowed: {', '.join(sorted(allowed))}")


def _bool(value: Any, key: str, error: Error) -> bool:
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise error(key, f"must be true or false, not {value!r}")


def _tls(
    section: Any, base: Path, error: Error
) -> tuple[ssl.SSLContext | None, frozenset[str] | None]:
    if section is None:
        return None, None
    if not isinstance(section, dict):
        raise error("tls_server_config", "must be a mapping")
    _known(section, _TLS_KEYS, "tls_server_config.", error)
    for key in ("cert_file", "key_file"):
        if not section.get(key):
            raise error(f"tls_server_config.{key}", "is required when TLS is configured")

    def resolve(key: str) -> str:
        value = section[key]
        if not isinstance(value, str):
            raise error(f"tls_server_config.{key}", "must be a file path")
        return str(base / value)

    auth_type, ca_key = _client_auth(section, error)
    allowed = _allowed_sans(section, auth_type, error)
    minimum, maximum = _versions(section, error)
    prefer_server = True  # the toolkit's default
    if section.get("prefer_server_cipher_suites") is not None:
        prefer_server = _bool(
            section["prefer_server_cipher_suites"],
            "tls_server_config.prefer_server_cipher_suites",
            error,
        )

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(resolve("cert_file"), resolve("key_file"))
    except (OSError, ssl.SSLError) as exc:
        raise error(
            "tls_server_config.cert_file", f"cannot load certificate and key: {exc}"
        ) from None
    context.verify_mode = CLIENT_AUTH_TYPES[auth_type]
    if ca_key == "client_ca_file":
        try:
            context.load_verify_locations(resolve("client_ca_file"))
        except (OSError, ssl.SSLError) as exc:
            raise error("tls_server_config.client_ca_file", f"cannot load: {exc}") from None
    elif ca_key == "client_ca":
        _load_client_ca(context, section["client_ca"], error)
    context.minimum_version = minimum
    context.maximum_version = maximum
    if prefer_server:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    if allowed is not None:
        context.sslsocket_class = _allowed_sans_socket(allowed)
    return context, allowed


def _client_auth(section: dict[str, Any], error: Error) -> tuple[str, str | None]:
    """client_auth_type, and which of client_ca_file and client_ca holds the client CA (None:
    neither, with NoClientCert)."""
    auth_type = section.get("client_auth_type") or "NoClientCert"
    if auth_type in UNSUPPORTED_CLIENT_AUTH_TYPES:
        raise error(
            "tls_server_config.client_auth_type",
            f"{auth_type} is not supported; use VerifyClientCertIfGiven or "
            "RequireAndVerifyClientCert with client_ca_file",
        )
    if auth_type not in CLIENT_AUTH_TYPES:
        raise error(
            "tls_server_config.client_auth_type",
            f"{auth_type!r} is not one of {', '.join(CLIENT_AUTH_TYPES)}",
        )
    ca_keys = [key for key in ("client_ca_file", "client_ca") if section.get(key)]
    if len(ca_keys) == 2:
        raise error("tls_server_config.client_ca", "set client_ca_file or client_ca, not both")
    if ca_keys and auth_type == "NoClientCert":
        raise error(
            f"tls_server_config.{ca_keys[0]}",
            "is set but client_auth_type is NoClientCert, so no client certificate is asked "
            "for; set client_auth_type: RequireAndVerifyClientCert",
        )
    if not ca_keys and auth_type != "NoClientCert":
        raise error("tls_server_config.client_ca_file", f"is required with {auth_type}")
    return auth_type, ca_keys[0] if ca_keys else None


def _versions(section: dict[str, Any], error: Error) -> tuple[ssl.TLSVersion, ssl.TLSVersion]:
    """min_version and max_version, the toolkit's defaults when not set."""
    versions = {}
    for key in ("min_version", "max_version"):
        version = section.get(key)
        if version is None:
            continue
        if version not in TLS_VERSIONS:
            raise error(
                f"tls_server_config.{key}", f"{version!r} is not one of {', '.join(TLS_VERSIONS)}"
            )
        versions[key] = TLS_VERSIONS[version]
    minimum = versions.get("min_version", ssl.TLSVersion.TLSv1_2)  # the toolkit's default
    maximum = versions.get("max_version", ssl.TLSVersion.TLSv1_3)
    if maximum < minimum:
        raise error(
            "tls_server_config.max_version",
            f"{section.get('max_version')} is below min_version "
            f"{section.get('min_version', 'TLS12')}",
        )
    return minimum, maximum


def _load_client_ca(context: ssl.SSLContext, pem: Any, error: Error) -> None:
    if not isinstance(pem, str):
        raise error("tls_server_config.client_ca", "must be PEM text")
    try:
        context.load_verify_locations(cadata=pem)
    except (ValueError, ssl.SSLError) as exc:
        raise error("tls_server_config.client_ca", f"cannot load: {exc}") from None


def _allowed_sans(section: dict[str, Any], auth_type: str, error: Error) -> frozenset[str] | None:
    key = "tls_server_config.client_allowed_sans"
    value = section.get("client_allowed_sans")
    if value is None:
        return None
    if not isinstance(value, list):
        raise error(key, "must be a list of SANs (DNS names, IP addresses, e-mail addresses, URIs)")
    if not value:
        raise error(key, "is empty, so no client could connect; list SANs or remove the key")
    for entry in value:
        if not isinstance(entry, str) or not entry:
            raise error(key, f"{entry!r} is not a SAN (a DNS name, IP address, e-mail or URI)")
    if auth_type == "NoClientCert":
        raise error(
            key,
            "needs client certificates, but client_auth_type is NoClientCert; set "
            "client_auth_type: RequireAndVerifyClientCert and client_ca_file",
        )
    return frozenset(value)


def _auth(section: Any, error: Error) -> BasicAuth | None:
    if section is None:
        return None
    if not isinstance(section, dict) or not section:
        raise error("basic_auth_users", "must be a mapping of user name to bcrypt hash")
    users: dict[str, bytes] = {}
    for user, hashed in section.items():
        if not isinstance(hashed, str) or not hashed.startswith(("$2a$", "$2b$", "$2y$")):
            raise error(f"basic_auth_users.{user}", "must be a bcrypt hash ($2y$...)")
        users[str(user)] = hashed.encode()
    return BasicAuth(users)


def _headers(section: Any, error: Error) -> dict[str, str]:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise error("http_server_config", "must be a mapping")
    _known(section, _HTTP_KEYS, "http_server_config.", error)
    if section.get("http2") is not None and _bool(
        section["http2"], "http_server_config.http2", error
    ):
        raise error(
            "http_server_config.http2",
            "HTTP/2 is not supported by this exporter (it serves HTTP/1.1); "
            "set http2: false or remove the key",
        )
    headers = section.get("headers") or {}
    if not isinstance(headers, dict):
        raise error("http_server_config.headers", "must be a mapping of header to value")
    for name, value in headers.items():
        if not isinstance(value, str | None):
            raise error(f"http_server_config.headers.{name}", "must be a string")
    # "Unset if blank", as the toolkit documents.
    return {str(k): v for k, v in headers.items() if v}
