#!/usr/bin/env bash
# The tests of what ships, beside `cargo test`: the systemd unit (systemd-analyze), the .deb
# (dpkg install, run, remove, purge inside a Debian 12 container), and the Docker image
# (built without a registry, run with compose next to a client container).
#
# Built once per run and shared: the release binary, one Debian 12 root made with debootstrap
# (imported as the image postern-test/debian:bookworm, also the client of the Docker test),
# the .deb. Set POSTERN_KEEP_ROOT=1 to keep the root between runs on a developer machine.
set -uo pipefail
cd "$(dirname "$0")/../.."
export WORK=$PWD/target/packaging-test
mkdir -p "$WORK"
: > "$WORK/results"
. tests/packaging/lib.sh
start=$(date +%s)
phase() { echo "--- $1 ($(( $(date +%s) - start )) s)"; }

# The Debian root downloads while the release binary compiles (one waits on the network, the
# other on the CPU).
make_root() {
  local root=$WORK/bookworm-root
  rm -rf "$root"
  # php-cli: PHP's mail() through the packaged sendmail; libphp-phpmailer: WordPress's mailer,
  # for the Docker test's client; ca-certificates and systemd-standalone-sysusers: dependencies of
  # the .deb (a container has no systemd).
  debootstrap --variant=minbase --include=php-cli,libphp-phpmailer,ca-certificates,systemd-standalone-sysusers \
      bookworm "$root" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
    && tar -C "$root" -c . | docker import - "$DEBIAN_IMAGE" >/dev/null
  local rc=$?
  rm -rf "$root"
  return $rc
}
root_pid=""
if ! have debootstrap || ! have docker; then
  skip debian-root "debootstrap or docker missing (apt-get install debootstrap docker.io)"
elif docker image inspect "$DEBIAN_IMAGE" >/dev/null 2>&1 && [ -n "${POSTERN_KEEP_ROOT:-}" ]; then
  echo "reusing the image $DEBIAN_IMAGE"
else
  phase "Debian 12 root (debootstrap, in the background)"
  make_root &
  root_pid=$!
fi

phase "release binary"
if ! cargo build --release --locked --bin postern >"$WORK/release-build.log" 2>&1; then
  tail -30 "$WORK/release-build.log" >&2
  fail release-build "cargo build --release failed"
fi

phase "systemd unit"
bash tests/packaging/systemd.sh

if [ -n "$root_pid" ]; then
  phase "waiting for the Debian 12 root"
  if wait "$root_pid"; then
    ok debian-root
  else
    tail -20 "$WORK/debootstrap.log" >&2
    fail debian-root "debootstrap or docker import failed"
  fi
fi

phase "Debian package"
bash tests/packaging/deb.sh

phase "Docker image"
bash tests/packaging/docker.sh

phase "done"
passed=$(grep -c '^ok ' "$WORK/results" || true)
failed=$(grep -c '^fail ' "$WORK/results" || true)
skipped=$(grep -c '^skip ' "$WORK/results" || true)
echo "packaging tests took $(( $(date +%s) - start )) s"
echo "packaging: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
