"""The configuration file (docs/configuration.md): durations, ${VAR} expansion, defaults and
every error.

Every error must be one line that starts with the file's path and names the key, because the CLI
prints it as is and exits 2.
"""

from __future__ import annotations

import os
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporter.config import (
    Config,
    ConfigError,
    ListenAddress,
    SettleConfig,
    expand_env,
    format_duration,
    load_config,
    parse_config,
    parse_duration,
    parse_listen_address,
    space_url,
)
from exporter.ledger import Ledger, LedgerState, Rules
from exporter.records import Message

TOKEN = "PTs3cr3t-token-value"
PROJECT = f"""\
projects:
  - name: production
    space: example
    project_id: pid-1
    api_token: {TOKEN}
"""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    return load_config(str(write(tmp_path, text)), {} if environ is None else environ)


def error(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    """The ConfigError's message, checked for the shape every message must have."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), {} if environ is None else environ)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message, message
    assert TOKEN not in message, message
    return message


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1w", 7 * 86400.0),
        ("1y", 365 * 86400.0),
        ("1h30m", 5400.0),
        ("1m30s500ms", 90.5),
        ("0", 0.0),
        ("0s", 0.0),
        (" 15m ", 900.0),
    ],
)
def test_duration_accepted(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize(
    "text",
    ["", " ", "30", "5x", "-1s", "1.5h", "s", "ms", "30S", "1h 30m", "30m1h", "1s1s", "0x10s",
     "\uff13\uff10s", "1000y"],
)  # fmt: skip
def test_duration_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_duration_without_unit_says_so() -> None:
    with pytest.raises(ValueError, match="no unit"):
        parse_duration("30")


@given(st.integers(min_value=0, max_value=10 * 365 * 86_400_000))
def test_format_duration_round_trips(ms: int) -> None:
    assert parse_duration(format_duration(ms / 1000)) == pytest.approx(ms / 1000)


@pytest.mark.parametrize(
    ("key", "yaml_value", "attribute", "seconds"),
    [
        ("poll_interval", "1h30m", "poll_interval", 5400.0),
        ("poll_interval", "1s", "poll_interval", 1.0),
        ("start_from", "1d", "start_from", 86400.0),
        ("start_from", "0", "start_from", 0.0),
        ("failure_ratio_window", "5m", "failure_ratio_window", 300.0),
    ],
)
def test_top_level_durations(
    tmp_path: Path, key: str, yaml_value: str, attribute: str, seconds: float
) -> None:
    config = load(tmp_path, f"{key}: {yaml_value}\n" + PROJECT)
    assert getattr(config, attribute) == seconds


def test_nested_durations(tmp_path: Path) -> None:
    config = load(tmp_path, "settle: {timeout: 3h}\nrequest: {timeout: 500ms}\n" + PROJECT)
    assert config.settle.timeout == 3 * 3600.0
    assert config.request_timeout == 0.5


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("poll_interval: 30", "poll_interval"),
        ("poll_interval: '30'", "poll_interval"),
        ('poll_interval: ""', "poll_interval"),
        ("poll_interval: 5x", "poll_interval"),
        ("poll_interval: -1s", "poll_interval"),
        ("poll_interval: 500ms", "poll_interval"),  # below the 1s minimum
        ("poll_interval: 0", "poll_interval"),
        ("poll_interval:", "poll_interval"),
        ("poll_interval: 1000y", "poll_interval"),
        ("start_from: 30", "start_from"),
        ("failure_ratio_window: 1.5h", "failure_ratio_window"),
        ("settle: {timeout: 2 hours}", "settle.timeout"),
        ("request: {timeout: 10}", "request.timeout"),
        ("request: {timeout: [1s]}", "request.timeout"),
    ],
)
def test_bad_durations_name_the_key(tmp_path: Path, line: str, key: str) -> None:
    message = error(tmp_path, line + "\n" + PROJECT)
    assert f": {key}: " in message


def test_poll_interval_minimum_is_one_second(tmp_path: Path) -> None:
    message = error(tmp_path, "poll_interval: 999ms\n" + PROJECT)
    assert "at least 1s" in message
    assert load(tmp_path, "poll_interval: 1s\n" + PROJECT).poll_interval == 1.0


@pytest.mark.parametrize("value", [30, 1.5, True])
def test_parse_config_rejects_numbers_without_unit(value: object) -> None:
    data = {
        "poll_interval": value,
        "projects": [{"name": "p", "space": "x", "project_id": "i", "api_token": "t"}],
    }
    with pytest.raises(ConfigError, match=r"^cfg\.yaml: poll_interval: "):
        parse_config(data, "cfg.yaml", {})


def test_parse_config_accepts_integer_zero_duration() -> None:
    data = {
        "start_from": 0,
        "projects": [{"name": "p", "space": "x", "project_id": "i", "api_token": "t"}],
    }
    assert parse_config(data, "cfg.yaml", {}).start_from == 0.0


# --------------------------------------------------------------------------- ${VAR} expansion


@pytest.mark.parametrize(
    ("text", "environ", "expected"),
    [
        ("${A}", {"A": "x"}, "x"),
        ("${A:-d}", {}, "d"),
        ("${A:-d}", {"A": "set"}, "set"),
        ("${A:-d}", {"A": ""}, "d"),  # as in the shell: empty counts as unset for :-
        ("${A}", {"A": ""}, ""),
        ("${A:-}", {}, ""),
        ("a${A}b${B:-c}d", {"A": "1"}, "a1bcd"),
        ("${URL:-http://h:1/p}", {}, "http://h:1/p"),
        ("${A}", {"A": "${B}"}, "${B}"),  # values are not expanded again
        ("no variables", {}, "no variables"),
        ("$A and ${not valid}", {"A": "x"}, "$A and ${not valid}"),
    ],
)
def test_expand_env(text: str, environ: dict[str, str], expected: str) -> None:
    assert expand_env(text, environ) == expected


def test_expand_env_unset_without_default() -> None:
    with pytest.raises(ValueError, match="MISSING_VAR"):
        expand_env("x${MISSING_VAR}y", {})


def test_expansion_in_every_kind_of_value(tmp_path: Path) -> None:
    environ = {
        "LISTEN": "127.0.0.1:9000",
        "POLL": "2m",
        "STATUS": "read",
        "SPACE": "acme",
        "PID": "pid-from-env",
        "TOKEN": TOKEN,
    }
    config = load(
        tmp_path,
        """\
        listen_address: ${LISTEN}
        poll_interval: ${POLL}
        state_path: ${STATE:-/var/lib/exporter/state.db}
        settle:
          timeout: "${SETTLE:-1h}"
          final_statuses: [delivered, "${STATUS}"]
        limits:
          max_error_codes: ${CODES:-7}
        request:
          page_size: "${PAGE:-100}"
        projects:
          - name: ${NAME:-production}
            space: ${SPACE}
            project_id: ${PID}
            api_token: ${TOKEN}
        """,
        environ,
    )
    assert config.listen_address == ListenAddress("127.0.0.1", 9000)
    assert config.poll_interval == 120.0
    assert config.state_path == "/var/lib/exporter/state.db"
    assert config.settle.timeout == 3600.0
    assert config.settle.final_statuses == {"delivered", "read"}
    assert config.max_error_codes == 7
    assert config.page_size == 100
    (project,) = config.projects
    assert project.name == "production"
    assert project.base_url == "https://acme.signalwire.com"
    assert project.project_id == "pid-from-env"
    assert project.api_token == TOKEN


def test_number_written_as_variable_takes_the_environment_value(tmp_path: Path) -> None:
    config = load(tmp_path, 'request:\n  page_size: "${PAGE:-100}"\n' + PROJECT, {"PAGE": "25"})
    assert config.page_size == 25


def test_number_from_variable_is_still_validated(tmp_path: Path) -> None:
    message = error(tmp_path, 'request:\n  page_size: "${PAGE:-100}"\n' + PROJECT, {"PAGE": "0"})
    assert ": request.page_size: " in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("poll_interval: ${POLL}\n" + PROJECT, "poll_interval"),
        ("request:\n  page_size: ${PAGE}\n" + PROJECT, "request.page_size"),
        (PROJECT.replace(TOKEN, "${SIGNALWIRE_API_TOKEN}"), "api_token"),
        (PROJECT.replace("pid-1", "${SIGNALWIRE_PROJECT_ID}"), "project_id"),
        (PROJECT + 'settle:\n  final_statuses: ["${FINAL}"]\n', "settle.final_statuses[0]"),
    ],
)
def test_unset_variable_is_an_error_naming_key_and_variable(
    tmp_path: Path, text: str, key: str
) -> None:
    message = error(tmp_path, text, {"UNRELATED": "x"})
    assert key in message
    assert "not set" in message
    variable = text.split("${", 1)[1].split("}", 1)[0]
    assert variable in message


def test_os_environ_is_used_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWX_TEST_TOKEN", TOKEN)
    path = write(tmp_path, PROJECT.replace(TOKEN, "${SWX_TEST_TOKEN}"))
    assert load_config(str(path)).projects[0].api_token == TOKEN
    monkeypatch.delenv("SWX_TEST_TOKEN")
    with pytest.raises(ConfigError, match="SWX_TEST_TOKEN"):
        load_config(str(path))


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("text", "key", "hint"),
    [
        ("poll_intervall: 30s\n" + PROJECT, "poll_intervall", "poll_interval"),
        ("listen_adress: ':1'\n" + PROJECT, "listen_adress", "listen_address"),
        ("settle:\n  timout: 1h\n" + PROJECT, "settle.timout", "timeout"),
        ("settle:\n  final_status: [x]\n" + PROJECT, "settle.final_status", "final_statuses"),
        ("limits:\n  max_error_code: 5\n" + PROJECT, "limits.max_error_code", "max_error_codes"),
        ("request:\n  page_sise: 5\n" + PROJECT, "request.page_sise", "page_size"),
        (PROJECT.replace("api_token:", "api_tokn:"), "projects[0].api_tokn", "api_token"),
        (PROJECT.replace("space:", "spaec:"), "projects[0].spaec", "space"),
        (PROJECT + "    project: x\n", "projects[0].project", "project_id"),
    ],
)
def test_unknown_keys_are_errors_with_a_hint(
    tmp_path: Path, text: str, key: str, hint: str
) -> None:
    message = error(tmp_path, text)
    assert f": {key}: unknown key" in message
    assert f"did you mean {hint!r}" in message


def test_unknown_key_without_close_match_lists_the_allowed_keys(tmp_path: Path) -> None:
    message = error(tmp_path, "zzz: 1\n" + PROJECT)
    assert ": zzz: unknown key" in message
    assert "did you mean" not in message
    assert "poll_interval" in message and "projects" in message


def test_duplicate_keys_are_errors(tmp_path: Path) -> None:
    message = error(tmp_path, "poll_interval: 1m\npoll_interval: 2m\n" + PROJECT)
    assert "poll_interval" in message
    assert "line 2" in message
    assert "twice" in message


def test_duplicate_keys_in_a_project_are_errors(tmp_path: Path) -> None:
    message = error(tmp_path, PROJECT + "    api_token: other\n")
    assert "api_token" in message and "twice" in message


def test_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    text = "settle:\n  <<: {timeout: 3s}\n  timeout: 4s\n" + PROJECT
    assert load(tmp_path, text).settle.timeout == 4.0


# --------------------------------------------------------------------------- defaults


def test_every_documented_default(tmp_path: Path) -> None:
    config = load(tmp_path, PROJECT)
    assert config.listen_address == ListenAddress("0.0.0.0", 9797)
    assert str(config.listen_address) == "0.0.0.0:9797"
    assert config.poll_interval == 30.0
    assert config.state_path == "signalwire-exporter.db"
    assert config.start_from == 0.0
    assert config.failure_ratio_window == 15 * 60.0
    assert config.max_ingestion_delay == 10 * 60.0
    assert config.settle.timeout == 2 * 3600.0
    assert config.settle.final_statuses == {"delivered", "undelivered", "failed", "received"}
    assert dict(config.settle.final_statuses_by_kind) == {"mms": {"sent"}}
    assert config.max_error_codes == 50
    assert config.max_countries == 60
    assert dict(config.number_groups) == {}
    assert config.request_timeout == 10.0
    assert config.page_size == 1000
    assert config.source.endswith("config.yaml")


def test_empty_sections_keep_the_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, "settle:\nlimits:\nrequest:\n" + PROJECT)
    assert config.settle.timeout == 7200.0
    assert config.max_error_codes == 50
    assert config.page_size == 1000


def test_settle_rules(tmp_path: Path) -> None:
    """The final statuses a configuration sets, as the ledger applies them to a record."""

    def is_final(settle: SettleConfig, kind: str, status: str) -> bool:
        rules = Rules(settle, 30.0, 900.0, 50, 1000)
        ledger = Ledger(rules, LedgerState(start_point=0.0, cursor=0.0))
        batch = ledger.begin(ledger.plan(100.0))
        batch.observe(Message("m", 50.0, "outbound-api", kind, status, "", None, 1, 0), 100.0)
        return bool(batch.settled)

    default = load(tmp_path, PROJECT).settle
    assert is_final(default, "sms", "delivered")
    assert is_final(default, "mms", "sent")
    assert not is_final(default, "sms", "sent")
    assert not is_final(default, "mms", "queued")
    custom = load(
        tmp_path,
        "settle:\n  final_statuses: [delivered]\n"
        "  final_statuses_by_kind:\n    sms: [sent]\n" + PROJECT,
    ).settle
    assert is_final(custom, "sms", "sent")
    assert not is_final(custom, "mms", "sent")
    assert not is_final(custom, "sms", "failed")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("settle:\n  final_statuses: delivered\n", "settle.final_statuses"),
        ("settle:\n  final_statuses_by_kind: [mms]\n", "settle.final_statuses_by_kind"),
        (
            "settle:\n  final_statuses_by_kind:\n    mms: sent\n",
            "settle.final_statuses_by_kind.mms",
        ),
        ("settle: 5m\n", "settle"),
        ("limits: [1]\n", "limits"),
        ("request: 10s\n", "request"),
    ],
)
def test_malformed_sections(tmp_path: Path, text: str, key: str) -> None:
    assert f": {key}: " in error(tmp_path, text + PROJECT)


def test_the_documented_example_loads(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
        listen_address: "0.0.0.0:9797"
        poll_interval: 30s                  # each project is polled this often (minimum 1s)
        state_path: signalwire-exporter.db  # the state store; relative to the working directory
        start_from: 0s                      # first start only
        failure_ratio_window: 15m
        max_ingestion_delay: 10m            # how late a record may first appear in the log
        settle:
          timeout: 2h                       # see §3
          final_statuses: [delivered, undelivered, failed, received]
          final_statuses_by_kind:
            mms: [sent]                     # MMS never gets a delivery receipt
        limits:
          max_error_codes: 50               # distinct error_code values per project
          max_countries: 60                 # distinct country values per project
        number_groups:                      # optional: your own numbers, grouped by purpose
          otp: ["+15551230000", "+15551230001"]
          marketing: ["+15557650000", "72345"]   # E.164 numbers or short codes
        request:
          timeout: 10s
          page_size: 1000                   # 1..1000
        projects:
          - name: production                # [a-z0-9_-]+, unique; the `project` label
            space: example                  # a space name, a host, or a URL
            project_id: ${SIGNALWIRE_PROJECT_ID}
            api_token: ${SIGNALWIRE_API_TOKEN}     # or api_token_file
        """,
        {"SIGNALWIRE_PROJECT_ID": "pid", "SIGNALWIRE_API_TOKEN": TOKEN},
    )
    literal = load(tmp_path, PROJECT.replace("pid-1", "pid"))
    assert literal.projects[0].token_in_file and not config.projects[0].token_in_file
    assert config.warnings == ()
    same = [replace(p, token_in_file=False) for p in literal.projects]
    groups = {"otp": ("+15551230000", "+15551230001"), "marketing": ("+15557650000", "72345")}
    assert config.number_groups == groups
    assert config.group_of_number() == {
        "+15551230000": "otp",
        "+15551230001": "otp",
        "+15557650000": "marketing",
        "72345": "marketing",
    }
    assert config == replace(literal, projects=tuple(same), warnings=(), number_groups=groups)


