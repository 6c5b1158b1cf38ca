#!/usr/bin/env python3
"""Turn accept.sh's raw JSONL into the Markdown report (stdout).

    report.py results/accept-<date>.jsonl
"""
import json
import os
import statistics
import sys

TARGET_RATIO = 2.0
TARGET_BIG_MB = 32
TARGET_IDLE_MB = 10


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def mb(kb):
    return kb / 1024


def main():
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    env = next((r for r in rows if r["kind"] == "env"), {})
    cells = [r for r in rows if r["kind"] == "cell"]
    out = []
    p = out.append

    p(f"# postern vs Postfix: acceptance benchmark, {env.get('date', '?')}")
    p("")
    p(f"Machine: {env.get('nproc')} × {env.get('cpu')}, kernel {env.get('kernel')}, "
      f"spools on {env.get('fs')} ({env.get('journal', '?')}). postern {env.get('postern_commit')}, Postfix "
      f"{env.get('postfix_version')}. {env.get('msgs')} messages per cell and server, "
      f"{env.get('rounds')} round(s) per cell, servers alternated within each round; load: "
      f"`smtp-source` (one message per connection).")
    p("")

    if "WITHOUT" in env.get("journal", ""):
        p("Note: this filesystem has no journal. Postfix makes one fsync per message (its queue "
          "file; see the syscall table) and never fsyncs a directory, relying on the filesystem to "
          "keep the directory entry (which a journal would do). postern's 250 for a message up to "
          "1 MiB follows one fdatasync of its own intake journal (a preallocated file, so no "
          "metadata), shared by every message committed at that moment; its queue files and "
          "their directories are flushed by a checkpoint before the journal lets go of them. "
          "So on this machine Postfix's 250 is, strictly, the weaker promise; the comparison is "
          "still what each server does out of the box.")
        p("")

    keys = sorted({(r["size"], r["conc"]) for r in cells})
    summary, detail, verdicts = [], [], []
    for size, conc in keys:
        rs = [r for r in cells if r["size"] == size and r["conc"] == conc]
        by = {}
        for r in rs:
            ok = r["rc"] == 0 and r["drained"] and r["delivered"] == r["msgs"]
            rate = r["msgs"] / r["wall_s"]
            by.setdefault(r["round"], {})[r["server"]] = dict(r, ok=ok, rate=rate)
        px = [v["postern"] for v in by.values() if "postern" in v]
        pf = [v["postfix"] for v in by.values() if "postfix" in v]
        pairs = [v for v in by.values() if "postern" in v and "postfix" in v]
        ratios = [v["postern"]["rate"] / v["postfix"]["rate"] for v in pairs]
        of_ceiling = [v["postern"]["rate"] / v["postern"]["ceiling"] for v in pairs
                      if v["postern"].get("ceiling")]
        failed = [f"{x['server']} r{x['round']}" for x in px + pf if not x["ok"]]
        cell = f"{size // 1024} KB × {conc}"
        px_rate, pf_rate = med([x["rate"] for x in px]), med([x["rate"] for x in pf])
        ratio = med(ratios)
        summary.append(
            f"| {cell} | {px_rate:,.0f} | {pf_rate:,.0f} | **{ratio:.2f}×** (min {min(ratios):.2f}) "
            f"| {med([1000 * x['cpu_total_s'] / x['msgs'] for x in px]):.2f} "
            f"| {med([1000 * x['cpu_total_s'] / x['msgs'] for x in pf]):.2f} "
            f"| {mb(max(x['root_hwm_kb'] for x in px)):.1f} MB "
            f"| {mb(max(x['peak_sum_pss_kb'] for x in pf)):.1f} MB "
            f"| {med([x['ceiling'] for x in px]):,.0f} "
            f"| {100 * med(of_ceiling):.0f}% |"
            + (f" FAILED: {', '.join(failed)}" if failed else ""))
        for rnd in sorted(by):
            v = by[rnd]
            for s in ("postern", "postfix"):
                if s not in v:
                    continue
                x = v[s]
                detail.append(
                    f"| {cell} | {rnd} | {s} | {x['rate']:,.0f} | {x['wall_s']:.2f} "
                    f"| {x['drain_s']:.2f} | {1000 * x['cpu_load_s'] / x['msgs']:.2f} "
                    f"| {1000 * x['cpu_total_s'] / x['msgs']:.2f} "
                    f"| {mb(x['root_hwm_kb'] if s == 'postern' else x['peak_sum_pss_kb']):.1f} "
                    f"| {mb(x['peak_sum_rss_kb']):.1f} | {x['peak_procs']} | {x['ceiling']:,.0f} "
                    f"| {x['delivered']}/{x['msgs']}{'' if x['ok'] else ' FAILED'} | {x.get('load1', '')} |")
        met = ratio >= TARGET_RATIO and not failed
        verdicts.append(f"- {cell}: postern/Postfix = {ratio:.2f}× (rounds: "
                        f"{', '.join(f'{r:.2f}' for r in ratios)}) → "
                        f"{'**met**' if met else '**NOT met**'}")

    p("## Throughput, CPU, memory per cell (medians over rounds)")
    p("")
    p("| cell (size × clients) | postern msg/s | Postfix msg/s | postern/Postfix (paired per round) "
      "| postern CPU ms/msg | Postfix CPU ms/msg | postern peak RSS | Postfix peak RSS (Σ PSS) "
      "| fsync ceiling ops/s (writers = clients) | postern % of ceiling |")
    p("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    out.extend(summary)
    p("")
    p("msg/s: messages / wall time of smtp-source (every message got 250). CPU: user+system "
      "time of the server's whole process tree from the start of the load until its queue "
      f"had drained (both servers deliver locally: postern's {os.environ.get('PX_TRANSPORT', 'discard')} transport, Postfix's "
      "discard), per message. postern peak RSS: VmHWM, reset before each run. Postfix "
      "peak RSS: peak of Σ Pss over its processes (master, smtpd×N, cleanup×N, qmgr, "
      "trivial-rewrite, discard, postlogd, ...) sampled every 100 ms; Σ VmRSS, which counts "
      "shared libraries once per process, is in the details. Ceiling: bench/fsync_ceiling "
      "(write 2 KB + fsync + rename + dir fsync) measured right before each round, with "
      "as many writers as clients; % of ceiling is per round, then the median.")
    p("")

    p("## Targets")
    p("")
    p(f"≥ {TARGET_RATIO:.0f}× Postfix's accepted msg/s in every cell:")
    out.extend(verdicts)
    idle = next((r for r in rows if r["kind"] == "idle" and r["server"] == "postern"), None)
    bigs = {r["server"]: r for r in rows if r["kind"] == "big"}
    if idle:
        v = mb(idle["rss_kb"])
        p(f"- postern idle RSS (2 s after ready): {v:.1f} MB (target < {TARGET_IDLE_MB} MB) → "
          f"{'**met**' if v < TARGET_IDLE_MB else '**NOT met**'}")
    if "postern" in bigs:
        b = bigs["postern"]
        v = mb(b["root_hwm_kb"])
        ok = b["rc"] == 0
        p(f"- postern peak RSS while receiving one {b['mb']} MB message: {v:.1f} MB "
          f"(target < {TARGET_BIG_MB} MB; {'accepted' if ok else 'NOT accepted, rc=%s' % b['rc']} "
          f"in {b['wall_s']:.1f} s, {b['cpu_total_s']:.2f} CPU s) → "
          f"{'**met**' if v < TARGET_BIG_MB and ok else '**NOT met**'}")
    if "postfix" in bigs:
        b = bigs["postfix"]
        p(f"- for reference, Postfix with the same {b['mb']} MB message: largest process "
          f"VmHWM {mb(b['max_proc_hwm_kb']):.1f} MB, peak Σ PSS {mb(b['peak_sum_pss_kb']):.1f} MB, "
          f"{b['wall_s']:.1f} s, {b['cpu_total_s']:.2f} CPU s (rc={b['rc']})")
    p("")

    ceil = [r for r in rows if r["kind"] == "ceiling"]
    if ceil:
        p("## Disk durable-write ceiling (bench/fsync_ceiling, 2 KB)")
        p("")
        p("| when | 1 writer ops/s | 10 writers ops/s |")
        p("|---|--:|--:|")
        for when in ("start", "end"):
            w = {r["writers"]: r["ops_per_sec"] for r in ceil if r["when"] == when}
            if w:
                p(f"| {when} | {w.get(1, float('nan')):,.0f} | {w.get(10, float('nan')):,.0f} |")
        per_round = [r["ceiling"] for r in cells]
        if per_round:
            p("")
            p(f"Across the per-round measurements the ceiling ranged {min(per_round):,.0f}–"
              f"{max(per_round):,.0f} ops/s (the disk's flush speed drifts; hence the "
              f"alternation and paired ratios).")
        p("")

    st = [r for r in rows if r["kind"] == "strace"]
    if st:
        p("## Syscalls per message (strace -c -f on the server tree, 2 KB × 10 clients, "
          "not timed)")
        p("")
        names = ["fsync", "fdatasync", "rename", "renameat", "renameat2", "openat", "mkdir",
                 "mkdirat", "unlink", "unlinkat", "write", "writev", "read", "futex",
                 "epoll_wait", "sched_yield"]
        present = [n for n in names if any(n in r["calls"] for r in st)]
        p("| server | " + " | ".join(present) + " | all syscalls |")
        p("|---|" + "--:|" * (len(present) + 1))
        for r in st:
            n = r["msgs"]
            p(f"| {r['server']} | " + " | ".join(
                f"{r['calls'].get(k, 0) / n:.2f}" for k in present)
              + f" | {sum(r['calls'].values()) / n:.1f} |")
        p("")

    p("## Every run")
    p("")
    p("| cell | round | server | msg/s | wall s | drain s after load | CPU ms/msg during load "
      "| CPU ms/msg incl. drain | peak RSS MB (postern HWM / Postfix Σ PSS) | peak Σ RSS MB "
      "| max processes | ceiling ops/s | delivered | load avg (1 min) at end |")
    p("|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    out.extend(detail)
    print("\n".join(out))


if __name__ == "__main__":
    main()
