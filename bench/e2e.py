#!/usr/bin/env python3
"""End-to-end benchmark: devices -> postern -> a fake Exchange Online (STARTTLS + XOAUTH2)
on loopback, against two baselines measured in the same run (issue 8, "Performance").

WHAT IT MEASURES
  For each cell (message size 2 KB and 100 KB) x (1 and 10 concurrent clients), one message
  per client connection (as printers send), round-robin over several sender mailboxes:
    postern     clients speak plain SMTP to postern, which spools each message durably,
                then delivers it to the fake Exchange over kept, authenticated connections
                (BDAT). msg/s = messages / (first connection .. last message accepted by the
                fake Exchange), so postern's queue must have drained.
    direct      the same clients send straight to the fake Exchange, each message on its own
                STARTTLS + AUTH XOAUTH2 connection (an app-only token fetched once).
    emailproxy  the same clients speak plain SMTP with AUTH PLAIN to emailproxy (PyPI
                `emailproxy`, simonrob's email-oauth2-proxy, client-credentials flow), which
                opens a STARTTLS + XOAUTH2 connection to the fake Exchange per client session.
  Ratios postern/direct and postern/emailproxy per cell (targets: >= 1.5x and >= 10x).
  postern's CPU per message: utime+stime of the postern process (/proc/PID/stat) over the
  cell (load and drain), divided by the messages (target < 1 ms).
  CPU of every process: postern + the fake + the load generator per message (direct: the
  fake + the load generator), so a cell's ceiling with the CPU alone can be read off.
  Floor: the loopback round trip between two processes and the time of one pwrite +
  fdatasync on the benchmark's file system, at the start and the end of the run: what a
  client that waits for every reply (one message per connection) cannot go below.
  Memory: postern's RSS at rest, and its peak (VmHWM, reset through clear_refs) while
  relaying one 100 MB message end to end (target < 40 MB).

  postern-graph (issue 9): the same clients, sending as device{i}@graph.contoso.com, go
                through the same postern on a route with transport = "graph" to the fake
                Graph: base64 MIME sendMail, at most 4 requests in flight per mailbox.
                msg/s as for postern (until the fake Graph has them all); "keeps up" compares
                it with the rate at which postern accepted the same messages (target: ~100 %
                at 10 clients); CPU per message likewise (target < 1 ms).
  Memory over Graph: postern's peak while relaying one 100 MB message whose bulk is a base64
  attachment (bench/send_big.py --mime): draft from the skeleton, upload session, send.

  Per-mailbox pacing is lifted (rate and daily_recipients "unlimited"); the fake Exchange
  and the fake Graph do not throttle (examples/fake_m365.rs). The load generator is examples/smtp_load.rs,
  the same program for all three columns.

HOW TO RUN (as root or any user; needs python3 with venv, and cargo)
  bench/e2e.py              # full run: 2000 messages per cell and round, 3 rounds (emailproxy: 300, once)
  QUICK=1 bench/e2e.py      # development: 300 messages per cell, 1 round (emailproxy: 100)
  Knobs (env): MSGS, MSGS_PROXY, ROUNDS, SENDERS (8), SIZES ("2048 102400"), CLIENTS ("1 10"), BENCH_DIR (scratch; default a new
  /tmp/bench/e2e-XXXX per run, so runs side by side do not collide; every port is a free one),
  VENV (/tmp/bench/emailproxy-venv), KEEP=1 (keep the scratch directory).
  Output: Markdown on stdout and in bench/results/e2e-<date>.md, raw numbers in
  bench/results/e2e-<date>.jsonl.
"""
import datetime
import json
import tempfile
import os
import shutil
import signal
import statistics
import socket
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
QUICK = os.environ.get("QUICK") == "1"
MSGS = int(os.environ.get("MSGS", 300 if QUICK else 2000))
MSGS_PROXY = int(os.environ.get("MSGS_PROXY", 100 if QUICK else 300))
ROUNDS = int(os.environ.get("ROUNDS", 1 if QUICK else 3))
N_SENDERS = int(os.environ.get("SENDERS", 8))
os.makedirs("/tmp/bench", exist_ok=True)
BENCH_DIR = os.environ.get("BENCH_DIR") or tempfile.mkdtemp(prefix="e2e-", dir="/tmp/bench")
KEEP = os.environ.get("KEEP") == "1"
SIZES = [int(x) for x in os.environ.get("SIZES", "2048 102400").split()]
CLIENTS = [int(x) for x in os.environ.get("CLIENTS", "1 10").split()]
BIG = 100 * 1000 * 1000
TARGET = os.path.join(REPO, "target", "benchmark")
POSTERN = os.path.join(TARGET, "postern")
FAKE = os.path.join(TARGET, "examples", "fake_m365")
LOAD = os.path.join(TARGET, "examples", "smtp_load")
VENV = os.environ.get("VENV", "/tmp/bench/emailproxy-venv")
TCK = os.sysconf("SC_CLK_TCK")
SENDERS = [f"device{i}@contoso.com" for i in range(N_SENDERS)]
GRAPH_SENDERS = [f"device{i}@graph.contoso.com" for i in range(N_SENDERS)]
PROXY_PASSWORD = "bench-password"

