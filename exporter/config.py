"""Configuration: the YAML file of docs/configuration.md, validated into frozen values.

Every error is a `ConfigError` naming the file, the key and what is wrong, so the CLI can print one
line and exit 2. Unknown keys are errors, and so are keys written twice: a typo must never pass
silently.

Scalars are read as the text written in the file: YAML 1.1 would otherwise turn `0x1F` into 31
or `0123` into 83 (tokens and ids must arrive verbatim) and `no` into False. Each key then gets its
type from the schema: durations, integers or strings. Only `~`, `null` and empty values are null.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

T = TypeVar("T")

DEFAULT_FINAL_STATUSES = ("delivered", "undelivered", "failed", "received")
DEFAULT_FINAL_BY_KIND: Mapping[str, tuple[str, ...]] = {"mms": ("sent",)}
NAME_RE = re.compile(r"[a-z0-9_-]+")  # use with fullmatch
_DURATION_RE = re.compile(
    r"(?:([0-9]+)y)?(?:([0-9]+)w)?(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?"
    r"(?:([0-9]+)ms)?"
)
_DURATION_UNITS = (365 * 86400, 7 * 86400, 86400, 3600, 60, 1, 0.001)
# The longest duration accepted: 292y, about the longest wait a thread can be asked for.
MAX_DURATION = 292 * 365 * 86400.0
_INT_RE = re.compile(r"[+-]?[0-9]+")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_HOST_RE = re.compile(r"[A-Za-z0-9._-]*")
_IPV6_RE = re.compile(r"[0-9A-Fa-f:.]+(?:%[A-Za-z0-9_.-]+)?")
_SPACE_NAME_RE = re.compile(r"[A-Za-z0-9-]+")
_SPACE_HOST_RE = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# An own number as SignalWire's records show it: E.164, or a short code.
_OWN_NUMBER_RE = re.compile(r"\+[1-9][0-9]{1,14}|[0-9]{3,8}")
# Label values of number_group that the exporter itself uses.
RESERVED_GROUP_NAMES = ("ungrouped", "other")


class ConfigError(Exception):
    """A configuration problem, worded for one line on stderr."""


def parse_duration(text: str) -> float:
    """Parse a Prometheus-style duration (`500ms`, `30s`, `5m`, `2h`, `1d`, `1h30m`) to seconds."""
    text = text.strip()
    if text == "0":
        return 0.0
    if text.isascii() and text.isdigit():
        raise ValueError(f"{text!r} has no unit (write e.g. {text}s)")
    match = _DURATION_RE.fullmatch(text)
    if not text or match is None or not any(match.groups()):
        raise ValueError(f"{text!r} is not a duration (use e.g. 500ms, 30s, 5m, 2h, 1d)")
    seconds = float(
        sum(int(g) * unit for g, unit in zip(match.groups(), _DURATION_UNITS, strict=True) if g)
    )
    if seconds > MAX_DURATION:
        raise ValueError(f"{text!r} is too long (at most 292y)")
    return seconds


def format_duration(seconds: float) -> str:
    """The inverse of parse_duration for whole milliseconds, for messages and the landing page."""
    ms = round(seconds * 1000)
    if ms == 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms >= size:
            parts.append(f"{ms // size}{unit}")
            ms %= size
    if ms:
        parts.append(f"{ms}ms")
    return "".join(parts)


def expand_env(text: str, environ: Mapping[str, str]) -> str:
    """Replace `${VAR}` and `${VAR:-default}`; an unset variable without default is an error."""

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = environ.get(name)
        if value is not None and (value != "" or default is None):
            return value
        if default is not None:
            return default
        raise ValueError(f"environment variable {name} is not set: set it (export {name}=...)")

    return _ENV_RE.sub(substitute, text)


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_listen_address(text: str) -> ListenAddress:
    """Parse `HOST:PORT`, `:PORT` (all interfaces) or `[IPv6]:PORT`; port 0 picks a free port."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        valid_host = ":" in host and _IPV6_RE.fullmatch(host) is not None
    else:
        host, sep, port = text.rpartition(":")
        valid_host = _HOST_RE.fullmatch(host) is not None
    if not sep or not valid_host or not _PORT_RE.fullmatch(port) or int(port) > 65535:
        raise ValueError(
            f"{text!r} is not HOST:PORT (e.g. 0.0.0.0:9797, :9797 or [::1]:9797; port 0..65535)"
        )
    return ListenAddress(host or "0.0.0.0", int(port))


