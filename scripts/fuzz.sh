#!/usr/bin/env bash
# Run each cargo-fuzz target for a fixed time.
#
#   scripts/fuzz.sh [SECONDS]      (default 60 per target)
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`) and a nightly toolchain (cargo-fuzz passes
# -Z flags for the sanitizer). Without nightly it falls back to the stable toolchain with
# RUSTC_BOOTSTRAP=1, which unlocks the same flags. Crashes land in fuzz/artifacts/<target>/.
# CI only checks that the targets compile (.ci/run); this script is for running them.
set -euo pipefail

secs="${1:-60}"
case "$secs" in
  ''|*[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 64 ;;
esac
cd "$(dirname "$0")/.."

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz is not installed; install it with: cargo install cargo-fuzz" >&2
  exit 2
fi

toolchain=()
if command -v rustup >/dev/null 2>&1 && rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  toolchain=(+nightly)
  echo "using the nightly toolchain: $(cargo +nightly --version)"
else
  echo "no nightly toolchain found (only stable $(rustc --version | cut -d' ' -f2));" \
       "using stable with RUSTC_BOOTSTRAP=1 so cargo-fuzz can pass its -Z flags"
  export RUSTC_BOOTSTRAP=1
fi

# Every [[bin]] of fuzz/Cargo.toml; a target without a seeds/ directory starts from nothing.
mapfile -t targets < <(cargo "${toolchain[@]}" fuzz list)
status=0
for target in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$target" "fuzz/seeds/$target"
  echo "== fuzzing $target for ${secs}s"
  if ! cargo "${toolchain[@]}" fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1; then
    echo "!! $target found a crash: see fuzz/artifacts/$target/" >&2
    status=1
  fi
done
exit "$status"