procs = []


def log(*a):
    print(f"[e2e {time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def cleanup(*_):
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    if not KEEP:
        shutil.rmtree(BENCH_DIR, ignore_errors=True)


def build():
    if all(os.access(p, os.X_OK) for p in (POSTERN, FAKE, LOAD)):
        return
    log("building postern and the examples (cargo build --profile benchmark)")
    subprocess.run(
        ["cargo", "build", "--profile", "benchmark", "--bin", "postern",
         "--example", "fake_m365", "--example", "smtp_load"],
        cwd=REPO, check=True)


def venv():
    py = os.path.join(VENV, "bin", "python")
    # Run as `python -m emailproxy`: the venv's scripts name the path it was built at.
    if not os.path.exists(py) or subprocess.run(
            [py, "-c", "import emailproxy"], capture_output=True).returncode != 0:
        log("installing emailproxy into", VENV)
        # Built aside and renamed into place, so a run beside this one never sees half a venv.
        tmp = tempfile.mkdtemp(prefix="venv-", dir=os.path.dirname(VENV))
        subprocess.run([sys.executable, "-m", "venv", tmp], check=True)
        subprocess.run([os.path.join(tmp, "bin", "python"), "-m", "pip", "install", "-q",
                        "emailproxy"], check=True)
        try:
            os.rename(tmp, VENV)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another run won the race
    out = subprocess.run([py, "-m", "pip", "show", "emailproxy"], capture_output=True, text=True)
    version = next((l.split(":", 1)[1].strip() for l in out.stdout.splitlines()
                    if l.startswith("Version:")), "?")
    return [py, "-m", "emailproxy"], version


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on port {port}")


def stats(fake):
    with urllib.request.urlopen(fake["control"] + "/stats") as r:
        return json.load(r)["exchange"]


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])


def status_kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def loopback_rtt_us(seconds=1.0):
    """Mean round trip of 20 bytes between two processes over loopback TCP
    (TCP_NODELAY), in microseconds: what each SMTP command/reply pair costs at least."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    pid = os.fork()
    if pid == 0:
        c, _ = srv.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            d = c.recv(64)
            if not d:
                os._exit(0)
            c.sendall(d)
    c = socket.create_connection(srv.getsockname())
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    n, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < seconds:
        c.sendall(b"x" * 20)
        c.recv(64)
        n += 1
    wall = time.monotonic() - t0
    c.close()
    srv.close()
    os.waitpid(pid, 0)
    return 1e6 * wall / n


def fdatasync_us(seconds=1.0, size=2600):
    """Mean time of one pwrite of `size` bytes into a preallocated file plus fdatasync, in
    microseconds, on the benchmark's file system: what postern's 250 waits for at least (its
    intake journal is such a file)."""
    path = os.path.join(BENCH_DIR, "fdatasync-probe")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, 8 << 20)
        os.write(fd, b"\0" * (8 << 20))
        os.fsync(fd)
        buf, n, off, t0 = b"x" * size, 0, 0, time.monotonic()
        while time.monotonic() - t0 < seconds:
            os.pwrite(fd, buf, off)
            os.fdatasync(fd)
            off = (off + size) % (8 << 20)
            n += 1
        return 1e6 * (time.monotonic() - t0) / n
    finally:
        os.close(fd)
        os.unlink(path)


def start_fake():
    p = subprocess.Popen([FAKE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    procs.append(p)
    ready = json.loads(p.stdout.readline())
    ready["pid"] = p.pid
    log("fake Microsoft 365:", ready["entra"], "exchange", ready["exchange"])
    return ready


def start_postern(fake):
    d = os.path.join(BENCH_DIR, "postern")
    os.makedirs(d, exist_ok=True)
    secret = os.path.join(d, "client-secret")
    with open(secret, "w") as f:
        f.write(fake["client_secret"] + "\n")
    os.chmod(secret, 0o600)
    host, port = fake["exchange"].rsplit(":", 1)
    cfg = f"""hostname = "relay.bench"
