#!/usr/bin/env bash
# The test command: installs what the tests need when it is missing (Debian packages: headless
# Chromium and its WebDriver for the browser test, etcd-server for the cluster-mode tests), then
# runs `cargo test "$@"`.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
# tests/cluster*.rs start real etcd clusters (Debian's etcd-server ships /usr/bin/etcd).
command -v etcd >/dev/null || [ -x /usr/bin/etcd ] || missing+=(etcd-server)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "scripts/test.sh: installing ${missing[*]} (needed by tests/browser.rs and tests/cluster*.rs)" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { echo "scripts/test.sh: run as root or install: ${missing[*]}" >&2; exit 1; }
        SUDO="sudo"
    fi
    $SUDO apt-get update || { echo "scripts/test.sh: apt-get update failed; cannot install: ${missing[*]}" >&2; exit 1; }
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${missing[@]}" ||
        { echo "scripts/test.sh: apt-get install failed for: ${missing[*]}; install them by hand" >&2; exit 1; }
    # etcd-server's postinst may start a system etcd on 2379; the tests use their own ports and
    # do not need it.
    command -v etcd >/dev/null || [ -x /usr/bin/etcd ] ||
        { echo "scripts/test.sh: package etcd-server installed but no etcd binary found" >&2; exit 1; }
fi

exec cargo test "$@"
