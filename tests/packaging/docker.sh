#!/usr/bin/env bash
# The Docker image, built for real with no registry (the Dockerfile's `prebuilt` stage on
# `scratch`), run by the shipped packaging/docker/compose.yaml (its postern service; WordPress
# and MariaDB are not started, they would need a registry) beside a client container from the
# debootstrap root that sends with PHPMailer exactly as the WordPress mu-plugin configures it.
# Checks: delivery into the state volume; a message queued (its delivery blocked) survives
# `docker-compose down` + `up` in the spool volume and is delivered once unblocked; docker
# inspect reports healthy (HEALTHCHECK runs `postern health`) and a non-root user.
set -uo pipefail
. tests/packaging/lib.sh
if ! have docker || ! have docker-compose; then
  skip docker "docker or docker-compose missing"
  exit 0
fi
if ! docker image inspect "$DEBIAN_IMAGE" >/dev/null 2>&1; then
  skip docker "the image $DEBIAN_IMAGE (made by run.sh) is missing"
  exit 0
fi
tag=postern:test
if POSTERN_BIN=target/release/postern packaging/docker/build-local.sh "$tag" >"$WORK/docker-build.log" 2>&1; then
  ok docker-build
else
  tail -20 "$WORK/docker-build.log" >&2
  fail docker-build "packaging/docker/build-local.sh failed"
  exit 0
fi
size=$(docker image inspect -f '{{.Size}}' "$tag")
echo "image $tag: $((size / 1024 / 1024)) MiB"

dir=$WORK/compose
rm -rf "$dir"
mkdir -p "$dir/secrets" "$dir/wordpress"
cp packaging/docker/compose.yaml "$dir/compose.yaml"
cp packaging/docker/wordpress/postern-smtp.php "$dir/wordpress/"
echo "not used: no tenant is set" > "$dir/secrets/m365-client-secret"
# The test's additions: the image just built, the file transport into a directory the test
# can block, a quick health check interval, and the client.
cat > "$dir/compose.test.yaml" <<YAML
services:
  postern:
    image: $tag
    build: !reset null
    environment:
      POSTERN_TRANSPORT: file
      POSTERN_FILE_DIR: /var/lib/postern/out
    healthcheck:
      interval: 1s
  client:
    image: $DEBIAN_IMAGE
    command: ["sleep", "infinity"]
    init: true
YAML
# docker-compose 1.x has no !reset: drop that line there (the image is used as it exists).
if docker-compose version --short 2>/dev/null | grep -q '^1\.'; then
  sed -i '/build: !reset null/d' "$dir/compose.test.yaml"
fi
project=posterntest$$
dc() { docker-compose -p "$project" -f "$dir/compose.yaml" -f "$dir/compose.test.yaml" "$@"; }
cleanup() { dc down -v --remove-orphans >/dev/null 2>&1; }
trap cleanup EXIT
state_vol=${project}_postern-state
inspect_state() { docker run --rm -v "$state_vol:/s" "$DEBIAN_IMAGE" sh -c "$1"; }

if ! dc up -d postern client >"$WORK/compose-up.log" 2>&1; then
  fail docker-compose-up "$(tail -5 "$WORK/compose-up.log")"
  exit 0
fi
cid=$(dc ps -q postern)
health() { [ "$(docker inspect -f '{{.State.Health.Status}}' "$cid")" = healthy ]; }
if WAIT=60 wait_for health; then ok docker-healthy; else
  fail docker-healthy "$(docker inspect -f '{{json .State.Health}}' "$cid") $(dc logs postern | tail -5)"
fi
user=$(docker inspect -f '{{.Config.User}}' "$cid")
uid=$(docker top "$cid" -o pid,uid | awk 'NR == 2 { print $2 }')
if [ -n "$user" ] && [ "${user%%:*}" != 0 ] && [ "${user%%:*}" != root ] && [ "$uid" != 0 ]; then
  ok "docker-non-root ($user, uid $uid)"
else
  fail docker-non-root "Config.User=$user, process uid=$uid"
fi

# What the WordPress mu-plugin makes PHPMailer do: SMTP to postern:25, no AUTH, no TLS.
send() {
  dc exec -T client php -r '
    require "/usr/share/php/libphp-phpmailer/autoload.php";
    $m = new PHPMailer\PHPMailer\PHPMailer(true);
    $m->isSMTP(); $m->Host = "postern"; $m->Port = 25;
    $m->SMTPAuth = false; $m->SMTPAutoTLS = false;
    $m->setFrom("wordpress@example.com", "WordPress");
    $m->addAddress("admin@example.org");
    $m->Subject = $argv[1]; $m->Body = "sent by PHPMailer from the client container";
    $m->send();' "$1"
}
delivered() { inspect_state "grep -l '$1' /s/out/*.eml" >/dev/null 2>&1; }
if send "first message" >"$WORK/send1.log" 2>&1 && WAIT=20 wait_for delivered "first message"; then
  ok docker-deliver-from-client
else
  fail docker-deliver-from-client "$(cat "$WORK/send1.log") $(dc logs postern | tail -5)"
fi

# Block delivery (the file transport's directory becomes a file), queue a message, and take
# the whole project down and up again: the message must still be in the spool volume.
inspect_state "mv /s/out /s/out.done && echo blocked > /s/out"
queued() { docker exec "$cid" /usr/bin/postern queue list | grep -q "$1"; }
if send "survivor" >"$WORK/send2.log" 2>&1 && WAIT=20 wait_for queued deferred; then
  ok docker-queued-while-blocked
else
  fail docker-queued-while-blocked "$(cat "$WORK/send2.log") $(docker exec "$cid" /usr/bin/postern queue list 2>&1)"
fi
dc stop -t 20 postern >/dev/null 2>&1
stopped=$(dc logs postern | grep -c "postern stopped")
dc rm -f postern >/dev/null 2>&1
dc up -d postern >/dev/null 2>&1
cid=$(dc ps -q postern)
if [ "$stopped" -ge 1 ]; then ok docker-sigterm-clean-stop; else fail docker-sigterm-clean-stop "no 'postern stopped' in the log"; fi
if WAIT=30 wait_for queued deferred; then
  ok docker-queue-survives-recreate
else
  fail docker-queue-survives-recreate "$(docker exec "$cid" /usr/bin/postern queue list 2>&1)"
fi
inspect_state "rm /s/out && mv /s/out.done /s/out"
docker exec "$cid" /usr/bin/postern queue retry --all >/dev/null 2>&1
if WAIT=30 wait_for delivered survivor; then ok docker-survivor-delivered; else
  fail docker-survivor-delivered "$(dc logs postern | tail -5)"
fi
if WAIT=60 wait_for health; then ok docker-healthy-after-restart; else
  fail docker-healthy-after-restart "$(docker inspect -f '{{json .State.Health}}' "$cid")"
fi