def space_url(space: str) -> str:
    """A space name, a host, or a URL with a scheme (used as is) -> the API's base URL."""
    text = space.strip()
    if "://" in text:
        parts = urlsplit(text)
        if parts.username is not None or parts.password is not None:
            raise ValueError("a URL must not carry credentials; use project_id and api_token")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{text!r} is not an http:// or https:// URL with a host")
        return text.rstrip("/")
    host = text.rstrip("/")
    if _SPACE_NAME_RE.fullmatch(host):
        return f"https://{host}.signalwire.com"
    if _SPACE_HOST_RE.fullmatch(host):
        return f"https://{host}"
    raise ValueError(
        f"{text!r} is not a space name (example), a host (example.signalwire.com) or a URL"
    )


@dataclass(frozen=True, slots=True)
class ProjectConfig:
    name: str
    base_url: str
    project_id: str
    api_token: str = field(repr=False)
    api_token_file: str | None = None
    token_in_file: bool = False  # written literally in the configuration file, not ${VAR}


@dataclass(frozen=True, slots=True)
class SettleConfig:
    timeout: float = 7200.0
    final_statuses: frozenset[str] = frozenset(DEFAULT_FINAL_STATUSES)
    final_statuses_by_kind: Mapping[str, frozenset[str]] = field(
        default_factory=lambda: {k: frozenset(v) for k, v in DEFAULT_FINAL_BY_KIND.items()}
    )


@dataclass(frozen=True, slots=True)
class Config:
    projects: tuple[ProjectConfig, ...]
    listen_address: ListenAddress = ListenAddress("0.0.0.0", 9797)
    poll_interval: float = 30.0
    state_path: str = "signalwire-exporter.db"
    start_from: float = 0.0
    failure_ratio_window: float = 900.0
    max_ingestion_delay: float = 600.0
    settle: SettleConfig = field(default_factory=SettleConfig)
    max_error_codes: int = 50
    max_countries: int = 60
    number_groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # name -> numbers
    request_timeout: float = 10.0
    page_size: int = 1000
    source: str = "<config>"
    warnings: tuple[str, ...] = ()

    def group_of_number(self) -> dict[str, str]:
        """Own number -> the name of the number group that lists it."""
        return {n: name for name, numbers in self.number_groups.items() for n in numbers}


