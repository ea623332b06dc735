#!/usr/bin/env bash
# Headcount against Redis, like for like, side by side in one run on this machine.
#
# What is compared: state-changing updates per second at the same depth of requests in flight,
# 50 connections with D requests in flight on each (D = 1, 16, 64), one update per request, over
# 10,035 registers, on loopback, without persistence on either side (plus our journaled figure):
#   - Redis `HINCRBY reg:N count 1` (redis-benchmark -c 50 -P D): the cheapest state change Redis
#     has; no seq check, no rollups — less work than one of our reports.
#   - Redis running our counting rule as a Lua script (EVALSHA, same -c 50 -P D): a new seq for the
#     register, compare it with the stored seq, store (seq, count), add the change to a national
#     and a per-register rollup — the work one of our reports does (we keep four rollups).
#   - Headcount `bench saturate --streams 50 --connections 50 --window D --reports-per-batch 1`:
#     one stream per connection, D batches in flight, each batch one report (one register),
#     in memory and with the journal (group commit + fsync before the ack).
# Usage: scripts/compare-redis.sh [seconds of Headcount load per depth, default 8]
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
rule='local seq = redis.call("HINCRBY", KEYS[1], "next", 1)
local stored = tonumber(redis.call("HGET", KEYS[1], "seq") or "0")
if seq <= stored then return 0 end
local old = tonumber(redis.call("HGET", KEYS[1], "count") or "0")
local count = old + 1
redis.call("HSET", KEYS[1], "seq", seq, "count", count)
redis.call("HINCRBY", "rollup", "national", count - old)
redis.call("HINCRBY", "rollup", KEYS[1], count - old)
return 1'
sha=$(redis-cli -p "$port" script load "$rule")
rb() { # depth, then the command
  local p=$1; shift
  local n=$(( p == 1 ? 300000 : 3000000 ))
  redis-benchmark -p "$port" -q -n "$n" -r 10035 -P "$p" -c 50 --csv "$@" | tail -1 | cut -d, -f2 | tr -d '"'
}
ours() { # depth, extra flags
  local p=$1; shift
  ./target/release/headcount bench saturate --streams 50 --connections 50 --window "$p" --reports-per-batch 1 \
    --duration "${secs}s" --json "$@" 2>/dev/null \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["applied_per_second"])'
}
printf '%-6s %14s %14s %14s %14s %10s\n' depth redis-HINCRBY redis-rule-lua ours-memory ours-journal 'memory/lua'
for p in 1 16 64; do
  hincr=$(rb "$p" hincrby "counter:__rand_int__" count 1)
  lua=$(rb "$p" evalsha "$sha" 1 "reg:__rand_int__")
  mem=$(ours "$p" --in-memory)
  jour=$(ours "$p")
  python3 -c "print('%-6s %14.0f %14.0f %14.0f %14.0f %9.2fx' % ('$p', $hincr, $lua, $mem, $jour, $mem / $lua))"
done
echo "updates/s; depth = requests in flight per connection, 50 connections; one update per request."
