#!/usr/bin/env bash
# Installs the real peers the tests start on loopback: HAProxy, nginx with its stream
# module and Postfix for the PROXY protocol interop tests, and Prometheus (with
# promtool) for the metrics, alert rule and dashboard tests. Idempotent; run as root.
#
# Postfix is preseeded to "No configuration" so that installing it neither asks
# questions nor writes /etc/postfix/main.cf nor starts a system mail server: the
# tests run private instances with their own config and queue directories. Prometheus
# likewise is never started as a service: the tests run their own, with their own data
# directory.
set -euo pipefail

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "install-peers: needs root and apt-get; skipping" >&2
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
packages=(haproxy nginx libnginx-mod-stream postfix prometheus)
missing=()
for package in "${packages[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
[ "${#missing[@]}" -eq 0 ] && exit 0

echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
# Nothing installed here may start as a system service (no init system in CI, and
# the tests bind their own loopback ports).
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    created_policy=1
fi
trap '[ "$created_policy" = 1 ] && rm -f "$policy"' EXIT

if ! apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