# --------------------------------------------------------------------------- integers


@pytest.mark.parametrize(("value", "expected"), [("1", 1), ("1000", 1000), ("'250'", 250)])
def test_page_size_in_range(tmp_path: Path, value: str, expected: int) -> None:
    assert load(tmp_path, f"request:\n  page_size: {value}\n" + PROJECT).page_size == expected


@pytest.mark.parametrize("value", ["0", "1001", "-1", "abc", "1.5", "1_0", "true", "'1e3'", "[5]"])
def test_page_size_out_of_range(tmp_path: Path, value: str) -> None:
    assert ": request.page_size: " in error(tmp_path, f"request:\n  page_size: {value}\n" + PROJECT)


def test_page_size_bounds_are_in_the_message(tmp_path: Path) -> None:
    assert "between 1 and 1000" in error(tmp_path, "request:\n  page_size: 1001\n" + PROJECT)


@pytest.mark.parametrize("value", ["0", "-5", "many"])
def test_max_error_codes_must_be_positive(tmp_path: Path, value: str) -> None:
    message = error(tmp_path, f"limits:\n  max_error_codes: {value}\n" + PROJECT)
    assert ": limits.max_error_codes: " in message


def test_parse_config_accepts_python_integers() -> None:
    data = {
        "request": {"page_size": 7},
        "limits": {"max_error_codes": 3},
        "projects": [{"name": "p", "space": "x", "project_id": "i", "api_token": "t"}],
    }
    config = parse_config(data, "cfg.yaml", {})
    assert (config.page_size, config.max_error_codes) == (7, 3)
    with pytest.raises(ConfigError, match=r"^cfg\.yaml: request\.page_size: "):
        parse_config({**data, "request": {"page_size": True}}, "cfg.yaml", {})


