"""`--web.config.file`: TLS and basic auth for every endpoint, in the format of the Prometheus
exporter-toolkit, so the file users already have for node_exporter works here too:

    tls_server_config:
      cert_file: server.crt
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # default NoClientCert
      client_ca_file: ca.crt
      min_version: TLS12
    basic_auth_users:
      prometheus: $2y$10$...           # a bcrypt hash: htpasswd -nBC 10 "" | tr -d ':\n'

Relative paths are relative to the web configuration file, as in the toolkit.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import yaml

from exporter.config import ConfigError

CLIENT_AUTH_TYPES = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
# Python's TLS cannot ask for a client certificate without verifying it.
UNSUPPORTED_CLIENT_AUTH_TYPES = ("RequestClientCert", "RequireAnyClientCert")
TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_TLS_KEYS = {
    "cert_file",
    "key_file",
    "client_auth_type",
    "client_ca_file",
    "min_version",
    "max_version",
    "cipher_suites",
    "prefer_server_cipher_suites",
    "curve_preferences",
    "client_allowed_sans",
}
_TOP_KEYS = {"tls_server_config", "http_server_config", "basic_auth_users"}
_HTTP_KEYS = {"http2", "headers"}


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


def load_web_config(path: str) -> WebConfig:
    """Read and validate a web configuration file; raises ConfigError (one line)."""

    def error(key: str, message: str) -> ConfigError:
        return ConfigError(f"{path}: {key}: {message}")

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: web configuration file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return WebConfig()
    if not isinstance(data, dict):
        raise error("(top level)", "must be a mapping")
    _known(data, _TOP_KEYS, "", error)
    base = Path(path).parent
    tls = _tls(data.get("tls_server_config"), base, error)
    auth = _auth(data.get("basic_auth_users"), error)
    headers = _headers(data.get("http_server_config"), error)
    return WebConfig(tls, auth, headers)


def _known(section: dict[str, Any], allowed: set[str], prefix: str, error: Any) -> None:
    for key in section:
        if key not in allowed:
            raise error(f"{prefix}{key}", f"unknown key; allowed: {', '.join(sorted(allowed))}")


def _tls(section: Any, base: Path, error: Any) -> ssl.SSLContext | None:
    if section is None:
        return None
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

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(resolve("cert_file"), resolve("key_file"))
    except (OSError, ssl.SSLError) as exc:
        raise error(
            "tls_server_config.cert_file", f"cannot load certificate and key: {exc}"
        ) from None
    auth_type = section.get("client_auth_type", "NoClientCert")
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
    context.verify_mode = CLIENT_AUTH_TYPES[auth_type]
    if section.get("client_ca_file"):
        try:
            context.load_verify_locations(resolve("client_ca_file"))
        except (OSError, ssl.SSLError) as exc:
            raise error("tls_server_config.client_ca_file", f"cannot load: {exc}") from None
    elif auth_type in ("VerifyClientCertIfGiven", "RequireAndVerifyClientCert"):
        raise error("tls_server_config.client_ca_file", f"is required with {auth_type}")
    for key, attribute in (("min_version", "minimum_version"), ("max_version", "maximum_version")):
        if key in section:
            version = section[key]
            if version not in TLS_VERSIONS:
                raise error(
                    f"tls_server_config.{key}",
                    f"{version!r} is not one of {', '.join(TLS_VERSIONS)}",
                )
            setattr(context, attribute, TLS_VERSIONS[version])
    if "min_version" not in section:
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _auth(section: Any, error: Any) -> BasicAuth | None:
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


def _headers(section: Any, error: Any) -> dict[str, str]:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise error("http_server_config", "must be a mapping")
    _known(section, _HTTP_KEYS, "http_server_config.", error)
    headers = section.get("headers") or {}
    if not isinstance(headers, dict):
        raise error("http_server_config.headers", "must be a mapping of header to value")
    return {str(k): str(v) for k, v in headers.items()}
