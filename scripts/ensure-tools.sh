#!/usr/bin/env bash
# Installs the real Prometheus tools the test suite runs, from the distribution's packages, when
# they are missing. Debian/Ubuntu: prometheus (prometheus, promtool) and prometheus-alertmanager
# (alertmanager, amtool); openssl makes the certificates of the TLS tests.
set -euo pipefail

missing=()
command -v promtool >/dev/null && command -v prometheus >/dev/null || missing+=(prometheus)
command -v amtool >/dev/null \
  && { command -v alertmanager >/dev/null || command -v prometheus-alertmanager >/dev/null; } \
  || missing+=(prometheus-alertmanager)
command -v openssl >/dev/null || missing+=(openssl)
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null; then
  echo "ensure-tools: install ${missing[*]} (Prometheus and Alertmanager with promtool and amtool)" >&2
  exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "ensure-tools: installing ${missing[*]} with apt-get" >&2
$sudo apt-get update -qq
# The packages' services are not wanted: the tests start their own instances.
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
