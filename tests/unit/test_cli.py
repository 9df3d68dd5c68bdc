"""The command line (docs/cli.md): exit statuses, one-line errors, `check`, and `run`'s refusals.

Most cases call `main()` in-process; a few run `python -m exporter` to prove what a shell sees: the
exit status, exactly one line on stderr and no traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

import exporter.cli as cli
from exporter import __version__
from exporter.cli import COMMANDS, _parser
from exporter.config import Config, ListenAddress
from exporter.daemon import FatalError
from exporter.simulator import Simulator, SimulatorServer

GOOD_ID, GOOD_TOKEN = "pid-good", "PTgood-token-0123456789"
BAD_ID, RIGHT_TOKEN, WRONG_TOKEN = "pid-bad", "PTright-token-abcdef", "PTwrong-token-fedcba"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """main() configures structlog for the process; give the next test the configuration back."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_process(*argv: str, cwd: Path | None = None, timeout: float = 30) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWX_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-m", "exporter", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr


def one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def write_config(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def project_yaml(name: str, space: str, project_id: str, token: str) -> str:
    return (
        f"  - name: {name}\n    space: '{space}'\n"
        f"    project_id: {project_id}\n    api_token: {token}\n"
    )


# --------------------------------------------------------------------------- --version, --help


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "--version")
    assert (code, out, err) == (0, f"signalwire-exporter {__version__}\n", "")
    assert __version__ == "0.1.0"


def test_version_as_a_process() -> None:
    code, out, err = run_process("--version")
    assert (code, out, err) == (0, f"signalwire-exporter {__version__}\n", "")


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    usage = out.splitlines()[0]
    for command in COMMANDS:
        assert command in usage, usage  # the usage line names every command
        assert f"  {command} " in out
    assert "--version" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_returns_zero(capsys: pytest.CaptureFixture[str], command: str) -> None:
    code, out, err = run_main(capsys, command, "--help")
    assert code == 0
    assert f"signalwire-exporter {command}" in out
    assert err == ""


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_help_text(command: str) -> None:
    for action in _parser(command)._actions:
        assert action.help, (command, action.option_strings)
        if action.default not in (None, False, [], argparse.SUPPRESS) and action.dest != "help":
            assert "default" in action.help, (command, action.option_strings)


def test_the_listen_address_is_not_only_for_metrics() -> None:
    help_text = _parser("run").format_help()
    assert "status page" in help_text and "health endpoints" in help_text
    assert "seed the state file" in _parser("backfill").format_help()
    assert "127.0.0.1:9797" in _parser("demo").format_help()


# --------------------------------------------------------------------------- bad usage


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        (["--bogus"], "--bogus"),
        (["run", "--bogus"], "--bogus"),
        (["check", "--web.listen-address", ":1"], "--web.listen-address"),
        (["--log.level", "loud"], "--log.level"),
        (["--log.format", "xml"], "--log.format"),
        (["--web.listen-address", "nowhere"], "--web.listen-address"),
        (["--web.listen-address", "host:70000"], "--web.listen-address"),
        (["demo", "--web.listen-address", "::1:80"], "--web.listen-address"),
        (["demo", "--demo.rate", "0"], "--demo.rate"),
        (["demo", "--demo.rate", "-3"], "--demo.rate"),
        (["demo", "--demo.rate", "fast"], "--demo.rate"),
        (["demo", "--demo.rate", "nan"], "--demo.rate"),
        (["--config", "x.yaml"], "--config"),  # no abbreviations: --config.file is meant
        (["--config.file"], "--config.file"),
        (["chek"], "'check'"),
        (["check", "extra"], "extra"),
    ],
)
def test_bad_usage_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], mentions: str
) -> None:
    code, out, err = run_main(capsys, *argv)
    assert code == 2
    assert out == ""
    line = one_line(err)
    assert line.startswith("signalwire-exporter: error: ")
    assert mentions in line


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        (["--bogus"], "--bogus"),
        (["--log.level", "loud"], "--log.level"),
        (["--web.listen-address", "nowhere"], "--web.listen-address"),
        (["demo", "--demo.rate", "fast"], "--demo.rate"),
    ],
)
def test_bad_usage_as_a_process(argv: list[str], mentions: str) -> None:
    code, out, err = run_process(*argv)
    assert code == 2
    assert out == ""
    assert mentions in one_line(err)


# --------------------------------------------------------------------------- bad configuration

