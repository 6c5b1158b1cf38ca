#!/usr/bin/env bash
# bench/upstream.sh — end to end through postern to Microsoft 365's fakes: Graph and SMTP
# XOAUTH2 side by side, in one run, against postern's own acceptance rate.
#
# WHAT IT MEASURES
#   For each cell (message size 2 KB and 100 KB) x (1 and 10 concurrent SMTP clients), MSGS
#   messages (default 2000) are sent with Postfix's `smtp-source` (one message per connection)
#   to one postern (target/benchmark/postern) with three routes, chosen by the sender:
#     accept  from@accept.bench -> transport "discard": postern's acceptance rate, the baseline
#     smtp    from@smtp.bench   -> transport "smtp": STARTTLS + AUTH XOAUTH2 to the fake Exchange
#     graph   from@graph.bench  -> transport "graph": base64 MIME sendMail to the fake Graph
#   The fakes (Entra, Exchange, Graph) run in one separate process, examples/fake_m365.rs (the
#   test suite's fakes, with throttling off: no connection or concurrency limit, no quota,
#   message bytes counted, not kept). Pacing is lifted on the routes (rate and
#   daily_recipients "unlimited"); Graph's 4 requests in flight per app and mailbox and the
#   forwarder's per-mailbox concurrency stay as shipped, and each route sends as one mailbox.
#   The three routes alternate within each cell for ROUNDS rounds.
#   Per run (bench/measure.py on postern's pid):
#     msg/s     end to end: MSGS / (time until smtp-source is done + time until postern's
#               queue is empty); every message must be answered 250, and the fake must count
#               MSGS more deliveries (else FAILED)
#     CPU       utime+stime of postern (not the fakes), from the start of the load until its
#               queue drained, per message
#     peak RSS  postern's VmHWM, reset before each run
#   Then postern's peak RSS (VmHWM) while it receives and relays one 100 MB message (a 74 MB
#   attachment, base64) over Graph: draft from the message's skeleton, upload session, send.
#
# HOW TO RUN (as root: installs postfix's smtp-source if missing)
#   bench/upstream.sh                 # 2000 msgs/cell, 3 rounds (~10 min)
#   QUICK=1 bench/upstream.sh         # 300 msgs/cell, 1 round (~1 min)
#   Knobs (env): MSGS, ROUNDS, BENCH_DIR (default /tmp/bench/upstream), POSTERN_BIN, FAKE_BIN,
#   PX_PORT (2536), KEEP (0: wipe scratch at end), BIG (1: run the 100 MB message).
#   Output: Markdown on stdout and bench/results/upstream-<date>.md; raw JSONL beside it.
#
# Both processes are stopped on exit, including on Ctrl-C.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
  MSGS=${MSGS:-300}; ROUNDS=${ROUNDS:-1}
else
  MSGS=${MSGS:-2000}; ROUNDS=${ROUNDS:-3}
fi
BENCH_DIR=${BENCH_DIR:-/tmp/bench/upstream}
POSTERN_BIN=${POSTERN_BIN:-$REPO/target/benchmark/postern}
FAKE_BIN=${FAKE_BIN:-$REPO/target/benchmark/examples/fake_m365}
PX_PORT=${PX_PORT:-2536}
KEEP=${KEEP:-0}
BIG=${BIG:-1}
BIG_MB=100
SIZES=(2048 102400)
CONCS=(1 10)
ROUTES=(accept smtp graph)
STAMP=$(date +%Y%m%d-%H%M%S)
RESULTS_DIR=$HERE/results
JSONL=$RESULTS_DIR/upstream-$STAMP.jsonl
REPORT=$RESULTS_DIR/upstream-$STAMP.md
PX=$BENCH_DIR/postern
PX_PID=
FAKE_PID=

