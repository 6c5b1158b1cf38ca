#!/usr/bin/env bash
# bench/accept.sh — acceptance benchmark: postern vs Postfix, side by side, in one run.
#
# WHAT IT MEASURES
#   For each cell (message size 2 KB and 100 KB) x (1 and 10 concurrent SMTP clients),
#   MSGS messages (default 5000) are sent with Postfix's `smtp-source` (one message per
#   connection, as legacy devices do) to
#     - postern (target/benchmark/postern: release code with symbols and line tables, for
#       profilers; transport = "discard" like Postfix's, or "file" with PX_TRANSPORT=file) on
#       127.0.0.1:$PX_PORT, and
#     - Postfix (a relay with its normal durable queue; default_transport = discard)
#       on 127.0.0.1:$PF_PORT,
#   alternating the two servers within each cell for ROUNDS rounds (odd rounds postern
#   first, even rounds Postfix first), because this disk's flush speed drifts a lot
#   between minutes. Right before every round the disk's durable-write ceiling is
#   measured with bench/fsync_ceiling.c (write 2 KB + fsync + rename + dir fsync in a
#   loop) with as many writers as the cell has clients.
#   Per server and run (bench/measure.py):
#     msg/s     MSGS / wall time of smtp-source (every message answered 250, else the run
#               fails); the server-side count of delivered messages is checked too
#     CPU       utime+stime of the server's process tree (/proc/PID/stat; for Postfix the
#               live processes + master's reaped children), from the start of the load
#               until the queue has drained (both servers deliver locally during the cell)
#     peak RSS  postern: VmHWM (reset with clear_refs before each run);
#               Postfix: peak over 100 ms samples of the sum of Pss over all its processes
#               (shared pages split fairly; the sum of VmRSS is in the raw JSONL too)
#   Memory: postern's idle RSS after start, and its peak RSS (VmHWM) while receiving one
#   100 MB message (bench/send_big.py); the same 100 MB message to Postfix for reference.
#   Syscalls: a short strace -c run per server (fsync/fdatasync/rename per message),
#   after the timed cells so it does not disturb them (PROFILE=0 skips it).
#
# HOW TO RUN (as root: it installs packages and runs Postfix)
#   cargo build --profile benchmark  # once; the script builds it if the binary is missing
#   bench/accept.sh                  # full run: 5000 msgs/cell, 3 rounds (~10-20 min)
#   QUICK=1 bench/accept.sh          # development: 500 msgs/cell, 1 round
#   Knobs (env): MSGS, ROUNDS, CEIL_SECS, BENCH_DIR (scratch, default /tmp/bench/accept),
#   POSTERN_BIN, PX_PORT (2526), PF_PORT (2527), PROFILE (1), KEEP (0: wipe scratch at end),
#   PX_TRANSPORT (discard | file).
#   Output: a Markdown report on stdout and in bench/results/accept-<date>.md, raw
#   measurements in bench/results/accept-<date>.jsonl.
#
# PREREQUISITES (installed if missing, Debian): postfix (provides smtp-source; installed
#   with debconf "No configuration", so no system Postfix is set up or started), gcc,
#   python3, strace. Postfix runs from a scratch config_directory/queue_directory under
#   BENCH_DIR and never touches /etc/postfix.
#
# Both servers are stopped on exit, including on Ctrl-C (trap).

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
  MSGS=${MSGS:-500}; ROUNDS=${ROUNDS:-1}; CEIL_SECS=${CEIL_SECS:-1}
else
  MSGS=${MSGS:-5000}; ROUNDS=${ROUNDS:-3}; CEIL_SECS=${CEIL_SECS:-3}
fi
BENCH_DIR=${BENCH_DIR:-/tmp/bench/accept}
POSTERN_BIN=${POSTERN_BIN:-$REPO/target/benchmark/postern}
PX_PORT=${PX_PORT:-2526}
PF_PORT=${PF_PORT:-2527}
PROFILE=${PROFILE:-1}
PX_TRANSPORT=${PX_TRANSPORT:-discard}
KEEP=${KEEP:-0}
SIZES=(2048 102400)
CONCS=(1 10)
BIG_MB=100
STAMP=$(date +%Y%m%d-%H%M%S)
RESULTS_DIR=$HERE/results
JSONL=$RESULTS_DIR/accept-$STAMP.jsonl
REPORT=$RESULTS_DIR/accept-$STAMP.md

