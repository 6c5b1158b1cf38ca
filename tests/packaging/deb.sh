#!/usr/bin/env bash
# The .deb on a clean Debian 12 (a container made from the debootstrap root, so the CI host
# installs nothing): dpkg -i; the user, directories, conffile, alternatives, man pages and
# completions are there; `postern check` passes as the service user; the daemon (started by
# hand: no systemd in the container) takes PHP's mail() through the sendmail alternative, run
# as www-data; dpkg -r keeps the configuration and the spool; dpkg -P removes the
# configuration and the state, and keeps a spool that still holds mail.
set -uo pipefail
. tests/packaging/lib.sh
if ! have cargo-deb; then
  skip deb "cargo-deb missing (cargo install cargo-deb --locked)"
  exit 0
fi
if ! have docker || ! docker image inspect "$DEBIAN_IMAGE" >/dev/null 2>&1; then
  skip deb "docker or the image $DEBIAN_IMAGE (made by run.sh) missing"
  exit 0
fi
if ! packaging/build-deb.sh --no-build >"$WORK/deb-build.log" 2>&1; then
  tail -20 "$WORK/deb-build.log" >&2
  fail deb-build "packaging/build-deb.sh failed"
  exit 0
fi
ok deb-build
deb=$(ls -t target/debian/postern_*.deb | head -1)
# The packaged binary has no debug information and no symbol table.
extracted=$WORK/deb-extract
rm -rf "$extracted" && dpkg-deb -x "$deb" "$extracted"
sections=$(readelf -S "$extracted/usr/bin/postern" 2>&1)
if grep -q '\.symtab\|\.debug_' <<< "$sections"; then
  fail deb-binary-stripped "$(grep -o '\.symtab\|\.debug_[a-z]*' <<< "$sections" | tr '\n' ' ')"
else
  ok "deb-binary-stripped ($(stat -c %s "$extracted/usr/bin/postern") bytes)"
fi

# The same checks, in the container. Each prints "ok NAME" or "FAIL NAME: why".
cat > "$WORK/deb-inside.sh" <<'INSIDE'
set -u
t() { local name=$1; shift; if "$@" >/tmp/t.out 2>&1; then echo "ok $name"; else echo "FAIL $name: $(tail -5 /tmp/t.out | tr '\n' ' ')"; fi; }
export DEBIAN_FRONTEND=noninteractive

t "deb-install" dpkg -i /pkg/postern.deb
t "deb-user" getent passwd postern
t "deb-dirs-owned-0700" sh -c '[ "$(stat -c %U:%a /var/spool/postern)" = postern:700 ] && [ "$(stat -c %U:%a /var/lib/postern)" = postern:700 ]'
t "deb-conffile" sh -c 'dpkg-query -W -f="\${Conffiles}" postern | grep -q /etc/postern/postern.toml'
t "deb-unit-and-sysusers" test -f /usr/lib/systemd/system/postern.service -a -f /usr/lib/sysusers.d/postern.conf -a -f /usr/lib/tmpfiles.d/postern.conf
t "deb-man-and-completions" test -f /usr/share/man/man8/postern.8.gz -a -f /usr/share/man/man8/postern-sendmail.8.gz -a -f /usr/share/bash-completion/completions/postern
t "deb-sendmail-alternative" sh -c 'update-alternatives --query sendmail | grep -q "Value: /usr/bin/postern" && [ "$(readlink -f /usr/sbin/sendmail)" = /usr/bin/postern ]'
t "deb-check-as-postern" runuser -u postern -- postern check --config /etc/postern/postern.toml

# The daemon as the unit would run it (as postern), on the packaged configuration.
runuser -u postern -- postern serve --config /etc/postern/postern.toml >/tmp/serve.out 2>/tmp/serve.err &
for i in $(seq 1 60); do grep -q "postern: ready" /tmp/serve.out && break; sleep 0.5; done
t "deb-serve-ready" grep -q "postern: ready" /tmp/serve.out
t "deb-health" runuser -u postern -- postern health
# PHP's mail() with Debian's default sendmail_path ("/usr/sbin/sendmail -t -i"), as www-data.
cat > /tmp/mail.php <<'PHP'
<?php
exit(mail("ann@example.org", "from PHP in the container", "Hello\n", ["From" => "www@example.com"]) ? 0 : 1);
PHP
t "deb-php-mail-as-www-data" runuser -u www-data -- php /tmp/mail.php
for i in $(seq 1 40); do ls /var/lib/postern/delivered/*.json >/dev/null 2>&1 && break; sleep 0.5; done
t "deb-php-mail-delivered" sh -c 'grep -l "from PHP in the container" /var/lib/postern/delivered/*.eml'
kill -TERM %1; wait %1
t "deb-serve-stopped-cleanly" grep -q "postern stopped" /tmp/serve.err

# Remove: configuration, spool and state stay; the sendmail link goes.
t "deb-remove" dpkg -r postern
t "deb-remove-keeps-config-and-spool" test -f /etc/postern/postern.toml -a -d /var/spool/postern -a -d /var/lib/postern
t "deb-remove-drops-binary-and-sendmail" sh -c '[ ! -e /usr/bin/postern ] && [ ! -e /usr/sbin/sendmail ]'
# Purge with a message still queued: the spool is kept, the rest goes.
mkdir -p /var/spool/postern/hold && echo queued > /var/spool/postern/hold/0000000000000001
t "deb-purge" dpkg -P postern
t "deb-purge-removes-config-and-state" sh -c '[ ! -e /etc/postern ] && [ ! -e /var/lib/postern ]'
t "deb-purge-keeps-queued-mail" test -f /var/spool/postern/hold/0000000000000001
# Again with an empty queue: nothing is left.
rm -f /var/spool/postern/hold/0000000000000001
dpkg -i /pkg/postern.deb >/dev/null 2>&1 && dpkg -P postern >/dev/null 2>&1
t "deb-purge-empty-spool-removed" test ! -e /var/spool/postern
INSIDE

out=$(docker run --rm -v "$PWD/$deb:/pkg/postern.deb:ro" -v "$WORK/deb-inside.sh:/deb-inside.sh:ro" \
  "$DEBIAN_IMAGE" bash /deb-inside.sh 2>&1)
echo "$out" > "$WORK/deb-inside.log"
while IFS= read -r line; do
  case "$line" in
    "ok "*) ok "${line#ok }" ;;
    "FAIL "*) name=${line#FAIL }; fail "${name%%:*}" "${name#*: }" ;;
  esac
done <<< "$out"
grep -q "^ok deb-purge-empty-spool-removed" <<< "$out" || grep -q "^FAIL deb-purge-empty-spool-removed" <<< "$out" \
  || fail deb-container "the container script did not finish: $(tail -5 <<< "$out")"
