#!/usr/bin/env bash
# The real Prometheus tools the test suite runs: prometheus, promtool, alertmanager and amtool (and
# openssl, which makes the certificates of the TLS tests).
#
# Tools already on PATH are used as they are. Missing ones are taken from the distribution's
# packages (Debian/Ubuntu: prometheus, prometheus-alertmanager) WITHOUT installing them: the .deb
# files are downloaded and unpacked under VENV/tools, and their binaries linked into VENV/bin. No
# service is installed, enabled or started, and nothing outside VENV changes except apt's package
# lists (apt-get update, with sudo when not root) and, when the system has no Alertmanager
# templates, a symlink /usr/share/prometheus/alertmanager to the unpacked ones (Debian's
# Alertmanager reads its default templates from there, not from its binary). openssl, when
# missing, is installed with apt-get (it has no service). ENSURE_TOOLS_LOCAL=1 takes the
# Prometheus tools from the packages even when the system has them.
#
# Usage: scripts/ensure-tools.sh [VENV]   (default .venv)
set -euo pipefail

venv="${1:-.venv}"
tools="$venv/tools"

# Found in VENV/bin, or on PATH (unless ENSURE_TOOLS_LOCAL is set).
found() {
  [ -x "$venv/bin/$1" ] || { [ -z "${ENSURE_TOOLS_LOCAL:-}" ] && command -v "$1" >/dev/null; }
}

packages=()
{ found promtool && found prometheus; } || packages+=(prometheus)
{ found amtool && { found alertmanager || found prometheus-alertmanager; }; } \
  || packages+=(prometheus-alertmanager)
need_openssl=""
command -v openssl >/dev/null || need_openssl=1
[ ${#packages[@]} -eq 0 ] && [ -z "$need_openssl" ] && exit 0

if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
  echo "ensure-tools: put Prometheus, promtool, Alertmanager, amtool and openssl on PATH" \
    "(the tests run the real ones)" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "ensure-tools: fetching ${packages[*]:-}${need_openssl:+ openssl} with apt-get" \
  "(Prometheus tools unpacked under $tools, no service installed)" >&2
$sudo apt-get update -qq
if [ -n "$need_openssl" ]; then
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends openssl >/dev/null
fi
[ ${#packages[@]} -eq 0 ] && exit 0

mkdir -p "$tools/debs" "$tools/root" "$venv/bin"
sandbox=()
[ "$(id -u)" -eq 0 ] && sandbox=(-o APT::Sandbox::User=root)  # root cannot drop to _apt here
(cd "$tools/debs" && apt-get download -qq "${sandbox[@]}" "${packages[@]}")
for deb in "$tools"/debs/*.deb; do
  dpkg-deb -x "$deb" "$tools/root"
done
root="$(cd "$tools/root" && pwd)"
for bin in prometheus promtool prometheus-alertmanager amtool; do
  if [ -x "$root/usr/bin/$bin" ]; then
    ln -sf "$root/usr/bin/$bin" "$venv/bin/$bin"
  fi
done
if [ -x "$venv/bin/prometheus-alertmanager" ]; then
  ln -sf "$root/usr/bin/prometheus-alertmanager" "$venv/bin/alertmanager"
fi
templates=/usr/share/prometheus/alertmanager
if [ -e "$root$templates/default.tmpl" ] && [ ! -e "$templates/default.tmpl" ] \
  && { [ -L "$templates" ] || [ ! -e "$templates" ]; }; then
  $sudo mkdir -p "$(dirname "$templates")"
  $sudo ln -sfn "$root$templates" "$templates"
  echo "ensure-tools: $templates -> $root$templates (Alertmanager's default templates)" >&2
fi
echo "ensure-tools: $(ls "$venv/bin" | grep -E '^(prometheus|promtool|alertmanager|prometheus-alertmanager|amtool)$' | tr '\n' ' ')in $venv/bin" >&2