PROJECT = project_yaml("production", "example", "pid", GOOD_TOKEN)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("poll_intervall: 30s\nprojects:\n" + PROJECT, "poll_intervall"),
        ("poll_interval: 30\nprojects:\n" + PROJECT, "poll_interval"),
        ("request:\n  timeout: 5x\nprojects:\n" + PROJECT, "request.timeout"),
        ("poll_interval: ${SWX_UNSET_POLL}\nprojects:\n" + PROJECT, "poll_interval"),
        (
            "projects:\n  - name: production\n    space: example\n    project_id: pid\n",
            "api_token",
        ),
        ("projects: [\n", "line 2"),
    ],
)
@pytest.mark.parametrize("command", [[], ["run"], ["check"]])
def test_bad_configuration_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    text: str,
    key: str,
    command: list[str],
) -> None:
    monkeypatch.delenv("SWX_UNSET_POLL", raising=False)
    path = write_config(tmp_path, text)
    code, out, err = run_main(capsys, *command, "--config.file", str(path))
    assert code == 2
    assert out == ""
    line = one_line(err)
    assert line.startswith(f"signalwire-exporter: configuration error: {path}: ")
    assert key in line
    assert GOOD_TOKEN not in line


def test_missing_configuration_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    code, out, err = run_main(capsys, "--config.file", str(path))
    assert code == 2
    assert out == ""
    assert f"{path}: " in one_line(err)
    assert "not found" in err


def test_default_configuration_file_is_config_yaml(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(capsys, "check")
    assert code == 2
    assert one_line(err).startswith("signalwire-exporter: configuration error: config.yaml: ")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("poll_intervall: 30s\nprojects:\n" + PROJECT, "poll_intervall"),
        ("settle:\n  timeout: soon\nprojects:\n" + PROJECT, "settle.timeout"),
        ("poll_interval: ${SWX_UNSET_POLL}\nprojects:\n" + PROJECT, "SWX_UNSET_POLL"),
        ("projects:\n  - name: p\n    space: example\n    project_id: pid\n", "missing token"),
    ],
)
def test_bad_configuration_as_a_process(tmp_path: Path, text: str, key: str) -> None:
    path = write_config(tmp_path, text)
    code, out, err = run_process("--config.file", str(path))
    assert code == 2
    assert out == ""
    line = one_line(err)
    assert str(path) in line and key in line
    assert GOOD_TOKEN not in err


def test_missing_file_as_a_process(tmp_path: Path) -> None:
    code, out, err = run_process("check", "--config.file", "nope.yaml", cwd=tmp_path)
    assert code == 2
    assert out == ""
    assert "nope.yaml" in one_line(err)


# --------------------------------------------------------------------------- check


@pytest.fixture
def api() -> Iterator[str]:
    simulator = Simulator()
    simulator.add_project(GOOD_ID, GOOD_TOKEN)
    simulator.add_project(BAD_ID, RIGHT_TOKEN)
    with SimulatorServer(simulator) as server:
        yield server.base_url


def test_check_reports_each_project(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, api: str
) -> None:
    path = write_config(
        tmp_path,
        "projects:\n"
        + project_yaml("good", api, GOOD_ID, GOOD_TOKEN)
        + project_yaml("bad", api, BAD_ID, WRONG_TOKEN),
    )
    code, out, err = run_main(capsys, "check", "--config.file", str(path))
    assert code == 1
    lines = out.splitlines()
    assert len(lines) == 3, out
    assert lines[0].startswith("good: ok (")
    assert lines[1].startswith("bad: FAILED: 401 ")
    assert lines[2].startswith("state file: ok (")
    for token in (GOOD_TOKEN, WRONG_TOKEN, RIGHT_TOKEN):
        assert token not in out + err