spool_dir = "{d}/spool"
state_dir = "{d}/state"

[delivery]
max_concurrency = 16
per_mailbox_concurrency = 3

[listener.bench]
address = "127.0.0.1:0"
allow_networks = ["127.0.0.0/8"]
max_message_size = "120 MB"

[account.contoso]
tenant = "{fake['tenant']}"
client_id = "{fake['client_id']}"
auth = "client_secret"
client_secret_file = "{secret}"
authority = "{fake['entra']}"
smtp_host = "localhost"
smtp_port = {port}
ca_file = "{fake['ca_file']}"
graph_url = "{fake['graph']}"

[route.graph]
senders = ["*@graph.contoso.com"]
rate = "unlimited"
daily_recipients = "unlimited"
transport = "graph"
account = "contoso"
max_message_size = "150 MiB"

[route.m365]
senders = ["*@contoso.com"]
rate = "unlimited"
daily_recipients = "unlimited"
transport = "smtp"
account = "contoso"
"""
    path = os.path.join(d, "postern.toml")
    with open(path, "w") as f:
        f.write(cfg)
    logf = open(os.path.join(d, "postern.log"), "w")
    p = subprocess.Popen([POSTERN, "serve", "--config", path], stdout=subprocess.PIPE,
                         stderr=logf, text=True)
    procs.append(p)
    port = None
    for line in p.stdout:
        line = line.strip()
        if line.startswith("postern: listening on bench "):
            port = int(line.rsplit(":", 1)[1])
        if line in ("postern: ready", '{"event":"ready"}'):
            break
    else:
        raise SystemExit("postern did not start; see " + logf.name)
    if port is None:
        raise SystemExit("postern did not say where it listens; see " + logf.name)
    p.port = port
    return p


def start_emailproxy(exe, fake):
    port_here = free_port()
    d = os.path.join(BENCH_DIR, "emailproxy")
    os.makedirs(d, exist_ok=True)
    host, port = fake["exchange"].rsplit(":", 1)
    token_url = f"{fake['entra']}/{fake['tenant']}/oauth2/v2.0/token"
    lines = [
        f"[SMTP-{port_here}]",
        "server_address = localhost",
        f"server_port = {port}",
        "server_starttls = True",
        "local_address = 127.0.0.1",
        "",
    ]
    for s in SENDERS:
        lines += [
            f"[{s}]",
            f"token_url = {token_url}",
            "oauth2_scope = https://outlook.office365.com/.default",
            "oauth2_flow = client_credentials",
            f"client_id = {fake['client_id']}",
            f"client_secret = {fake['client_secret']}",
            "",
        ]
    path = os.path.join(d, "emailproxy.config")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    env = dict(os.environ, SSL_CERT_FILE=fake["ca_file"])
    logf = open(os.path.join(d, "emailproxy.log"), "w")
    p = subprocess.Popen(exe + ["--no-gui", "--config-file", path, "--log-file",
                          os.path.join(d, "proxy-internal.log")],
                         stdout=logf, stderr=subprocess.STDOUT, env=env)
    procs.append(p)
    wait_port(port_here)
    p.port = port_here
    return p


def load(port, n, clients, size, extra, senders=None):
    cmd = [LOAD, "--server", f"127.0.0.1:{port}", "--messages", str(n), "--clients",
           str(clients), "--size", str(size), "--senders", ",".join(senders or SENDERS)] + extra
    t0 = os.times()
    out = subprocess.run(cmd, capture_output=True, text=True)
    t1 = os.times()
    if out.returncode != 0:
        raise SystemExit(f"smtp_load failed: {out.stderr}")
    r = json.loads(out.stdout)
    # The load generator's own CPU (it is this script's only child at a time).
    r["load_cpu_s"] = (t1.children_user - t0.children_user) + (t1.children_system
                                                               - t0.children_system)
    return r


def wait_delivered(fake, want, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = stats(fake)
        if s["delivered"] >= want:
            return s
        time.sleep(0.02)
    raise SystemExit(f"the fake Exchange got {stats(fake)['delivered']} of {want} messages")


def run_postern(fake, px, n, clients, size):
    before = stats(fake)
    cpu0, fake0 = cpu_ticks(px.pid), cpu_ticks(fake["pid"])
    t0 = time.monotonic()
    r = load(px.port, n, clients, size, [])
    after = wait_delivered(fake, before["delivered"] + n)
    wall = time.monotonic() - t0
    cpu = (cpu_ticks(px.pid) - cpu0) / TCK
    fake_cpu = (cpu_ticks(fake["pid"]) - fake0) / TCK
    return {
        "all_cpu_ms_per_msg": 1000 * (cpu + fake_cpu + r["load_cpu_s"]) / n,
        "system": "postern", "sent": r["sent"], "failed": r["failed"], "wall_s": wall,
        "load_s": r["wall_s"], "msg_s": n / wall, "accept_msg_s": n / r["wall_s"], "cpu_s": cpu,
        "cpu_ms_per_msg": 1000 * cpu / n,
        "upstream_connections": after["connections"] - before["connections"],
        "upstream_auths": after["auths"] - before["auths"],
        "first_error": r["first_error"],
    }


def run_direct(fake, n, clients, size):
    before = stats(fake)
    fake0 = cpu_ticks(fake["pid"])
    token_url = f"{fake['entra']}/{fake['tenant']}/oauth2/v2.0/token"
    r = load(int(fake["exchange"].rsplit(":", 1)[1]), n, clients, size, [
        "--xoauth2", "--ca-file", fake["ca_file"], "--token-url", token_url,
        "--client-id", fake["client_id"], "--client-secret", fake["client_secret"]])
    after = stats(fake)
    fake_cpu = (cpu_ticks(fake["pid"]) - fake0) / TCK
    return {
        "all_cpu_ms_per_msg": 1000 * (fake_cpu + r["load_cpu_s"]) / r["sent"],
        "system": "direct", "sent": r["sent"], "failed": r["failed"], "wall_s": r["wall_s"],
        "msg_s": r["sent"] / r["wall_s"],
        "upstream_connections": after["connections"] - before["connections"],
        "delivered": after["delivered"] - before["delivered"],
        "first_error": r["first_error"],
    }


def run_proxy(fake, ep, n, clients, size):
    before = stats(fake)
    r = load(ep.port, n, clients, size, ["--auth-plain", PROXY_PASSWORD])
    after = stats(fake)
    return {
        "system": "emailproxy", "sent": r["sent"], "failed": r["failed"],
        "wall_s": r["wall_s"], "msg_s": r["sent"] / r["wall_s"],
        "upstream_connections": after["connections"] - before["connections"],
        "delivered": after["delivered"] - before["delivered"],
        "first_error": r["first_error"],
    }


def graph_stats(fake):
    with urllib.request.urlopen(fake["control"] + "/stats") as r:
        return json.load(r)["graph"]


def wait_graph_sent(fake, want, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = graph_stats(fake)
        if s["sent"] >= want:
            return s
        time.sleep(0.02)
    raise SystemExit(f"the fake Graph sent {graph_stats(fake)['sent']} of {want} messages")


def run_postern_graph(fake, px, n, clients, size):
    """The same load through postern's Graph route (issue 9)."""
    before = graph_stats(fake)
    cpu0 = cpu_ticks(px.pid)
    t0 = time.monotonic()
    r = load(px.port, n, clients, size, [], GRAPH_SENDERS)
    after = wait_graph_sent(fake, before["sent"] + n)
    wall = time.monotonic() - t0
    cpu = (cpu_ticks(px.pid) - cpu0) / TCK
    return {
        "system": "postern-graph", "sent": r["sent"], "failed": r["failed"], "wall_s": wall,
        "load_s": r["wall_s"], "msg_s": n / wall, "accept_msg_s": n / r["wall_s"],
        "cpu_s": cpu, "cpu_ms_per_msg": 1000 * cpu / n,
        "graph_requests": after["requests"] - before["requests"],
        "graph_errors": after["errors"] - before["errors"],
        "first_error": r["first_error"],
    }