log() { printf '[upstream %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  for pid in $PX_PID $FAKE_PID; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
      wait "$pid" 2>/dev/null
    fi
  done
  if [[ $KEEP != 1 && -d $BENCH_DIR ]]; then rm -rf "$BENCH_DIR"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ---------------------------------------------------------------- prerequisites ------
export PATH=$PATH:/usr/sbin
if ! command -v smtp-source >/dev/null; then
  log "installing postfix (for smtp-source; not configured, not started)"
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null
fi
if [[ ! -x $POSTERN_BIN || ! -x $FAKE_BIN ]]; then
  log "building (cargo build --profile benchmark --bin postern --example fake_m365)"
  (cd "$REPO" && cargo build --profile benchmark --bin postern --example fake_m365)
fi
[[ -x $POSTERN_BIN ]] || die "no postern binary at $POSTERN_BIN"
[[ -x $FAKE_BIN ]] || die "no fake at $FAKE_BIN"

rm -rf "$BENCH_DIR"
mkdir -p "$PX" "$RESULTS_DIR"
: >"$JSONL"

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

# ---------------------------------------------------------------- the fakes ----------
# stdin stays open through a FIFO: the fake stops when it closes (or on SIGTERM).
mkfifo "$BENCH_DIR/fake.in"
"$FAKE_BIN" <"$BENCH_DIR/fake.in" >"$BENCH_DIR/fake.out" 2>"$BENCH_DIR/fake.err" &
FAKE_PID=$!
exec 9>"$BENCH_DIR/fake.in"
for _ in $(seq 300); do [[ -s $BENCH_DIR/fake.out ]] && break; sleep 0.1; done
[[ -s $BENCH_DIR/fake.out ]] || { cat "$BENCH_DIR/fake.err" >&2; die "the fakes did not start"; }
READY=$(head -1 "$BENCH_DIR/fake.out")
field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$READY" "$1"; }
ENTRA=$(field entra)
EXCHANGE=$(field exchange)
GRAPH=$(field graph)
CONTROL=$(field control)
printf '%s\n' "$(field client_secret)" >"$PX/client-secret"
chmod 600 "$PX/client-secret"
log "fakes pid $FAKE_PID: entra $ENTRA, exchange $EXCHANGE, graph $GRAPH"

fake_count() { # fake_count smtp|graph -> messages the fake has taken
  python3 - "$CONTROL" "$1" <<'EOF'
import json, sys, urllib.request
stats = json.load(urllib.request.urlopen(sys.argv[1] + "/stats", timeout=10))
print(stats["exchange"]["delivered"] if sys.argv[2] == "smtp" else stats["graph"]["sent"])
EOF
}

# ---------------------------------------------------------------- postern ------------
cat >"$PX/postern.toml" <<EOF
hostname = "bench.localdomain"
spool_dir = "$PX/spool"
state_dir = "$PX/state"

[listener.bench]
address = "127.0.0.1:$PX_PORT"
allow_networks = ["127.0.0.0/8"]
max_message_size = "150 MiB"

[limits]
max_connections = 500
max_connections_per_ip = 500

[account.contoso]
tenant = "$(field tenant)"
client_id = "$(field client_id)"
auth = "client_secret"
client_secret_file = "$PX/client-secret"
authority = "$ENTRA"
smtp_host = "localhost"
smtp_port = ${EXCHANGE##*:}
ca_file = "$(field ca_file)"
graph_url = "$GRAPH"

[route.accept]
senders = ["*@accept.bench"]
transport = "discard"

[route.smtp]
senders = ["*@smtp.bench"]
mailbox = "bench-smtp@contoso.com"
transport = "smtp"
account = "contoso"
rate = "unlimited"
daily_recipients = "unlimited"

[route.graph]
senders = ["*@graph.bench"]
mailbox = "bench-graph@contoso.com"
transport = "graph"
account = "contoso"
rate = "unlimited"
daily_recipients = "unlimited"
max_message_size = "150 MiB"
EOF

"$POSTERN_BIN" serve --config "$PX/postern.toml" >"$PX/postern.log" 2>&1 &
PX_PID=$!
for _ in $(seq 300); do
  grep -q '^postern: ready' "$PX/postern.log" && break
  kill -0 "$PX_PID" 2>/dev/null || { cat "$PX/postern.log" >&2; die "postern exited"; }
  sleep 0.1
done
grep -q '^postern: ready' "$PX/postern.log" || die "postern not ready after 30 s"
log "postern pid $PX_PID on 127.0.0.1:$PX_PORT"

px_empty() { # nothing received-but-not-delivered in the spool
  local d
  for d in tmp incoming active deferred; do
    [[ -d $PX/spool/$d ]] || continue
    [[ -z $(find "$PX/spool/$d" -mindepth 1 -maxdepth 1 -print -quit) ]] || return 1
  done
}
px_sent() { grep -c 'event="sent"' "$PX/postern.log" 2>/dev/null || true; }
held_or_failed() { # anything in hold/ or failed/ means a route is broken: stop
  [[ -n $(find "$PX/spool/hold" "$PX/spool/failed" -type f -print -quit 2>/dev/null) ]]
}

run_cell() { # run_cell ROUTE SIZE CONC ROUND
  local route=$1 size=$2 conc=$3 round=$4 before after got fake_before=0 fake_after=0 out
  for _ in $(seq 600); do px_empty && break; sleep 0.1; done
  px_empty || die "postern's spool did not drain"
  before=$(px_sent)
  [[ $route == accept ]] || fake_before=$(fake_count "$route")
  out=$(python3 "$HERE/measure.py" --pid "$PX_PID" --reset-hwm \
    --drain "$(declare -f px_empty); PX='$PX' px_empty" -- \
    smtp-source -s "$conc" -m "$MSGS" -l "$size" -f "from@$route.bench" -t to@fabrikam.example \
    "127.0.0.1:$PX_PORT")
  after=$(px_sent)
  got=$((after - before))
  if [[ $route != accept ]]; then
    fake_after=$(fake_count "$route")
    got=$((fake_after - fake_before))
  fi
  held_or_failed && die "messages were held or failed: see $PX/postern.log"
  record kind=cell route="$route" size="$size" conc="$conc" round="$round" msgs="$MSGS" \
    delivered="$got" --json "$out"
  python3 - "$out" "$route" "$size" "$conc" "$round" "$got" "$MSGS" <<'EOF' >&2
import json, sys
d = json.loads(sys.argv[1]); route, size, conc, rnd, got, msgs = sys.argv[2:]
ok = d["rc"] == 0 and d["drained"] and int(got) == int(msgs)
t = d["wall_s"] + d["drain_s"]
print(f"  {route:6} {int(size)//1024:>3} KB c={conc:<2} r{rnd}: {int(msgs)/t:8.1f} msg/s end to end "
      f"(accepted in {d['wall_s']:.2f}s, drained {d['drain_s']:.2f}s later)  "
      f"cpu {1000*d['cpu_total_s']/int(msgs):5.2f} ms/msg  hwm {d['root_hwm_kb']/1024:.1f} MB  "
      f"delivered {got}/{msgs}{'' if ok else '  <-- FAILED rc=%s %s' % (d['rc'], d['stderr'].strip())}")
EOF
}

log "scratch $BENCH_DIR, $MSGS msgs/cell, $ROUNDS round(s), results $REPORT"
record kind=env date="$(date -Is)" kernel="$(uname -r)" \
  cpu="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')" nproc="$(nproc)" \
  postern_commit="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  msgs="$MSGS" rounds="$ROUNDS"
sleep 1
record kind=idle rss_kb="$(awk '/^VmRSS/{print $2}' /proc/$PX_PID/status)"

log "warm-up (tokens, connections, page cache), not recorded"
for route in "${ROUTES[@]}"; do
  smtp-source -s 10 -m 100 -l 2048 -f "from@$route.bench" -t to@fabrikam.example "127.0.0.1:$PX_PORT"
done
for _ in $(seq 600); do px_empty && break; sleep 0.1; done

for size in "${SIZES[@]}"; do
  for conc in "${CONCS[@]}"; do
    for ((r = 1; r <= ROUNDS; r++)); do
      log "cell $((size / 1024)) KB x $conc client(s), round $r"
      case $((r % 3)) in
        1) order=(accept smtp graph) ;;
        2) order=(graph accept smtp) ;;
        0) order=(smtp graph accept) ;;
      esac
      for route in "${order[@]}"; do run_cell "$route" "$size" "$conc" "$r"; done
    done
  done
done

if [[ $BIG == 1 ]]; then
  log "one 100 MB message (a 74 MB attachment) relayed over Graph"
  for _ in $(seq 600); do px_empty && break; sleep 0.1; done
  before=$(fake_count graph)
  out=$(python3 "$HERE/measure.py" --pid "$PX_PID" --reset-hwm --drain-timeout 600 \
    --drain "$(declare -f px_empty); PX='$PX' px_empty" -- \
    python3 "$HERE/send_big.py" 127.0.0.1 "$PX_PORT" "$BIG_MB" --mime --from from@graph.bench)
  got=$(( $(fake_count graph) - before ))
  held_or_failed && die "the 100 MB message was held or failed: see $PX/postern.log"
  record kind=big route=graph mb="$BIG_MB" delivered="$got" --json "$out"
  log "  100 MB over Graph: delivered $got, $out"
fi

python3 "$HERE/upstream_report.py" "$JSONL" >"$REPORT"
cat "$REPORT"
log "report: $REPORT"
