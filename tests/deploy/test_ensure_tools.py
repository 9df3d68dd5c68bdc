"""scripts/ensure-tools.sh, which `make test` runs: missing Prometheus tools are fetched from the
distribution's packages without installing them (no service enabled or started), and tools
already there are left alone. apt-get, dpkg-deb and friends are stand-ins recording their calls."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "ensure-tools.sh"

FAKE_APT = """#!/bin/sh
echo "apt-get $*" >> "$CALLS"
if [ "$1" = download ] || [ "$2" = download ] || [ "$3" = download ]; then
  for pkg in "$@"; do
    case "$pkg" in prometheus|prometheus-alertmanager) touch "$pkg.deb" ;; esac
  done
fi
"""
FAKE_DPKG_DEB = """#!/bin/sh
echo "dpkg-deb $*" >> "$CALLS"
mkdir -p "$3/usr/bin"
case "$2" in
  *prometheus.deb) bins="prometheus promtool" ;;
  *prometheus-alertmanager.deb) bins="prometheus-alertmanager amtool" ;;
esac
for b in $bins; do
  printf '#!/bin/sh\\n' > "$3/usr/bin/$b"
  chmod +x "$3/usr/bin/$b"
done
"""
RECORDER = """#!/bin/sh
echo "$(basename "$0") $*" >> "$CALLS"
"""


def fake_path(tmp_path: Path, with_tools: bool) -> Path:
    """A PATH with the shell's basics, fake apt tools, and (or not) fake Prometheus tools."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    scripts = {"apt-get": FAKE_APT, "dpkg-deb": FAKE_DPKG_DEB, "systemctl": RECORDER}
    scripts |= {"sudo": RECORDER, "openssl": RECORDER}
    if with_tools:
        for name in ("prometheus", "promtool", "alertmanager", "amtool"):
            scripts[name] = RECORDER
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    for name in ("sh", "bash", "mkdir", "ln", "ls", "grep", "tr", "id", "touch", "basename",
                 "printf", "chmod", "cat", "dirname"):  # fmt: skip
        real = subprocess.run(["sh", "-c", f"command -v {name}"], capture_output=True, text=True)
        if real.stdout.strip().startswith("/"):
            (bin_dir / name).symlink_to(real.stdout.strip())
    return bin_dir


def run(tmp_path: Path, with_tools: bool, local: bool = False) -> tuple[int, list[str], Path]:
    calls = tmp_path / "calls"
    calls.touch()
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    env = {"PATH": str(fake_path(tmp_path, with_tools)), "CALLS": str(calls), "HOME": str(tmp_path)}
    if local:
        env["ENSURE_TOOLS_LOCAL"] = "1"
    done = subprocess.run(
        ["bash", str(SCRIPT), str(venv)], env=env, capture_output=True, text=True, timeout=60
    )
    assert "Traceback" not in done.stderr
    return done.returncode, calls.read_text().splitlines(), venv


def test_missing_tools_are_unpacked_into_the_venv_not_installed(tmp_path: Path) -> None:
    code, calls, venv = run(tmp_path, with_tools=False)
    assert code == 0, calls
    assert not [c for c in calls if c.startswith("apt-get") and " install " in f" {c} "]
    assert not [c for c in calls if c.startswith("systemctl")]
    assert any("download" in c and "prometheus-alertmanager" in c for c in calls), calls
    for tool in ("prometheus", "promtool", "alertmanager", "amtool"):
        linked = venv / "bin" / tool
        assert linked.is_symlink() and os.access(linked, os.X_OK), tool
        assert str(venv / "tools") in os.readlink(linked)


def test_tools_already_there_are_used_as_they_are(tmp_path: Path) -> None:
    code, calls, venv = run(tmp_path, with_tools=True)
    assert code == 0
    assert calls == [], "nothing fetched, nothing installed"
    assert list((venv / "bin").iterdir()) == []


def test_a_second_run_fetches_nothing_more(tmp_path: Path) -> None:
    code, _, venv = run(tmp_path, with_tools=False, local=True)
    assert code == 0
    calls = tmp_path / "calls"
    calls.write_text("")
    env = {"PATH": str(tmp_path / "fakebin"), "CALLS": str(calls), "ENSURE_TOOLS_LOCAL": "1"}
    again = subprocess.run(["bash", str(SCRIPT), str(venv)], env=env, timeout=60)
    assert again.returncode == 0 and calls.read_text() == ""
