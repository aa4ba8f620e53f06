#!/bin/sh
# Install the contenders and load generators of the benchmark from Debian packages.
# Idempotent: packages already present are left alone; apt-get update runs only when
# an install fails (stale package lists), so repeated runs stay offline and fast.
set -eu

PACKAGES="haproxy nginx libnginx-mod-stream wrk iperf3 util-linux iproute2"

missing=""
for pkg in $PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $pkg"
    fi
done

if [ -z "$missing" ]; then
    echo "bench/install.sh: all of $PACKAGES already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
echo "bench/install.sh: installing$missing"
# shellcheck disable=SC2086  # word splitting of the package list is intended
if ! $SUDO apt-get install -y --no-install-recommends $missing; then
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends $missing
fi

# The Debian packages enable and start system-wide haproxy/nginx/iperf3 services where an
# init system runs; the benchmark starts its own instances with generated configs, so the
# system ones are stopped to keep their ports and CPU out of the measurement.
for service in haproxy nginx; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$service" 2>/dev/null; then
        $SUDO systemctl stop "$service" || true
    fi
done