def big_message_graph(fake, px):
    """postern's peak RSS while relaying one 100 MB message (a base64 attachment) over Graph."""
    with open(f"/proc/{px.pid}/clear_refs", "w") as f:
        f.write("5")
    rest = status_kb(px.pid, "VmRSS")
    before = graph_stats(fake)
    t0 = time.monotonic()
    subprocess.run([sys.executable, os.path.join(HERE, "send_big.py"), "127.0.0.1", str(px.port),
                    "100", "--mime", "--from", GRAPH_SENDERS[0]], check=True,
                   stdout=subprocess.DEVNULL)
    accepted = time.monotonic() - t0
    after = wait_graph_sent(fake, before["sent"] + 1)
    wall = time.monotonic() - t0
    return {
        "system": "postern-graph-100MB", "rss_before_kb": rest,
        "hwm_kb": status_kb(px.pid, "VmHWM"), "wall_s": wall, "accept_s": accepted,
        "upload_puts": after["upload_puts"] - before["upload_puts"],
        "upload_bytes": after["upload_bytes"] - before["upload_bytes"],
        "graph_errors": after["errors"] - before["errors"],
    }


def big_message(fake, px):
    """postern's peak RSS while relaying one 100 MB message end to end."""
    with open(f"/proc/{px.pid}/clear_refs", "w") as f:
        f.write("5")
    rest = status_kb(px.pid, "VmRSS")
    before = stats(fake)
    t0 = time.monotonic()
    load(px.port, 1, 1, BIG, [])
    after = wait_delivered(fake, before["delivered"] + 1)
    wall = time.monotonic() - t0
    return {
        "system": "postern-100MB", "rss_before_kb": rest,
        "hwm_kb": status_kb(px.pid, "VmHWM"), "wall_s": wall,
        "bytes_delivered": after["delivered_bytes"] - before["delivered_bytes"],
    }


