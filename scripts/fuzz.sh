#!/usr/bin/env bash
# Runs each coverage-guided fuzz target (fuzz/fuzz_targets/) for a bounded time with cargo fuzz
# (libFuzzer). Not part of CI: run it by hand, e.g. before a release.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default 240 s, all targets)
#
# Needs `cargo install cargo-fuzz`. On a stable toolchain cargo fuzz needs RUSTC_BOOTSTRAP=1 (it
# passes -Z flags); no sanitizer is used (the code forbids `unsafe`), debug assertions are on
# (overflow checks). One fuzzing job per target, one target at a time: the machine stays usable.
# The corpus grows in fuzz/corpus/<target>/ (not committed; seeds in fuzz/seeds/<target>/ are);
# a crash, timeout or out-of-memory input is written to fuzz/artifacts/<target>/ and the script
# exits non-zero: keep that input as a regression test in tests/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-240}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(ingest_apply registry_load recover)
export RUSTC_BOOTSTRAP=1
cargo fuzz build -s none -O -a
status=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "seeds/$t" "artifacts/$t"
  log="artifacts/$t/last-run.log"
  echo "== $t: ${secs}s"
  if cargo fuzz run -s none -O -a "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048 \
      -print_final_stats=1 >"$log" 2>&1; then
    :
  else
    status=1
    echo "   FAILED: see fuzz/$log and fuzz/artifacts/$t/"
  fi
  grep -E "^stat::number_of_executed_units|^stat::peak_rss_mb|Done [0-9]+ runs|#[0-9]+.*DONE" "$log" | sed 's/^/   /' || true
  echo "   corpus: $(ls "corpus/$t" | wc -l) inputs"
done
exit $status