def test_check_all_good_exits_0(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, api: str
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(RIGHT_TOKEN + "\n", encoding="utf-8")
    path = write_config(
        tmp_path,
        "projects:\n"
        + project_yaml("good", api, GOOD_ID, GOOD_TOKEN)
        + f"  - name: second\n    space: '{api}'\n    project_id: {BAD_ID}\n"
        + f"    api_token_file: {token_file}\n",
    )
    code, out, err = run_main(capsys, "check", "--config.file", str(path))
    assert code == 0, out + err
    lines = out.splitlines()
    assert [line.split(":", 1)[0] for line in lines] == ["good", "second", "state file"]
    assert all(": ok (" in line for line in lines)
    assert GOOD_TOKEN not in out + err and RIGHT_TOKEN not in out + err


def test_check_unreachable_space_fails(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, api: str
) -> None:
    # A port nobody listens on: take the simulator's and stop it.
    simulator = SimulatorServer(Simulator())
    closed = simulator.start()
    simulator.stop()
    path = write_config(
        tmp_path,
        "request:\n  timeout: 2s\nprojects:\n"
        + project_yaml("good", api, GOOD_ID, GOOD_TOKEN)
        + project_yaml("down", closed, GOOD_ID, GOOD_TOKEN),
    )
    code, out, _ = run_main(capsys, "check", "--config.file", str(path))
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith("good: ok (")
    assert lines[1].startswith("down: FAILED: ")


def test_check_as_a_process(tmp_path: Path, api: str) -> None:
    path = write_config(
        tmp_path,
        "projects:\n"
        + project_yaml("good", api, GOOD_ID, GOOD_TOKEN)
        + project_yaml("bad", api, BAD_ID, WRONG_TOKEN),
    )
    code, out, err = run_process("check", "--config.file", str(path))
    assert code == 1, err
    assert out.splitlines()[0].startswith("good: ok (")
    assert out.splitlines()[1].startswith("bad: FAILED: 401 ")
    assert "Traceback" not in err
    for token in (GOOD_TOKEN, WRONG_TOKEN, RIGHT_TOKEN):
        assert token not in out + err


# --------------------------------------------------------------------------- run


def test_run_refuses_a_state_file_that_is_not_sqlite(tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    garbage = b"this is not a database\x00\xff" * 100
    state.write_bytes(garbage)
    path = write_config(
        tmp_path,
        f"state_path: '{state}'\nprojects:\n"
        + project_yaml("production", "http://127.0.0.1:9", "pid", GOOD_TOKEN),
    )
    code, out, err = run_process(
        "--config.file", str(path), "--web.listen-address", "127.0.0.1:0", timeout=30
    )
    assert code == 1, err
    assert "Traceback" not in err
    final = [line for line in err.splitlines() if line.startswith("signalwire-exporter: ")]
    assert len(final) == 1, err
    assert str(state) in final[0]
    assert GOOD_TOKEN not in out + err
    assert state.read_bytes() == garbage  # refused, never replaced


class FakeExporter:
    def __init__(
        self, config: Config, listen: ListenAddress | None = None, web: object = None
    ) -> None:
        self.config = config
        self.listen = listen or config.listen_address


def test_run_flag_beats_the_file(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    built: list[FakeExporter] = []

    def fake_serve(exporter: Any) -> int:
        built.append(exporter)
        return 0

    monkeypatch.setattr(cli, "Exporter", FakeExporter)
    monkeypatch.setattr(cli, "serve", fake_serve)
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path, "listen_address: '127.0.0.1:9100'\nprojects:\n" + PROJECT)
    assert cli.main([]) == 0
    assert cli.main(["run", "--web.listen-address", "[::1]:9200"]) == 0
    assert [e.listen for e in built] == [
        ListenAddress("127.0.0.1", 9100),
        ListenAddress("::1", 9200),
    ]
    assert built[0].config.source == "config.yaml"


class ScriptedExporter:
    """Stands in for the daemon: start() does what the test says, shutdown() is recorded."""

    def __init__(self, on_start: Any) -> None:
        self.on_start = on_start
        self.shutdowns = 0

    def start(self) -> None:
        self.on_start()

    def check(self) -> None:
        """Polling never stops by itself here."""

    def shutdown(self) -> None:
        self.shutdowns += 1


def test_serve_exits_0_after_sigterm(capsys: pytest.CaptureFixture[str]) -> None:
    exporter = ScriptedExporter(lambda: os.kill(os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    assert cli.serve(exporter) == 0  # type: ignore[arg-type]
    assert exporter.shutdowns == 1
    assert signal.getsignal(signal.SIGTERM) == before


def test_serve_exits_1_on_a_state_error(capsys: pytest.CaptureFixture[str]) -> None:
    # The polling process reports the state file's errors; the daemon raises them as fatal.
    def refuse() -> None:
        raise FatalError("state file x.db: cannot be read\n(file is not a database)")

    exporter = ScriptedExporter(refuse)
    assert cli.serve(exporter) == 1  # type: ignore[arg-type]
    assert exporter.shutdowns == 1
    _, err = capsys.readouterr()
    final = [line for line in err.splitlines() if line.startswith("signalwire-exporter: ")]
    assert final == [
        "signalwire-exporter: state file x.db: cannot be read (file is not a database)"
    ]


def test_check_fails_on_a_state_path_it_could_not_use(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, api: str
) -> None:
    (tmp_path / "config.yaml").write_text("placeholder")
    path = write_config(
        tmp_path,
        f"state_path: {tmp_path / 'config.yaml' / 'sw.db'}\nprojects:\n"
        + project_yaml("good", api, GOOD_ID, GOOD_TOKEN),
    )
    code, out, _ = run_main(capsys, "check", "--config.file", str(path))
    assert code == 1
    last = out.splitlines()[-1]
    assert last.startswith("state file: FAILED: ") and "is not a directory" in last