def median_record(runs):
    """One record for several runs of a system in a cell: the median of each number, the
    failures summed, the first error kept."""
    out = dict(runs[0])
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = statistics.median(r[k] for r in runs)
    out["failed"] = sum(r["failed"] for r in runs)
    out["first_error"] = next((r["first_error"] for r in runs if r.get("first_error")), None)
    return out


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    os.makedirs(BENCH_DIR, exist_ok=True)
    log("scratch directory", BENCH_DIR)
    build()
    proxy_exe, proxy_version = venv()
    fake = start_fake()
    px = start_postern(fake)
    ep = start_emailproxy(proxy_exe, fake)
    rows = []
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    jsonl = open(os.path.join(HERE, "results", f"e2e-{stamp}.jsonl"), "w")
    # Warm up: postern's token and first connections, emailproxy's tokens.
    run_postern(fake, px, 2 * N_SENDERS, 4, 2048)
    run_postern_graph(fake, px, 2 * N_SENDERS, 4, 2048)
    run_proxy(fake, ep, N_SENDERS, 1, 2048)
    idle_rss = status_kb(px.pid, "VmRSS")
    floor = {"rtt_us": [loopback_rtt_us()], "fdatasync_us": [fdatasync_us()]}
    for size in SIZES:
        for clients in CLIENTS:
            cell = {"size": size, "clients": clients}
            log(f"cell {size} B x {clients} clients")
            runs = {"postern": [], "direct": [], "postern-graph": []}
            ratios = []
            for rnd in range(ROUNDS):
                # postern and the direct client back to back, in turn first, so a drift of
                # the machine's speed weighs on both alike; Graph after them.
                first_postern = rnd % 2 == 0
                if first_postern:
                    p = run_postern(fake, px, MSGS, clients, size)
                d = run_direct(fake, MSGS, clients, size)
                if not first_postern:
                    p = run_postern(fake, px, MSGS, clients, size)
                g = run_postern_graph(fake, px, MSGS, clients, size)
                ratios.append(p["msg_s"] / d["msg_s"])
                for r in (p, d, g):
                    r.update(cell, round=rnd + 1)
                    runs[r["system"]].append(r)
                    jsonl.write(json.dumps(r) + "\n")
                    log(f"  {r['system']:13} {r['msg_s']:8.1f} msg/s  sent {r['sent']} failed "
                        f"{r['failed']} {r.get('first_error') or ''}")
            e = run_proxy(fake, ep, MSGS_PROXY, clients, size)
            e.update(cell)
            jsonl.write(json.dumps(e) + "\n")
            log(f"  {e['system']:13} {e['msg_s']:8.1f} msg/s  sent {e['sent']} failed "
                f"{e['failed']} {e.get('first_error') or ''}")
            p, d, g = (median_record(runs[k]) for k in ("postern", "direct", "postern-graph"))
            p["ratio_rounds"] = ratios
            rows.append((cell, p, d, e, g))
    floor["rtt_us"].append(loopback_rtt_us())
    floor["fdatasync_us"].append(fdatasync_us())
    jsonl.write(json.dumps({"system": "floor", **floor}) + "\n")
    big = big_message(fake, px)
    jsonl.write(json.dumps(big) + "\n")
    big_graph = big_message_graph(fake, px)
    jsonl.write(json.dumps(big_graph) + "\n")
    jsonl.close()

    cores = os.cpu_count()
    out = [
        f"# End to end: devices -> postern -> fake Exchange (STARTTLS + XOAUTH2), {stamp}",
        "",
        f"{cores} cores, loopback; {MSGS} messages per cell and round, {ROUNDS} round(s): "
        f"postern and the direct client back to back, each first in turn, then Graph; "
        f"figures are medians over the rounds, postern/direct the median of the per-round "
        f"ratios (each round's in brackets); emailproxy once per cell ({MSGS_PROXY} "
        f"messages). One message per client connection, {N_SENDERS} sender mailboxes, pacing "
        f"lifted; emailproxy {proxy_version}. Targets: postern >= 1.5x direct and >= 10x "
        "emailproxy in every cell; CPU < 1 ms/message; peak RSS < 40 MB relaying 100 MB.",
        "",
        "| size | clients | postern msg/s | (accepted msg/s) | direct msg/s | emailproxy msg/s "
        "| postern/direct | postern/emailproxy | postern CPU ms/msg | CPU ms/msg of every "
        "process (postern path / direct) | upstream conns (postern / direct) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell, p, d, e, _ in rows:
        ok = all(r["failed"] == 0 for r in (p, d, e))
        out.append(
            f"| {cell['size'] // 1024} KB | {cell['clients']} | {p['msg_s']:.0f} | "
            f"{p['accept_msg_s']:.0f} | {d['msg_s']:.0f} | {e['msg_s']:.1f} | "
            f"{statistics.median(p['ratio_rounds']):.2f}x "
            f"({', '.join(f'{x:.2f}' for x in p['ratio_rounds'])}) | "
            f"{p['msg_s'] / e['msg_s']:.0f}x | "
            f"{p['cpu_ms_per_msg']:.2f} | "
            f"{p['all_cpu_ms_per_msg']:.2f} / {d['all_cpu_ms_per_msg']:.2f} | "
            f"{p['upstream_connections']} / {d['upstream_connections']} |"
            + ("" if ok else " FAILURES"))
    rtt = sum(floor["rtt_us"]) / len(floor["rtt_us"])
    sync = sum(floor["fdatasync_us"]) / len(floor["fdatasync_us"])
    out += [
        "",
        f"Floor of this machine in this run (start / end): loopback round trip between two "
        f"processes {' / '.join(f'{x:.0f}' for x in floor['rtt_us'])} us; pwrite + fdatasync "
        f"of 2.6 KB in a preallocated file (postern's intake journal) "
        f"{' / '.join(f'{x:.0f}' for x in floor['fdatasync_us'])} us. With one client, "
        f"every message waits for its own round trips: to postern, 8 (connect, greeting, "
        f"EHLO, MAIL, RCPT, DATA, the message, QUIT) and one flush before the 250, about "
        f"{(8 * rtt + sync) / 1000:.2f} ms, at most {1e6 / (8 * rtt + sync):.0f} msg/s; the "
        f"direct client, 12 and the TLS handshake's key exchange and signature (connect, "
        f"greeting, EHLO, STARTTLS, the handshake, EHLO, AUTH, MAIL, RCPT, DATA, the message, "
        f"QUIT), at least {12 * rtt / 1000:.2f} ms. So with one client, postern/direct cannot "
        f"exceed about {12 * rtt / (8 * rtt + sync):.2f}x plus the handshake's share of the "
        f"direct client's time, however little postern spends itself. \"CPU ms/msg of every "
        f"process\": postern, the fake Exchange and the load generator together (direct: the "
        f"fake and the load generator) per message; on {cores} cores, 1000 x {cores} / that "
        f"is the most messages per second the cell could reach with the CPU alone.",
    ]
    out += [
        "",
        f"postern RSS at rest: {idle_rss / 1024:.1f} MB; peak RSS (VmHWM) while relaying one "
        f"100 MB message end to end: {big['hwm_kb'] / 1024:.1f} MB "
        f"({big['wall_s']:.1f} s, {big['bytes_delivered']} bytes delivered).",
    ]
    out += [
        "",
        "## Over Microsoft Graph (issue 9)",
        "",
        "The same clients and postern, on a route with transport = \"graph\" to the fake Graph "
        "(base64 MIME sendMail, at most 4 requests in flight per mailbox). \"accepted\" is the "
        "rate at which postern answered 250 to those messages, \"end to end\" until the fake "
        "Graph had them all; \"keeps up\" is end to end / accepted. Targets: keeps up at 10 "
        "clients, CPU < 1 ms/message.",
        "",
        "| size | clients | Graph end to end msg/s | accepted msg/s | keeps up | Graph/SMTP "
        "| postern CPU ms/msg (Graph) | (SMTP) | Graph requests/msg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cell, p, _, _, g in rows:
        ok = g["failed"] == 0 and g["graph_errors"] == 0
        out.append(
            f"| {cell['size'] // 1024} KB | {cell['clients']} | {g['msg_s']:.0f} | "
            f"{g['accept_msg_s']:.0f} | {100 * g['msg_s'] / g['accept_msg_s']:.0f} % | "
            f"{g['msg_s'] / p['msg_s']:.2f}x | {g['cpu_ms_per_msg']:.2f} | "
            f"{p['cpu_ms_per_msg']:.2f} | {g['graph_requests'] / MSGS:.2f} |"
            + ("" if ok else " FAILURES"))
    out += [
        "",
        f"Peak RSS (VmHWM) while relaying one 100 MB message (a 74 MB base64 attachment) over "
        f"Graph: {big_graph['hwm_kb'] / 1024:.1f} MB (target < 40 MB; accepted in "
        f"{big_graph['accept_s']:.1f} s, sent {big_graph['wall_s']:.1f} s after the first byte; "
        f"{big_graph['upload_puts']} upload PUTs, {big_graph['upload_bytes']} bytes uploaded"
        f"{'' if big_graph['graph_errors'] == 0 else ', ERRORS'}).",
    ]
    report = "\n".join(out) + "\n"
    with open(os.path.join(HERE, "results", f"e2e-{stamp}.md"), "w") as f:
        f.write(report)
    print(report)


if __name__ == "__main__":
    try:
        main()
    finally:
        cleanup()