# --------------------------------------------------------------------------- projects


def project(name: str = "production", extra: str = "", **fields: str) -> str:
    values = {"space": "example", "project_id": "pid-1", "api_token": TOKEN, **fields}
    lines = [f"  - name: {name}"] + [f"    {k}: {v}" for k, v in values.items() if v != "-"]
    return "\n".join(lines) + "\n" + extra


@pytest.mark.parametrize("name", ["production", "a", "eu-west_2", "0", "no", "123"])
def test_valid_project_names(tmp_path: Path, name: str) -> None:
    config = load(tmp_path, "projects:\n" + project(name))
    assert config.projects[0].name == name


@pytest.mark.parametrize(
    "name", ["Production", "prod env", "'prod\\n'", '"prod\\n"', "prød", "p.q", "'a/b'", "''"]
)
def test_invalid_project_names(tmp_path: Path, name: str) -> None:
    assert ": projects[0].name: " in error(tmp_path, "projects:\n" + project(name))


def test_project_names_are_unique(tmp_path: Path) -> None:
    message = error(tmp_path, "projects:\n" + project("a") + project("b") + project("a"))
    assert ": projects[2].name: " in message
    assert "'a'" in message


def test_several_projects(tmp_path: Path) -> None:
    config = load(tmp_path, "projects:\n" + project("a") + project("b", space="other"))
    assert [(p.name, p.base_url) for p in config.projects] == [
        ("a", "https://example.signalwire.com"),
        ("b", "https://other.signalwire.com"),
    ]


