#!/usr/bin/env bash
# The unit as packaged: `systemd-analyze verify` clean (binary, man pages and all, in a staged
# root) and `systemd-analyze security` exposure at most 2.0.
set -uo pipefail
. tests/packaging/lib.sh
if ! have systemd-analyze; then
  skip systemd-verify "systemd-analyze missing (apt-get install systemd)"
  skip systemd-security "systemd-analyze missing (apt-get install systemd)"
  exit 0
fi
stage=$WORK/systemd-root
rm -rf "$stage"
mkdir -p "$stage/usr/bin" "$stage/usr/lib/systemd/system" "$stage/usr/share/man/man8" "$stage/bin"
# The host's own units (targets, sockets) for the dependencies, then ours.
cp -a /usr/lib/systemd/system/. "$stage/usr/lib/systemd/system/"
cp systemd/postern.service "$stage/usr/lib/systemd/system/"
if [ -x target/release/postern ]; then
  cp target/release/postern "$stage/usr/bin/postern"
  target/release/postern manpages "$stage/usr/share/man/man8" >/dev/null
fi
cp /bin/kill "$stage/bin/kill"
# `verify` runs man(1) for Documentation=man:... pages: point it at the staged ones.
out=$(MANPATH="$stage/usr/share/man" systemd-analyze verify --root="$stage" postern.service 2>&1)
if [ -z "$out" ]; then
  ok systemd-verify
else
  fail systemd-verify "$out"
fi
sec=$(systemd-analyze security --offline=true systemd/postern.service 2>&1 | tail -1)
score=$(echo "$sec" | sed -n 's/.*: \([0-9.]*\) .*/\1/p')
if [ -n "$score" ] && awk "BEGIN { exit !($score <= 2.0) }"; then
  ok "systemd-security ($score)"
else
  fail systemd-security "exposure above 2.0 or unreadable: $sec"
fi
