#!/usr/bin/env bash
# Runs every benchmark of BENCHMARKS.md 3 times in one sequence (side by side, same binary) and
# prints the medians. Usage: scripts/bench-suite.sh [out-dir]   (takes about 10 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-$(mktemp -d -t headcount-bench-XXXX)}"
mkdir -p "$out"
cargo build --release --quiet
ulimit -n 20000 2>/dev/null || true
B=./target/release/headcount
run() { local name=$1; shift; "$B" bench "$@" --json > "$out/$name-$i.json" 2>>"$out/errors.log" || echo "failed: $name $*" >&2; }
for i in 1 2 3; do
  run sat-journal saturate --duration 8s
  run sat-mem saturate --duration 8s --in-memory
  run sat64-journal saturate --duration 8s --reports-per-batch 64
  run sat64-mem saturate --duration 8s --reports-per-batch 64 --in-memory
  run sat64-t1 saturate --duration 8s --reports-per-batch 64 --server-threads 1
  run sat64-t2 saturate --duration 8s --reports-per-batch 64 --server-threads 2
  run sat-reads saturate --duration 8s --separate-reads
  run sat64-reads saturate --duration 8s --separate-reads --reports-per-batch 64
  run paced1m paced --rate 1000000 --reports-per-batch 64 --duration 8s
  run pacedref paced --rate 835 --reports-per-batch 1 --duration 8s
  run paced100x paced --rate 83500 --reports-per-batch 1 --duration 8s
  run idle idle
  run idle-own idle --connections 10035
  run storm storm
  run recovery recovery --records 10000000
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
    print(f"{name:14} runs={len(ds)} applied/s={med(ds,'applied_per_second')} "
          f"ack p50/p99={med(ds,'ack_latency','p50_ms')}/{med(ds,'ack_latency','p99_ms')} ms "
          f"fresh p99={med(ds,'watch_freshness','p99_ms')} ms query p99={med(ds,'totals_query','p99_ms')} ms "
          f"rss={med(ds,'server_rss_mb')} MB cpu={med(ds,'server_cpu_cores')} "
          f"per-server-core={per_core(ds)}/s fair={med(ds,'fairness_max_over_min')} "
          f"admit={med(ds,'admit_all_seconds')} s B/stream={med(ds,'bytes_per_stream')} startup={med(ds,'startup_seconds')} s")
PY
echo "raw JSON in $out"