@pytest.mark.parametrize("field", ["name", "space", "project_id"])
def test_required_project_fields(tmp_path: Path, field: str) -> None:
    text = (
        "projects:\n" + project(**{field: "-"})
        if field != "name"
        else ("projects:\n  - space: example\n    project_id: p\n    api_token: t\n")
    )
    message = error(tmp_path, text)
    assert f".{field}: " in message and "required" in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("poll_interval: 30s\n", "projects"),
        ("projects:\n", "projects"),
        ("projects: []\n", "projects"),
        ("projects: production\n", "projects"),
        ("projects: {name: production}\n", "projects"),
        ("projects:\n  - production\n", "projects[0]"),
    ],
)
def test_projects_must_be_a_non_empty_list_of_mappings(tmp_path: Path, text: str, key: str) -> None:
    assert f": {key}: " in error(tmp_path, text)


def test_ids_and_tokens_are_kept_verbatim(tmp_path: Path) -> None:
    # YAML 1.1 would read these as the numbers 31 and 83.
    config = load(tmp_path, "projects:\n" + project(project_id="0x1F", api_token="0123"))
    assert config.projects[0].project_id == "0x1F"
    assert config.projects[0].api_token == "0123"


def test_token_is_not_in_the_repr(tmp_path: Path) -> None:
    config = load(tmp_path, PROJECT)
    assert TOKEN not in repr(config)


