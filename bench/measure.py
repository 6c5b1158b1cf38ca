#!/usr/bin/env python3
"""Run one load command against a server and measure the server's process tree.

    measure.py --pid ROOT_PID [--drain 'SHELL CMD'] [--drain-timeout S] [--reset-hwm]
               -- LOAD_CMD ARGS...

ROOT_PID is postern's pid, or Postfix's master pid; the tree is ROOT_PID plus all its
descendants, found afresh at every sample (Postfix starts and ends smtpd, cleanup,
trivial-rewrite, discard... processes during a cell).

CPU of the tree = sum over live processes of utime+stime (/proc/PID/stat fields 14, 15)
                + the root's cutime+cstime (fields 16, 17: children it has already reaped).
Sampled before the load, when the load command exits, and when the queue has drained
(the --drain command, polled every 50 ms, exits 0). Postfix's master reaps its children,
so a process that lives and dies inside the cell is counted exactly once.

Memory: every 100 ms the sum of VmRSS over the tree and (for a multi-process tree) the sum
of Pss from smaps_rollup, which splits shared library pages fairly (peaks kept); at the end the
largest VmHWM of any single live process. With --reset-hwm, "5" is written to each tree
process's /proc/PID/clear_refs first, so VmHWM is the peak of this cell only (postern).

Prints one JSON object on stdout.
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

TCK = os.sysconf("SC_CLK_TCK")


def read_stat(pid):
    """(ppid, utime+stime, cutime+cstime) in ticks, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    # comm may contain spaces/parens: split after the last ')'
    rest = s[s.rindex(")") + 2:].split()
    # rest[0] is field 3 (state); field N is rest[N-3]
    return int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[13]) + int(rest[14])


def tree(root):
    """Pids of root and all its descendants."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = read_stat(int(name))
        if st is None:
            continue
        children.setdefault(st[0], []).append(int(name))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_ticks(root):
    total = 0
    for p in tree(root):
        st = read_stat(p)
        if st is None:
            continue
        total += st[1]
        if p == root:
            total += st[2]
    return total


def pss_kb(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def status_kb(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Sampler(threading.Thread):
    def __init__(self, root, period=0.1):
        super().__init__(daemon=True)
        self.root, self.period = root, period
        self.peak_sum_rss_kb = 0
        self.peak_sum_pss_kb = 0
        self.peak_procs = 0
        self.stop = threading.Event()

    def sample(self):
        pids = tree(self.root)
        s = sum(status_kb(p, "VmRSS") for p in pids)
        self.peak_sum_rss_kb = max(self.peak_sum_rss_kb, s)
        if len(pids) > 1:
            self.peak_sum_pss_kb = max(self.peak_sum_pss_kb, sum(pss_kb(p) for p in pids))
        else:
            self.peak_sum_pss_kb = max(self.peak_sum_pss_kb, s)
        self.peak_procs = max(self.peak_procs, len(pids))

    def run(self):
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.period)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--drain", default=None)
    ap.add_argument("--drain-timeout", type=float, default=300)
    ap.add_argument("--reset-hwm", action="store_true")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    root = a.pid
    if read_stat(root) is None:
        sys.exit(f"measure.py: no process {root}")

    if a.reset_hwm:
        for p in tree(root):
            try:
                with open(f"/proc/{p}/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass

    sampler = Sampler(root)
    sampler.sample()
    cpu0 = cpu_ticks(root)
    sampler.start()
    t0 = time.monotonic()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t1 = time.monotonic()
    cpu1 = cpu_ticks(root)

    drained, t2 = True, t1
    if a.drain:
        drained = False
        while time.monotonic() - t1 < a.drain_timeout:
            if subprocess.run(a.drain, shell=True, executable="/bin/bash").returncode == 0:
                drained = True
                break
            time.sleep(0.05)
        t2 = time.monotonic()
    cpu2 = cpu_ticks(root)
    sampler.stop.set()
    sampler.join()
    sampler.sample()
    pids = tree(root)
    hwm = max((status_kb(p, "VmHWM") for p in pids), default=0)
    root_hwm = status_kb(root, "VmHWM")

    print(json.dumps({
        "rc": proc.returncode,
        "stderr": proc.stderr.decode(errors="replace")[-500:],
        "wall_s": round(t1 - t0, 4),
        "drain_s": round(t2 - t1, 4),
        "drained": drained,
        "cpu_load_s": (cpu1 - cpu0) / TCK,
        "cpu_total_s": (cpu2 - cpu0) / TCK,
        "peak_sum_rss_kb": sampler.peak_sum_rss_kb,
        "peak_sum_pss_kb": sampler.peak_sum_pss_kb,
        "max_proc_hwm_kb": hwm,
        "root_hwm_kb": root_hwm,
        "peak_procs": sampler.peak_procs,
    }))


if __name__ == "__main__":
    main()
