#!/usr/bin/env bash
# Checks the systemd units in deploy/ with `systemd-analyze verify`. systemd-analyze exits 0
# even for unknown keys or unparsable values (it only warns and ignores them), so any warning
# that names a unit file fails this script.
#
# Where systemd-analyze is not there and cannot be installed (no root, no apt), this says so and
# exits 0: the unit files' key settings are still asserted by `cargo test --test deploy`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v systemd-analyze >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "verify-deploy: installing systemd (for systemd-analyze)…"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null || true
  fi
fi
if ! command -v systemd-analyze >/dev/null 2>&1; then
  echo "verify-deploy: SKIPPED — systemd-analyze is not available here and could not be installed;"
  echo "verify-deploy: the units were NOT verified by systemd (tests/deploy.rs still checks their settings)."
  exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The binaries are not installed on a build machine: point ExecStart at /bin/true so verify
# checks everything else.
for unit in deploy/*.service; do
  sed -e 's#/usr/local/bin/headcount-server#/bin/true#' -e 's#/usr/local/bin/headcount #/bin/true #' \
    "$unit" >"$tmp/$(basename "$unit")"
done
units=()
for unit in "$tmp"/*.service; do
  case "$unit" in
    *@.service) cp "$unit" "${unit%@.service}@1.service"; units+=("${unit%@.service}@1.service") ;;
    *) units+=("$unit") ;;
  esac
done

if ! out=$(cd "$tmp" && systemd-analyze verify "${units[@]}" 2>&1); then
  echo "$out"
  echo "verify-deploy: FAILED (systemd-analyze verify)"
  exit 1
fi
# Warnings about our own files (unknown keys, values ignored) are failures too.
if problems=$(echo "$out" | grep -F "$tmp/" | grep -v -e 'Unit configured to use KillMode=none' || true); [ -n "$problems" ]; then
  echo "$problems"
  echo "verify-deploy: FAILED (warnings about the units above)"
  exit 1
fi
[ -n "$out" ] && echo "$out"
echo "verify-deploy: OK — ${#units[@]} units verified by $(systemd-analyze --version | head -1)"