PX=$BENCH_DIR/postern
PF=$BENCH_DIR/postfix
PX_PID=
PF_STARTED=0

log() { printf '[accept %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

# ---------------------------------------------------------------- clean-up (trap) ----
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [[ -n $PX_PID ]] && kill -0 "$PX_PID" 2>/dev/null; then
    log "stopping postern (pid $PX_PID)"
    kill -TERM "$PX_PID"
    for _ in $(seq 50); do kill -0 "$PX_PID" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$PX_PID" 2>/dev/null && kill -KILL "$PX_PID"
    wait "$PX_PID" 2>/dev/null
  fi
  if [[ $PF_STARTED == 1 ]]; then
    log "stopping Postfix"
    postfix -c "$PF/etc" stop >/dev/null 2>&1 || postfix -c "$PF/etc" abort >/dev/null 2>&1
    local mp
    mp=$(tr -d ' ' <"$PF/queue/pid/master.pid" 2>/dev/null)
    for _ in $(seq 50); do [[ -n $mp ]] && kill -0 "$mp" 2>/dev/null || break; sleep 0.2; done
  fi
  if [[ $KEEP != 1 && -d $BENCH_DIR ]]; then rm -rf "$BENCH_DIR"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ---------------------------------------------------------------- prerequisites ------
need_pkgs=()
command -v smtp-source >/dev/null || [[ -x /usr/sbin/smtp-source ]] || need_pkgs+=(postfix)
command -v gcc >/dev/null || need_pkgs+=(gcc)
command -v python3 >/dev/null || need_pkgs+=(python3)
command -v strace >/dev/null || need_pkgs+=(strace)
if ((${#need_pkgs[@]})); then
  log "installing ${need_pkgs[*]}"
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
export PATH=$PATH:/usr/sbin
if [[ ! -x $POSTERN_BIN ]]; then
  log "building postern (cargo build --profile benchmark)"
  (cd "$REPO" && cargo build --profile benchmark)
fi
[[ -x $POSTERN_BIN ]] || die "no postern binary at $POSTERN_BIN"

rm -rf "$BENCH_DIR"
mkdir -p "$BENCH_DIR/bin" "$RESULTS_DIR"
chmod 755 "$BENCH_DIR" "$(dirname "$BENCH_DIR")"   # Postfix's daemons run as user postfix
gcc -O2 -Wall -pthread -o "$BENCH_DIR/bin/fsync_ceiling" "$HERE/fsync_ceiling.c"
: >"$JSONL"

# a JSON line into the raw results
record() { # record KEY=VALUE... [--json JSON]
  python3 - "$@" >>"$JSONL" <<'EOF'
import json, sys
d = {}
args = sys.argv[1:]
while args:
    a = args.pop(0)
    if a == "--json":
        d.update(json.loads(args.pop(0)))
    else:
        k, v = a.split("=", 1)
        try:
            v = json.loads(v)
        except ValueError:
            pass
        d[k] = v
print(json.dumps(d))
EOF
}

wait_port() { # wait_port PORT SECONDS
  python3 - "$1" "$2" <<'EOF'
import socket, sys, time
port, limit = int(sys.argv[1]), float(sys.argv[2])
t = time.monotonic()
while time.monotonic() - t < limit:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.1)
sys.exit(1)
EOF
}

# ---------------------------------------------------------------- Postfix ------------
# A relay with Postfix's normal durable queue. smtpd -> cleanup writes the queue file into
# incoming/ and fsyncs it before smtpd may answer 250 (Postfix's durable write path);
# qmgr then moves it to active/ and hands it to the `discard` transport, which reports it
# delivered, and the queue file is removed. So every message goes through the same
# accept -> durable queue -> deliver-locally cycle as postern's file transport, and no
# mail leaves the machine. Everything else is Postfix's defaults (process limits,
# in_flow_delay, etc.), except: no chroot (needs no copied /etc files), no peer-name DNS
# lookup (there's no DNS here; postern doesn't do it either), logging to a file via
# postlogd (there's no syslogd; postern also writes a log line per message).
setup_postfix() {
  mkdir -p "$PF/etc" "$PF/queue" "$PF/data"
  chown postfix "$PF/data"
  cat >"$PF/etc/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $PF/queue
data_directory = $PF/data
mail_owner = postfix
setgid_group = postdrop
myhostname = bench.localdomain
mydomain = localdomain
myorigin = \$myhostname
inet_interfaces = loopback-only
inet_protocols = ipv4
mydestination =
relay_domains =
local_recipient_maps =
alias_maps =
alias_database =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
default_transport = discard
relay_transport = discard
message_size_limit = 209715200
smtpd_peername_lookup = no
maillog_file = $PF/maillog
maillog_file_prefixes = $BENCH_DIR
biff = no
EOF
  cat >"$PF/etc/master.cf" <<EOF
# service type  private unpriv  chroot  wakeup  maxproc command
127.0.0.1:$PF_PORT inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
EOF
}

start_postfix() {
  # Postfix commands log only to syslog unless stderr is a tty: show errors via the maillog
  if ! postfix -c "$PF/etc" check >/dev/null 2>&1 || ! postfix -c "$PF/etc" start >/dev/null 2>&1; then
    script -qc "postfix -c $PF/etc check" /dev/null >&2 || true
    die "Postfix did not start"
  fi
  PF_STARTED=1
  wait_port "$PF_PORT" 30 || die "Postfix not listening on $PF_PORT"
  PF_PID=$(tr -d ' ' <"$PF/queue/pid/master.pid")
  log "Postfix $(postconf -c "$PF/etc" -h mail_version) master pid $PF_PID on 127.0.0.1:$PF_PORT"
}

pf_empty() { # the queue holds no message
  [[ -z $(find "$PF/queue/maildrop" "$PF/queue/incoming" "$PF/queue/active" \
    "$PF/queue/deferred" "$PF/queue/hold" -type f -print -quit) ]]
}
pf_sent() { grep -c 'status=sent' "$PF/maillog" 2>/dev/null || true; }

# ---------------------------------------------------------------- postern ------------
setup_postern() {
  mkdir -p "$PX"
  cat >"$PX/postern.toml" <<EOF
spool_dir = "$PX/spool"
state_dir = "$PX/state"
[listener.bench]
address = "127.0.0.1:$PX_PORT"
allow_networks = ["127.0.0.0/8"]
max_message_size = "200 MB"
[limits]
max_connections = 500
max_connections_per_ip = 500
[route.default]
senders = ["*"]
EOF
  # Both servers drop what they accepted after it went through their durable queue:
  # Postfix's discard, postern's discard. PX_TRANSPORT=file measures postern writing every
  # message out again (two more durable files per message).
  if [[ $PX_TRANSPORT == file ]]; then
    printf 'transport = "file"\ndir = "%s/delivered"\n' "$PX" >>"$PX/postern.toml"
  else
    printf 'transport = "discard"\n' >>"$PX/postern.toml"
  fi
}

start_postern() {
  "$POSTERN_BIN" serve --config "$PX/postern.toml" >"$PX/postern.log" 2>&1 &
  PX_PID=$!
  for _ in $(seq 300); do
    grep -q '^postern: ready' "$PX/postern.log" && break
    kill -0 "$PX_PID" 2>/dev/null || { cat "$PX/postern.log" >&2; die "postern exited"; }
    sleep 0.1
  done
  grep -q '^postern: ready' "$PX/postern.log" || die "postern not ready after 30 s"
  log "postern pid $PX_PID: $(grep '^postern: listening' "$PX/postern.log" | tr '\n' ' ')"
}

px_empty() { # nothing received-but-not-delivered in the spool
  local d
  for d in tmp incoming active deferred; do
    [[ -d $PX/spool/$d ]] || continue
    [[ -z $(find "$PX/spool/$d" -mindepth 1 -maxdepth 1 -print -quit) ]] || return 1
  done
}
px_delivered() {
  if [[ $PX_TRANSPORT == file ]]; then
    if [[ -d $PX/delivered ]]; then find "$PX/delivered" -type f -name '*.eml' | wc -l; else echo 0; fi
  else
    grep -c 'event="sent"' "$PX/postern.log" 2>/dev/null || true
  fi
}
px_wipe() { rm -rf "$PX/delivered"/* 2>/dev/null || true; }

# ---------------------------------------------------------------- measurements -------
ceiling() { # ceiling WRITERS -> ops/s on stdout
  "$BENCH_DIR/bin/fsync_ceiling" "$BENCH_DIR/ceiling" "$1" "$CEIL_SECS" 2048 |
    sed -n 's/.*ops_per_sec=//p'
}

settle() { # empty both queues and flush dirty pages left by the previous run
  local i
  for i in $(seq 600); do px_empty && pf_empty && break; sleep 0.1; done
  px_empty || die "postern's spool did not drain"
  pf_empty || postsuper -c "$PF/etc" -d ALL >/dev/null 2>&1 || true
  px_wipe
  sync
  sleep 0.5
}

run_cell() { # run_cell SERVER SIZE CONC ROUND CEILING
  local server=$1 size=$2 conc=$3 round=$4 ceil=$5 port pid drain extra=() before after got out
  settle
  if [[ $server == postern ]]; then
    port=$PX_PORT pid=$PX_PID extra=(--reset-hwm)
    drain="$(declare -f px_empty); PX='$PX' px_empty"
    before=$(px_delivered)
  else
    port=$PF_PORT pid=$PF_PID
    drain="$(declare -f pf_empty); PF='$PF' pf_empty"
    before=$(pf_sent)
  fi
  out=$(python3 "$HERE/measure.py" --pid "$pid" "${extra[@]}" --drain "$drain" -- \
    smtp-source -s "$conc" -m "$MSGS" -l "$size" -f from@example.com -t to@example.org \
    "127.0.0.1:$port")
  if [[ $server == postern ]]; then
    after=$(px_delivered)
  else
    after=$(pf_sent)
  fi
  got=$((after - before))
  record kind=cell server="$server" size="$size" conc="$conc" round="$round" msgs="$MSGS" \
    delivered="$got" ceiling="$ceil" load1="$(cut -d' ' -f1 /proc/loadavg)" --json "$out"
  python3 - "$out" "$server" "$size" "$conc" "$round" "$got" "$MSGS" <<'EOF' >&2
import json, sys
d = json.loads(sys.argv[1]); server, size, conc, rnd, got, msgs = sys.argv[2:]
ok = d["rc"] == 0 and d["drained"] and int(got) == int(msgs)
print(f"  {server:8} {int(size)//1024:>3} KB c={conc:<2} r{rnd}: "
      f"{int(msgs)/d['wall_s']:8.1f} msg/s  cpu {1000*d['cpu_total_s']/int(msgs):5.2f} ms/msg  "
      f"delivered {got}/{msgs}{'' if ok else '  <-- FAILED rc=%s %s' % (d['rc'], d['stderr'].strip())}")
EOF
}

big_message() { # big_message SERVER
  local server=$1 port pid extra=()
  settle
  if [[ $server == postern ]]; then port=$PX_PORT pid=$PX_PID extra=(--reset-hwm)
  else port=$PF_PORT pid=$PF_PID; fi
  local out
  out=$(python3 "$HERE/measure.py" --pid "$pid" "${extra[@]}" -- \
    python3 "$HERE/send_big.py" 127.0.0.1 "$port" "$BIG_MB")
  record kind=big server="$server" mb="$BIG_MB" --json "$out"
  log "  $server: 100 MB message: $out"
}

strace_profile() { # strace_profile SERVER: syscalls per message over 1000 x 2 KB, c=10
  local server=$1 port pid n=1000 pids=() spid f
  settle
  if [[ $server == postern ]]; then port=$PX_PORT pid=$PX_PID
  else port=$PF_PORT pid=$PF_PID; fi
  mapfile -t pids < <(python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); import measure; print("\n".join(map(str, measure.tree(int(sys.argv[2])))))' "$HERE" "$pid")
  f=$BENCH_DIR/strace-$server.txt
  strace -f -c -o "$f" $(printf -- '-p %s ' "${pids[@]}") 2>/dev/null &
  spid=$!
  sleep 1
  smtp-source -s 10 -m "$n" -l 2048 -f from@example.com -t to@example.org "127.0.0.1:$port" || true
  for _ in $(seq 300); do
    if [[ $server == postern ]]; then px_empty && break; else pf_empty && break; fi
    sleep 0.1
  done
  sleep 1
  kill -INT "$spid"; wait "$spid" 2>/dev/null || true
  python3 - "$f" "$n" "$server" <<'EOF' >>"$JSONL"
import json, sys
f, n, server = sys.argv[1], int(sys.argv[2]), sys.argv[3]
calls = {}
for line in open(f):
    p = line.split()
    if len(p) >= 5 and p[0][0].isdigit() and p[-1] != "total":
        try:
            calls[p[-1]] = int(p[3])
        except ValueError:
            pass
print(json.dumps({"kind": "strace", "server": server, "msgs": n, "calls": calls}))
EOF
}

# ---------------------------------------------------------------- the run ------------
fs_journal() { # does the scratch dir's ext4 have a journal? (matters for what one fsync covers)
  local dev
  dev=$(basename "$(df --output=source "$BENCH_DIR" | tail -1)")
  if [[ -d /sys/fs/ext4/$dev ]]; then
    local jt
    jt=$(cat "/sys/fs/ext4/$dev/journal_task" 2>/dev/null || true)
    if [[ -n $jt && $jt != "<none>" ]]; then
      echo "ext4 with journal"
    else
      echo "ext4 WITHOUT journal"
    fi
  else
    echo unknown
  fi
}
log "scratch $BENCH_DIR, $MSGS msgs/cell, $ROUNDS round(s), results $REPORT"
record kind=env date="$(date -Is)" kernel="$(uname -r)" \
  cpu="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')" nproc="$(nproc)" \
  fs="$(df -T "$BENCH_DIR" | awk 'NR==2{print $2" on "$1}')" \
  postern_commit="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  postfix_version="$(dpkg-query -W -f '${Version}' postfix 2>/dev/null || echo unknown)" \
  journal="$(fs_journal)" msgs="$MSGS" rounds="$ROUNDS" ceil_secs="$CEIL_SECS"

log "fsync ceiling (start): 1 and 10 writers"
for w in 1 10; do record kind=ceiling when=start writers=$w ops_per_sec="$(ceiling $w)"; done

setup_postfix
setup_postern
start_postfix
start_postern
sleep 2
record kind=idle server=postern rss_kb="$(awk '/^VmRSS/{print $2}' /proc/$PX_PID/status)" \
  hwm_kb="$(awk '/^VmHWM/{print $2}' /proc/$PX_PID/status)"
log "postern idle: $(grep -E '^Vm(RSS|HWM)' /proc/$PX_PID/status | tr -s ' \t\n' ' ')"

# warm-up: both servers once (page cache, Postfix's long-running daemons), not recorded
log "warm-up"
smtp-source -s 10 -m 200 -l 2048 -f from@example.com -t to@example.org 127.0.0.1:$PX_PORT
smtp-source -s 10 -m 200 -l 2048 -f from@example.com -t to@example.org 127.0.0.1:$PF_PORT

for size in "${SIZES[@]}"; do
  for conc in "${CONCS[@]}"; do
    for ((r = 1; r <= ROUNDS; r++)); do
      ceil=$(ceiling "$conc")
      log "cell $((size / 1024)) KB x $conc client(s), round $r: fsync ceiling $ceil ops/s ($conc writer(s))"
      if ((r % 2)); then order=(postern postfix); else order=(postfix postern); fi
      for s in "${order[@]}"; do run_cell "$s" "$size" "$conc" "$r" "$ceil"; done
    done
  done
done

log "100 MB message"
big_message postern
big_message postfix

log "fsync ceiling (end): 1 and 10 writers"
for w in 1 10; do record kind=ceiling when=end writers=$w ops_per_sec="$(ceiling $w)"; done

if [[ $PROFILE == 1 ]]; then
  log "syscall profile (strace -c, 1000 x 2 KB, 10 clients; not timed)"
  strace_profile postern
  strace_profile postfix
fi

PX_TRANSPORT="$PX_TRANSPORT" python3 "$HERE/report.py" "$JSONL" >"$REPORT"
cat "$REPORT"
log "report: $REPORT"
