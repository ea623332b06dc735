#!/usr/bin/env bash
# Side-by-side, in one run on this machine: Redis HINCRBY over 10,035 fields (pipeline 1, 16, 64;
# no persistence, loopback) and Headcount's saturate benchmark; prints the ratios.
# Usage: scripts/compare-redis.sh [seconds of Headcount load, default 8]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-8}"
if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null; then
  echo "installing redis-server and redis-tools (Debian packages)…" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
fi
cargo build --release --quiet
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize no >/dev/null &
redis_pid=$!
trap 'kill $redis_pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.05; done
declare -A redis
for p in 1 16 64; do
  n=$(( p == 1 ? 200000 : 2000000 ))
  rps=$(redis-benchmark -p "$port" -q -n "$n" -r 10035 -P "$p" -c 50 --csv hincrby headcount "field:__rand_int__" 1 \
        | tail -1 | cut -d, -f2 | tr -d '"')
  redis[$p]=$rps
  printf 'redis HINCRBY -P %-2s: %12.0f ops/s\n' "$p" "$rps"
done
json=$(./target/release/headcount bench saturate --duration "${secs}s" --reports-per-batch 64 --json 2>/dev/null)
ours=$(printf '%s' "$json" | python3 -c 'import json,sys; print(json.load(sys.stdin)["applied_per_second"])')
printf 'headcount saturate  : %12.0f applied reports/s (journal on, 10,034 streams, 64 reports per batch)\n' "$ours"
for p in 1 16 64; do
  python3 -c "print('ratio headcount / redis -P $p: %.2f' % ($ours / ${redis[$p]}))"
done
