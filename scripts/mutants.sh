#!/usr/bin/env bash
# Mutation testing with cargo-mutants over the code that decides a count, an ack or what is
# recovered: every mutant (a small change to the code) must make some test fail. NOT run in CI:
# each group takes minutes to an hour on 2 cores. Results: TESTING.md (update it after a run).
#
# Usage: scripts/mutants.sh [GROUP...]      GROUP: counting rollups apply durability reporter all
#                                           (default: counting rollups)
#
# Each group names its files, the fast test targets that should kill their mutants, and (for the
# big groups) a regex of the mutants that decide a count, an ack or what is recovered:
#   counting     server/registers.rs    the counting rule           unit tests (--lib)
#   rollups      server/tally.rs        rollups kept on write       unit tests (--lib)
#   apply        server/aggregator.rs   resume, apply_batch, refuse, record_correction
#                                       tests/ingest, tests/model_proptest
#   durability   server/durability/, server/persist.rs   flusher commit/ack, journal commit,
#                                       recovery, snapshot retirement   tests/durability_faults, tests/crash_points
#   reporter     client/reporter/       resume and ack reconciliation, seq bumps
#                                       tests/agent_state, tests/reporter, tests/reporter_refusals
# MUTANTS_ALL=1 drops the regexes (every mutant of the files: hours, not minutes).
# Bounded: --jobs 1, a per-mutant test timeout (--timeout), a build timeout, and `timeout` around
# each group (MUTANTS_GROUP_TIMEOUT, default 2 h). Builds go to target/mutants (kept between
# runs, without debug info, so only the mutated crate is rebuilt; it may hold the LAST MUTANT's
# build afterwards, so never run the ordinary tests with it as the target directory); the report to
# target/mutants-out/GROUP/mutants.out (caught.txt, missed.txt, timeout.txt, unviable.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo mutants --version >/dev/null 2>&1; then
  echo "installing cargo-mutants (once; several minutes)…" >&2
  cargo install cargo-mutants --locked
fi
export CARGO_TARGET_DIR="$PWD/target/mutants" CARGO_PROFILE_DEV_DEBUG=0
group_timeout="${MUTANTS_GROUP_TIMEOUT:-7200}"
# A unified diff whose added lines are the lines of the mutants matching $2 (for --in-diff).
select_lines() {
  local out="target/mutants-out/$1.select.diff" file lines
  mkdir -p target/mutants-out && : > "$out"
  cargo mutants --list "${files[@]}" --re "$2" | grep -E "$2" | sed -E 's/^([^:]+):([0-9]+):.*/\1 \2/' | sort -u -k1,1 -k2,2n |
    awk '{l[$1]=l[$1] " " $2} END {for (f in l) print f l[f]}' | while read -r file lines; do
      awk -v del=" $lines " 'index(del, " " NR " ") == 0' "$file" > "$out.tmp"
      diff -u --label "a/$file" --label "b/$file" "$out.tmp" "$file" >> "$out" || true
    done
  rm -f "$out.tmp"; echo "$out"
}
run() {
  local name=$1 re=$2; shift 2
  local files=() tests=()
  while [ "$1" != "--" ]; do files+=(--file "$1"); shift; done
  if [ -n "$re" ] && [ -z "${MUTANTS_ALL:-}" ]; then
    # cargo-mutants 27.1 applies --re to every mutant but "delete field" ones; an --in-diff that
    # marks only the selected lines as added drops those too (see select_lines).
    files+=(--re "$re" --in-diff "$(select_lines "$name" "$re")")
  fi
  shift
  # Test targets go to every cargo call (build and test), so only they are rebuilt per mutant.
  for t in "$@"; do tests+=(--cargo-arg="$t"); done
  echo "== $name: ${files[*]} -- ${tests[*]}" >&2
  mkdir -p "target/mutants-out/$name"
  timeout "$group_timeout" cargo mutants --jobs 1 --timeout "${MUTANTS_TEST_TIMEOUT:-300}" --build-timeout 900 --no-shuffle \
    --baseline "${MUTANTS_BASELINE:-run}" \
    --output "target/mutants-out/$name" "${files[@]}" "${tests[@]}" || true
  for f in missed timeout unviable caught; do
    printf '%-9s %s\n' "$f" "$(wc -l < "target/mutants-out/$name/mutants.out/$f.txt" 2>/dev/null || echo '?')"
  done
  echo "survivors (missed):"; cat "target/mutants-out/$name/mutants.out/missed.txt" 2>/dev/null || true
}
# The mutants that decide a count, an ack or what is recovered (names as `cargo mutants --list`).
apply_re=':285:26: replace > with >=|resume_durable|delete field registers|:394:41|:415:42: replace < with (<=|>)|Aggregator::refuse with|record_correction with'
durability_re='mod.rs:128:|mod.rs:292:|mod.rs:224:12|journal.rs:94:|recover.rs:(60:26: replace > with >=|105:|180:)|snapshot.rs:67:72: replace < with <=|persist.rs:(103:|176:9: replace .* with vec!\[\])'
reporter_re='reconcile.rs:(34:31: replace > with >=|43:57|105:22: replace > with >=|105:64|129:21|144:61: replace - with \+|145:40: replace \+ with -|157:|167:39|179:17)|bump -> Result<u64, ReporterError> with Ok\(1\)'
groups=("$@"); [ ${#groups[@]} -eq 0 ] && groups=(counting rollups)
[ "${groups[0]}" = all ] && groups=(counting rollups apply durability reporter)
for g in "${groups[@]}"; do
  case $g in
    counting)   run counting '' server/registers.rs -- --lib ;;
    rollups)    run rollups '' server/tally.rs -- --lib ;;
    apply)      run apply "$apply_re" server/aggregator.rs -- --test=ingest --test=model_proptest ;;
    durability) run durability "$durability_re" 'server/durability/**' server/persist.rs -- --test=durability_faults --test=crash_points ;;
    reporter)   run reporter "$reporter_re" 'client/reporter/**' -- --test=agent_state --test=reporter --test=reporter_refusals ;;
    *) echo "unknown group $g (counting rollups apply durability reporter all)" >&2; exit 2 ;;
  esac
done