# --------------------------------------------------------------------------- space


@pytest.mark.parametrize(
    ("space", "url"),
    [
        ("example", "https://example.signalwire.com"),
        ("my-space", "https://my-space.signalwire.com"),
        ("example.signalwire.com", "https://example.signalwire.com"),
        ("example.signalwire.com/", "https://example.signalwire.com"),
        ("api.example.org:8443", "https://api.example.org:8443"),
        ("localhost:8080", "https://localhost:8080"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("https://example.signalwire.com/", "https://example.signalwire.com"),
        ("http://proxy.internal/signalwire", "http://proxy.internal/signalwire"),
    ],
)
def test_space_forms(tmp_path: Path, space: str, url: str) -> None:
    assert space_url(space) == url
    config = load(tmp_path, "projects:\n" + project(space=f"'{space}'"))
    assert config.projects[0].base_url == url


@pytest.mark.parametrize(
    "space",
    ["my space", "exa_mple", "https://", "ftp://example.com", "example.com/path", "a@b",
     "https://user:pw@example.signalwire.com"],
)  # fmt: skip
def test_bad_spaces(tmp_path: Path, space: str) -> None:
    message = error(tmp_path, "projects:\n" + project(space=f"'{space}'"))
    assert ".space: " in message
    assert "pw" not in message.split(".space: ", 1)[1]


# --------------------------------------------------------------------------- tokens


def test_api_token_file_is_read_and_stripped(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n\n", encoding="utf-8")
    config = load(tmp_path, "projects:\n" + project(api_token="-", api_token_file=str(token_file)))
    assert config.projects[0].api_token == TOKEN
    assert config.projects[0].api_token_file == str(token_file)


def test_api_token_file_path_may_come_from_the_environment(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN, encoding="utf-8")
    text = "projects:\n" + project(api_token="-", api_token_file="${TOKEN_FILE}")
    config = load(tmp_path, text, {"TOKEN_FILE": str(token_file)})
    assert config.projects[0].api_token == TOKEN


def test_inline_token_has_no_file(tmp_path: Path) -> None:
    assert load(tmp_path, PROJECT).projects[0].api_token_file is None


def test_both_token_forms_is_an_error(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN, encoding="utf-8")
    message = error(tmp_path, "projects:\n" + project(api_token_file=str(token_file)))
    assert "api_token" in message and "api_token_file" in message and "not both" in message


def test_missing_token(tmp_path: Path) -> None:
    message = error(tmp_path, "projects:\n" + project(api_token="-"))
    assert "projects[0] (production).api_token: " in message
    assert "missing token" in message


@pytest.mark.parametrize("token", ["''", "'   '"])
def test_empty_inline_token(tmp_path: Path, token: str) -> None:
    message = error(tmp_path, "projects:\n" + project(api_token=token))
    assert ".api_token: " in message


def test_unreadable_token_file(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-token"
    message = error(tmp_path, "projects:\n" + project(api_token="-", api_token_file=str(missing)))
    assert ".api_token_file: " in message
    assert str(missing) in message


def test_token_file_that_is_a_directory(tmp_path: Path) -> None:
    message = error(tmp_path, "projects:\n" + project(api_token="-", api_token_file=str(tmp_path)))
    assert ".api_token_file: " in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_token_file_without_permission(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN, encoding="utf-8")
    token_file.chmod(0)
    message = error(
        tmp_path, "projects:\n" + project(api_token="-", api_token_file=str(token_file))
    )
    assert ".api_token_file: " in message and "cannot read" in message


def test_empty_token_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("\n  \n", encoding="utf-8")
    message = error(
        tmp_path, "projects:\n" + project(api_token="-", api_token_file=str(token_file))
    )
    assert ".api_token_file: " in message and "empty" in message


# --------------------------------------------------------------------------- the file itself


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    text = "poll_interval: 30s\nprojects:\n  - name: a\n   space: b\n"
    message = error(tmp_path, text)
    assert "line 4, column" in message
    assert "invalid YAML" in message


def test_unclosed_flow_sequence(tmp_path: Path) -> None:
    message = error(tmp_path, "poll_interval: 30s\nprojects: [\n")
    assert "line 3, column 1" in message


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    message = error(tmp_path, text)
    assert ": projects: " in message and "empty" in message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    message = error(tmp_path, text)
    assert "top level" in message and "mapping" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(str(path), {})
    assert str(info.value).startswith(f"{path}: ")
    assert "not found" in str(info.value)


def test_file_that_is_not_text(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=f"^{path}: "):
        load_config(str(path), {})


def test_python_tags_are_refused(tmp_path: Path) -> None:
    message = error(tmp_path, "poll_interval: !!python/object/apply:os.getpid []\n" + PROJECT)
    assert "invalid YAML" in message


# --------------------------------------------------------------------------- listen_address


@pytest.mark.parametrize(
    ("text", "host", "port", "shown"),
    [
        ("0.0.0.0:9797", "0.0.0.0", 9797, "0.0.0.0:9797"),
        ("127.0.0.1:0", "127.0.0.1", 0, "127.0.0.1:0"),
        (":9797", "0.0.0.0", 9797, "0.0.0.0:9797"),
        ("localhost:65535", "localhost", 65535, "localhost:65535"),
        ("[::1]:9797", "::1", 9797, "[::1]:9797"),
        ("[::]:80", "::", 80, "[::]:80"),
    ],
)
def test_listen_address(text: str, host: str, port: int, shown: str) -> None:
    address = parse_listen_address(text)
    assert address == ListenAddress(host, port)
    assert str(address) == shown


@pytest.mark.parametrize(
    "text",
    ["", "9797", "localhost", "localhost:", ":", "host:65536", "host:-1", "host:abc", "::1:9797",
     "[::1]", "[::1]9797", "[]:80", "[::1:80", ":²", "a b:80", "host:80:81", "host:+80"],
)  # fmt: skip
def test_bad_listen_address(text: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen_address(text)


def test_listen_address_in_the_file(tmp_path: Path) -> None:
    config = load(tmp_path, "listen_address: '[::1]:9000'\n" + PROJECT)
    assert config.listen_address == ListenAddress("::1", 9000)
    assert ": listen_address: " in error(tmp_path, "listen_address: 9797\n" + PROJECT)
    assert ": listen_address: " in error(tmp_path, "listen_address: 'x:99999'\n" + PROJECT)


def test_state_path(tmp_path: Path) -> None:
    assert load(tmp_path, "state_path: /data/x.db\n" + PROJECT).state_path == "/data/x.db"
    assert ": state_path: " in error(tmp_path, "state_path: ''\n" + PROJECT)


def test_a_token_written_in_a_file_others_can_read_gives_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "projects:\n"
        "  - {name: a, space: x, project_id: i, api_token: PTliteral-token}\n"
        "  - {name: b, space: x, project_id: i, api_token: '${TOKEN_B}'}\n"
    )
    path.chmod(0o644)
    warnings = load_config(str(path), {"TOKEN_B": "PTfrom-env"}).warnings
    assert len(warnings) == 1
    assert str(path) in warnings[0] and "chmod 600" in warnings[0]
    assert " a " in warnings[0] and " b " not in warnings[0]
    assert "PTliteral-token" not in warnings[0]
    path.chmod(0o600)
    assert load_config(str(path), {"TOKEN_B": "PTfrom-env"}).warnings == ()


def test_tokens_from_the_environment_or_a_file_give_no_warning(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("PTfile-token\n")
    path = tmp_path / "config.yaml"
    path.write_text(
        "projects:\n"
        f"  - {{name: a, space: x, project_id: i, api_token_file: {token_file}}}\n"
        "  - {name: b, space: x, project_id: i, api_token: '${TOKEN_B}'}\n"
    )
    path.chmod(0o644)
    assert load_config(str(path), {"TOKEN_B": "PTfrom-env"}).warnings == ()


# --------------------------------------------------------------------------- insight dimensions


def test_max_countries(tmp_path: Path) -> None:
    assert load(tmp_path, "limits:\n  max_countries: 5\n" + PROJECT).max_countries == 5
    assert "limits.max_countries: must be at least 1" in error(
        tmp_path, "limits:\n  max_countries: 0\n" + PROJECT
    )


@pytest.mark.parametrize(
    ("groups", "key", "what"),
    [
        ("[otp]", "number_groups", "mapping of group name to numbers"),
        ("\n  OTP: ['+15551230000']", "number_groups.OTP", "[a-z0-9_-]+"),
        ("\n  ungrouped: ['+15551230000']", "number_groups.ungrouped", "reserved"),
        ("\n  other: ['+15551230000']", "number_groups.other", "reserved"),
        ("\n  otp: '+15551230000'", "number_groups.otp", "non-empty list"),
        ("\n  otp: []", "number_groups.otp", "non-empty list"),
        ("\n  otp: ['5551230000']", "number_groups.otp[0]", "neither an E.164 number"),
        ("\n  otp: ['+1 555 123 0000']", "number_groups.otp[0]", "neither an E.164 number"),
        ("\n  otp: ['+0123']", "number_groups.otp[0]", "neither an E.164 number"),
        ("\n  otp: ['12']", "number_groups.otp[0]", "neither an E.164 number"),
        (
            "\n  otp: ['+15551230000']\n  marketing: ['72345', '+15551230000']",
            "number_groups.marketing[1]",
            "+15551230000 is also in group 'otp'",
        ),
    ],
)
def test_bad_number_groups_are_one_clear_line(
    tmp_path: Path, groups: str, key: str, what: str
) -> None:
    message = error(tmp_path, f"number_groups: {groups}\n" + PROJECT)
    assert f": {key}: " in message and what in message, message


def test_number_groups_take_short_codes_unquoted_and_variables(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        "number_groups:\n  marketing: [72345, '${OWN}']\n" + PROJECT,
        {"OWN": "+15557650000"},
    )
    assert config.number_groups == {"marketing": ("72345", "+15557650000")}


def test_max_ingestion_delay(tmp_path: Path) -> None:
    assert load(tmp_path, "max_ingestion_delay: 1h\n" + PROJECT).max_ingestion_delay == 3600.0
    assert load(tmp_path, "max_ingestion_delay: 0s\n" + PROJECT).max_ingestion_delay == 0.0
    assert "max_ingestion_delay: " in error(tmp_path, "max_ingestion_delay: soon\n" + PROJECT)


def test_every_unset_variable_in_one_error_that_says_to_set_them(tmp_path: Path) -> None:
    text = PROJECT.replace("pid-1", "${SWX_PID}").replace(TOKEN, "${SWX_TOKEN}")
    message = error(tmp_path, text, {})
    assert "SWX_PID (projects[0].project_id)" in message
    assert "SWX_TOKEN (projects[0].api_token)" in message
    assert "export SWX_PID=" in message and ":-" not in message
    one = error(tmp_path, PROJECT.replace(TOKEN, "${SWX_TOKEN}"), {})
    assert "SWX_TOKEN is not set: set it (export SWX_TOKEN=...)" in one


def test_the_shipped_example_needs_its_three_variables(tmp_path: Path) -> None:
    example = (Path(__file__).resolve().parents[2] / "config.yaml").read_text()
    path = write(tmp_path, example)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), {})
    for name in ("SIGNALWIRE_SPACE", "SIGNALWIRE_PROJECT_ID", "SIGNALWIRE_API_TOKEN"):
        assert name in str(info.value)
    config = load_config(
        str(path),
        {"SIGNALWIRE_SPACE": "acme", "SIGNALWIRE_PROJECT_ID": "p", "SIGNALWIRE_API_TOKEN": "t"},
    )
    assert config.projects[0].base_url == "https://acme.signalwire.com"