class _Reader:
    """Walks the parsed YAML, expanding `${VAR}` and reporting errors with the key's path."""

    def __init__(self, source: str, environ: Mapping[str, str]) -> None:
        self.source = source
        self.environ = environ

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key or '(top level)'}: {message}")

    def mapping(self, value: Any, key: str, allowed: set[str]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(key, f"must be a mapping, got {_kind(value)}")
        for name in value:
            if name not in allowed:
                hint = _closest(str(name), allowed)
                raise self.error(
                    _join(key, str(name)),
                    "unknown key"
                    + (f" (did you mean {hint!r}?)" if hint else "")
                    + f"; allowed: {', '.join(sorted(allowed))}",
                )
        return value

    def string(self, value: Any, key: str) -> str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.error(key, f"must be a string, got {_kind(value)}")
        try:
            return expand_env(str(value), self.environ)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None

    def convert(self, value: Any, key: str, parse: Callable[[str], T]) -> T:
        text = self.string(value, key)
        try:
            return parse(text)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None

    def duration(self, value: Any, key: str, minimum: float = 0.0) -> float:
        if isinstance(value, bool):
            raise self.error(key, "must be a duration (e.g. 30s), got a boolean")
        seconds = self.convert(value, key, parse_duration)
        if seconds < minimum:
            raise self.error(
                key, f"must be at least {format_duration(minimum)}, got {format_duration(seconds)}"
            )
        return seconds

    def integer(self, value: Any, key: str, low: int, high: int | None = None) -> int:
        if isinstance(value, bool):
            raise self.error(key, "must be an integer")
        number = value if isinstance(value, int) else self.convert(value, key, _to_int)
        if number < low or (high is not None and number > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise self.error(key, f"must be {bound}, got {number}")
        return number

    def string_list(self, value: Any, key: str) -> frozenset[str]:
        if not isinstance(value, list):
            raise self.error(key, f"must be a list of statuses, got {_kind(value)}")
        return frozenset(self.string(v, f"{key}[{i}]") for i, v in enumerate(value))


def _unset_variables(data: Any, environ: Mapping[str, str], key: str = "") -> list[tuple[str, str]]:
    """(key, variable) of every `${VAR}` without a default whose variable is unset, in order."""
    if isinstance(data, dict):
        return [
            found
            for k, v in data.items()
            for found in _unset_variables(v, environ, _join(key, str(k)))
        ]
    if isinstance(data, list):
        return [
            found
            for i, v in enumerate(data)
            for found in _unset_variables(v, environ, f"{key}[{i}]")
        ]
    if not isinstance(data, str):
        return []
    return [
        (key, m.group(1))
        for m in _ENV_RE.finditer(data)
        if m.group(2) is None and environ.get(m.group(1)) is None
    ]


def _to_int(text: str) -> int:
    if not _INT_RE.fullmatch(text.strip()):
        raise ValueError(f"{text!r} is not an integer")
    return int(text)


def _kind(value: Any) -> str:
    names = {str: "a string", list: "a list", dict: "a mapping", bool: "a boolean"}
    return "nothing" if value is None else names.get(type(value), type(value).__name__)


def _join(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


def _closest(name: str, allowed: set[str]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(name, sorted(allowed), n=1, cutoff=0.6)
    return matches[0] if matches else None


_TOP_KEYS = {
    "listen_address",
    "poll_interval",
    "state_path",
    "start_from",
    "failure_ratio_window",
    "max_ingestion_delay",
    "settle",
    "limits",
    "number_groups",
    "request",
    "projects",
}
_PROJECT_KEYS = {"name", "space", "project_id", "api_token", "api_token_file"}


def parse_config(data: Any, source: str, environ: Mapping[str, str] | None = None) -> Config:
    """Validate parsed YAML into a Config; raises ConfigError."""
    r = _Reader(source, os.environ if environ is None else environ)
    if data is None:
        raise r.error("projects", "is required (the file is empty)")
    missing = _unset_variables(data, r.environ)
    if len(missing) > 1:  # all at once; one alone is reported with its key as any other error
        names = ", ".join(f"{name} ({key})" for key, name in missing)
        raise ConfigError(
            f"{source}: environment variables not set: {names}; set them "
            f"(export {missing[0][1]}=...) or write the values in the file"
        )
    top = r.mapping(data, "", _TOP_KEYS)
    kwargs: dict[str, Any] = {"source": source, **_top_level(r, top)}
    kwargs["settle"] = _settle(r, top.get("settle"))
    limits = r.mapping(top.get("limits"), "limits", {"max_error_codes", "max_countries"})
    if "max_error_codes" in limits:
        kwargs["max_error_codes"] = r.integer(
            limits["max_error_codes"], "limits.max_error_codes", 1
        )
    if "max_countries" in limits:
        kwargs["max_countries"] = r.integer(limits["max_countries"], "limits.max_countries", 1)
    kwargs["number_groups"] = _number_groups(r, top.get("number_groups"))
    request = r.mapping(top.get("request"), "request", {"timeout", "page_size"})
    if "timeout" in request:
        kwargs["request_timeout"] = r.duration(request["timeout"], "request.timeout", minimum=0.001)
    if "page_size" in request:
        kwargs["page_size"] = r.integer(request["page_size"], "request.page_size", 1, 1000)
    kwargs["projects"] = _projects(r, top.get("projects"))
    return Config(**kwargs)


def _top_level(r: _Reader, top: dict[str, Any]) -> dict[str, Any]:
    """The settings at the top level of the file, those that are set."""
    kwargs: dict[str, Any] = {}
    if "listen_address" in top:
        kwargs["listen_address"] = r.convert(
            top["listen_address"], "listen_address", parse_listen_address
        )
    if "poll_interval" in top:
        kwargs["poll_interval"] = r.duration(top["poll_interval"], "poll_interval", minimum=1.0)
    if "state_path" in top:
        state_path = r.string(top["state_path"], "state_path")
        if not state_path:
            raise r.error("state_path", "must not be empty")
        kwargs["state_path"] = state_path
    if "start_from" in top:
        kwargs["start_from"] = r.duration(top["start_from"], "start_from")
    if "failure_ratio_window" in top:
        kwargs["failure_ratio_window"] = r.duration(
            top["failure_ratio_window"], "failure_ratio_window", minimum=1.0
        )
    if "max_ingestion_delay" in top:
        kwargs["max_ingestion_delay"] = r.duration(
            top["max_ingestion_delay"], "max_ingestion_delay"
        )
    return kwargs


def _settle(r: _Reader, value: Any) -> SettleConfig:
    settle = r.mapping(value, "settle", {"timeout", "final_statuses", "final_statuses_by_kind"})
    settle_kwargs: dict[str, Any] = {}
    if "timeout" in settle:
        settle_kwargs["timeout"] = r.duration(settle["timeout"], "settle.timeout", minimum=1.0)
    if "final_statuses" in settle:
        settle_kwargs["final_statuses"] = r.string_list(
            settle["final_statuses"], "settle.final_statuses"
        )
    if "final_statuses_by_kind" in settle:
        by_kind = settle["final_statuses_by_kind"]
        if not isinstance(by_kind, dict):
            raise r.error("settle.final_statuses_by_kind", "must be a mapping of kind to statuses")
        settle_kwargs["final_statuses_by_kind"] = {
            str(k): r.string_list(v, f"settle.final_statuses_by_kind.{k}")
            for k, v in by_kind.items()
        }
    return SettleConfig(**settle_kwargs)


def _number_groups(r: _Reader, value: Any) -> dict[str, tuple[str, ...]]:
    """Group name -> own numbers; a number belongs to at most one group."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise r.error(
            "number_groups", f"must be a mapping of group name to numbers, got {_kind(value)}"
        )
    groups: dict[str, tuple[str, ...]] = {}
    group_of: dict[str, str] = {}
    for raw_name, numbers in value.items():
        name = str(raw_name)
        key = f"number_groups.{name}"
        if not NAME_RE.fullmatch(name):
            raise r.error(key, f"{name!r} is not a group name: it must match [a-z0-9_-]+")
        if name in RESERVED_GROUP_NAMES:
            raise r.error(
                key, f"{name!r} is reserved (the exporter's own value); choose another name"
            )
        if not isinstance(numbers, list) or not numbers:
            raise r.error(
                key,
                'must be a non-empty list of numbers (e.g. ["+15551230000", "72345"]), '
                f"got {_kind(numbers)}",
            )
        listed: list[str] = []
        for i, item in enumerate(numbers):
            number = r.string(item, f"{key}[{i}]").strip()
            if not _OWN_NUMBER_RE.fullmatch(number):
                raise r.error(
                    f"{key}[{i}]",
                    f"{number!r} is neither an E.164 number (+15551230000) nor a short code "
                    "(72345)",
                )
            other = group_of.setdefault(number, name)
            if other != name:
                raise r.error(
                    f"{key}[{i}]",
                    f"{number} is also in group {other!r}: a number belongs to one group",
                )
            listed.append(number)
        groups[name] = tuple(listed)
    return groups


def _projects(r: _Reader, value: Any) -> tuple[ProjectConfig, ...]:
    if value is None:
        raise r.error("projects", "is required: list at least one project")
    if not isinstance(value, list) or not value:
        raise r.error("projects", "must be a non-empty list of projects")
    projects: list[ProjectConfig] = []
    seen: set[str] = set()
    for i, item in enumerate(value):
        key = f"projects[{i}]"
        entry = r.mapping(item, key, _PROJECT_KEYS)
        for required in ("name", "space", "project_id"):
            if entry.get(required) in (None, ""):
                raise r.error(f"{key}.{required}", "is required")
        name = r.string(entry["name"], f"{key}.name")
        if not NAME_RE.fullmatch(name):
            raise r.error(f"{key}.name", f"{name!r} must match [a-z0-9_-]+")
        if name in seen:
            raise r.error(f"{key}.name", f"{name!r} is used by another project")
        seen.add(name)
        key = f"projects[{i}] ({name})"
        base_url = r.convert(entry["space"], f"{key}.space", space_url)
        project_id = r.string(entry["project_id"], f"{key}.project_id").strip()
        if not project_id:
            raise r.error(f"{key}.project_id", "is empty")
        token, token_file = _token(r, entry, key)
        literal = token_file is None and _literal(entry.get("api_token"))
        projects.append(ProjectConfig(name, base_url, project_id, token, token_file, literal))
    return tuple(projects)


def _token(r: _Reader, entry: dict[str, Any], key: str) -> tuple[str, str | None]:
    has_inline = entry.get("api_token") not in (None, "")
    has_file = entry.get("api_token_file") not in (None, "")
    if has_inline and has_file:
        raise r.error(f"{key}.api_token", "set api_token or api_token_file, not both")
    if has_file:
        path = r.string(entry["api_token_file"], f"{key}.api_token_file")
        try:
            token = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise r.error(f"{key}.api_token_file", f"cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise r.error(f"{key}.api_token_file", f"cannot read {path}: not UTF-8 text") from None
        if not token:
            raise r.error(f"{key}.api_token_file", f"{path} is empty")
        return token, path
    if not has_inline:
        raise r.error(f"{key}.api_token", "missing token: set api_token or api_token_file")
    token = r.string(entry["api_token"], f"{key}.api_token").strip()
    if not token:
        raise r.error(f"{key}.api_token", "is empty")
    return token, None


def _literal(value: Any) -> bool:
    return isinstance(value, str) and "${" not in value


def read_token_file(path: str) -> str | None:
    """The token in a file, stripped; None when unreadable (relative to the working directory)."""
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None


def load_config(path: str, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the configuration file; raises ConfigError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found (pass --config.file PATH)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: cannot read: not UTF-8 text") from None
    config = parse_config(load_yaml(text, path), path, environ)
    return replace(config, warnings=_secret_warnings(config, path))


def load_yaml(text: str, path: str) -> Any:
    """YAML as this exporter reads it: scalars kept as written (only null is implicit), keys
    written twice refused; a syntax error is a ConfigError naming the file, line and column."""
    try:
        return yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: {where}invalid YAML: {problem}") from None


def _secret_warnings(config: Config, path: str) -> tuple[str, ...]:
    """A token written in a file that other users can read is a token they can read."""
    try:
        readable_by_others = os.stat(path).st_mode & 0o044
    except OSError:
        return ()
    inline = [p.name for p in config.projects if p.token_in_file]
    if not inline or not readable_by_others:
        return ()
    return (
        f"{path} holds the API token of {', '.join(inline)} and is readable by other users: "
        f"chmod 600 {path}, or use api_token_file or ${{VAR}} instead",
    )


class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps scalars as written (only null is implicit) and refuses duplicate
    keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[str, yaml.Mark] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            first = seen.setdefault(key_node.value, key_node.start_mark)
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"{key_node.value!r} is defined twice (first on line {first.line + 1})",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep)


_MERGE_TAG = "tag:yaml.org,2002:merge"
_NULL_TAG = "tag:yaml.org,2002:null"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag in (_MERGE_TAG, _NULL_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
