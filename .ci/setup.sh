#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine (run as root):
# the real peers the tests talk to, and the project with its test dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    packages=(util-linux iproute2 iptables procps chromium wrk iperf3)
    missing=()
    for package in "${packages[@]}"; do
        dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}"
    fi
    for extra in .ci/install-*.sh; do
        [ -f "$extra" ] && bash "$extra"
    done
fi

python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
