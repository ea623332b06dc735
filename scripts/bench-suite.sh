#!/usr/bin/env bash
# Runs every benchmark of BENCHMARKS.md 3 times in one sequence (side by side, same binary) and
# prints the medians. Usage: scripts/bench-suite.sh [out-dir] [duration, default 8s]
# (about 20 minutes; QUICK=1 runs each once, 2 s, 200 streams: a check that every mode runs;
# HEADCOUNT_BIN=path uses that binary, with headcount-server beside it, instead of building).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-$(mktemp -d -t headcount-bench-XXXX)}"
d="${2:-8s}"
mkdir -p "$out"
B="${HEADCOUNT_BIN:-./target/release/headcount}"
[ -n "${HEADCOUNT_BIN:-}" ] || cargo build --release --quiet
ulimit -n 20000 2>/dev/null || true
rounds=(1 2 3); small=()
if [ "${QUICK:-0}" = 1 ]; then rounds=(1); d=2s; small=(--streams 200 --connections 10); fi
failed=0
run() { local name=$1; shift; "$B" bench "$@" "${small[@]}" --json > "$out/$name-$i.json" 2>>"$out/errors.log" || { echo "failed: $name $*" >&2; failed=1; }; }
for i in "${rounds[@]}"; do
  # Headline: what sites send.
  run agents-ref agents --rate 835 --duration "$d"                 # the reference peak (1.5 M check-ins in 30 min)
  run agents-100k agents --rate 100000 --duration "$d"             # 120x the reference peak
  run sat1-journal saturate --duration "$d"                          # agent shape: 1 report per batch
  run sat1-mem saturate --duration "$d" --in-memory
  run sat4-journal saturate --duration "$d" --reports-per-batch 4    # agent shape at most: all 4 sessions at once
  run sat1-reads saturate --duration "$d" --separate-reads
  run sat1-t1 saturate --duration "$d" --server-threads 1
  run sat1-t2 saturate --duration "$d" --server-threads 2
  run pacedref paced --rate 835 --duration "$d"
  run paced100x paced --rate 83500 --duration "$d"
  run paced300k paced --rate 300000 --duration "$d"
  # Transport stress (NOT what sites send: 64 reports per batch, 16 per register).
  run stress64-journal stress --duration "$d"
  run stress64-mem stress --duration "$d" --in-memory
  # Streams and state.
  run idle idle
  if [ "${QUICK:-0}" != 1 ]; then run idle-own idle --connections 10034; fi
  run storm storm
  run storm-mem storm --in-memory
  run recovery recovery --records "$([ "${QUICK:-0}" = 1 ] && echo 200000 || echo 10000000)"
done
python3 - "$out" <<'PY'
import json, glob, os, statistics, sys
groups = {}
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    text = open(f).read()
    if "{" not in text:
        continue
    groups.setdefault(os.path.basename(f).rsplit("-", 1)[0], []).append(json.loads(text[text.index("{"):]))
def med(ds, key, sub=None):
    vals = [d[key][sub] if sub else d[key] for d in ds]
    vals = [v for v in vals if v is not None]
    return round(statistics.median(vals), 2) if vals else None
def per_core(ds):
    # Applied reports per second of server CPU: the efficiency a thread count achieves, whatever
    # share of the 2 cores the load generator leaves the server.
    vals = [d["applied_per_second"] / d["server_cpu_cores"] for d in ds if d.get("server_cpu_cores")]
    return f"{statistics.median(vals):.4g}" if vals else None
for name, ds in groups.items():
    print(f"{name:16} runs={len(ds)} applied/s={med(ds,'applied_per_second')} check-ins={med(ds,'check_ins')} "
          f"ack p50/p99/p999={med(ds,'ack_latency','p50_ms')}/{med(ds,'ack_latency','p99_ms')}/{med(ds,'ack_latency','p999_ms')} ms "
          f"ack misses={med(ds,'ack_latency','misses')} fresh p99={med(ds,'watch_freshness','p99_ms')} ms "
          f"(misses {med(ds,'watch_freshness','misses')}) query p99={med(ds,'totals_query','p99_ms')} ms "
          f"rss={med(ds,'server_rss_mb')} MB cpu={med(ds,'server_cpu_cores')} per-server-core={per_core(ds)}/s "
          f"fair={med(ds,'fairness_max_over_min')} admit={med(ds,'admit_all_seconds')} s "
          f"B/stream={med(ds,'bytes_per_stream')} startup={med(ds,'startup_seconds')} s "
          f"resync={med(ds,'resync_acknowledged')} durable={med(ds,'resumed_durable')} recovered-checks={med(ds,'totals_checked')}")
PY
echo "raw JSON in $out"
exit "$failed"
