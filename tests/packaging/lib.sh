# Shared by the packaging tests (sourced). Each test script calls `ok NAME` or `fail NAME WHY`;
# run.sh prints the totals. Work files live under target/packaging-test/.
WORK=${WORK:-$PWD/target/packaging-test}
mkdir -p "$WORK"
RESULTS=$WORK/results
DEBIAN_IMAGE=postern-test/debian:bookworm

ok() { echo "ok   $1"; echo "ok $1" >> "$RESULTS"; }
fail() { echo "FAIL $1: $2" >&2; echo "fail $1" >> "$RESULTS"; }
# A tool is missing: on a developer's machine the test is skipped, loudly; in CI
# (CI=true, where scripts/test installs everything) that is a failure.
skip() {
  if [ -n "${CI:-}" ]; then
    fail "$1" "skipped in CI: $2"
  else
    echo "SKIPPED $1: $2"
    echo "skip $1" >> "$RESULTS"
  fi
}
have() { command -v "$1" >/dev/null 2>&1; }
# Wait until "$@" succeeds, for at most $WAIT seconds (default 60).
wait_for() {
  local i=0 max=${WAIT:-60}
  until "$@" >/dev/null 2>&1; do
    i=$((i + 1))
    [ "$i" -ge "$((max * 2))" ] && return 1
    sleep 0.5
  done
}
