#!/usr/bin/env python3
"""Turn upstream.sh's raw JSONL into the Markdown report (stdout).

    upstream_report.py results/upstream-<date>.jsonl
"""
import json
import statistics
import sys

TARGET_CPU_MS = 1.0
TARGET_BIG_MB = 40


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def main():
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    env = next((r for r in rows if r["kind"] == "env"), {})
    idle = next((r for r in rows if r["kind"] == "idle"), {})
    cells = [r for r in rows if r["kind"] == "cell"]
    big = next((r for r in rows if r["kind"] == "big"), None)
    out = []
    p = out.append
    p(f"# postern to Microsoft 365's fakes: Graph and SMTP end to end, {env.get('date', '?')}")
    p("")
    p(f"Machine: {env.get('nproc')} × {env.get('cpu')}, kernel {env.get('kernel')}. postern "
      f"{env.get('postern_commit')}. {env.get('msgs')} messages per cell and route, "
      f"{env.get('rounds')} round(s), routes alternated within each round. Load: `smtp-source`, "
      "one message per connection. The fakes (examples/fake_m365) share the machine's cores "
      "with postern; only postern's CPU is counted.")
    p("")
    p("- **msg/s end to end**: messages / (time to accept them all + time until postern's "
      "queue is empty, i.e. the fake has taken every one). `accept` is postern with the "
      "`discard` transport: its own acceptance rate, the baseline.")
    p("- **vs accept**: the route's rate as a share of the acceptance rate in the same round "
      "(median over rounds). 100 % means delivery keeps up with acceptance.")
    p("- **CPU ms/msg**: postern's utime+stime from the start of the load until its queue "
      f"drained, per message (target for Graph: under {TARGET_CPU_MS} ms).")
    p("- **peak RSS**: postern's VmHWM during the run (reset before each run).")
    p("")
    p("| size | clients | route | msg/s end to end | vs accept | CPU ms/msg | peak RSS MB | ok |")
    p("|---:|---:|---|---:|---:|---:|---:|---|")
    verdicts = []
    for size, conc in sorted({(r["size"], r["conc"]) for r in cells}):
        rs = [r for r in cells if r["size"] == size and r["conc"] == conc]
        rounds = sorted({r["round"] for r in rs})

        def rate(r):
            return r["msgs"] / (r["wall_s"] + r["drain_s"])

        by = {(r["round"], r["route"]): r for r in rs}
        for route in ("accept", "smtp", "graph"):
            mine = [by[(n, route)] for n in rounds if (n, route) in by]
            if not mine:
                continue
            ok = all(r["rc"] == 0 and r["drained"] and r["delivered"] == r["msgs"] for r in mine)
            ratios = [rate(by[(n, route)]) / rate(by[(n, "accept")])
                      for n in rounds if (n, route) in by and (n, "accept") in by]
            cpu = med([1000 * r["cpu_total_s"] / r["msgs"] for r in mine])
            p(f"| {size // 1024} KB | {conc} | {route} | {med([rate(r) for r in mine]):.1f} | "
              f"{100 * med(ratios):.0f} % | {cpu:.2f} | "
              f"{max(r['root_hwm_kb'] for r in mine) / 1024:.1f} | {'yes' if ok else 'FAILED'} |")
            if route == "graph":
                verdicts.append((size, conc, med(ratios), cpu, ok))
    p("")
    if idle:
        p(f"postern idle RSS: {idle.get('rss_kb', 0) / 1024:.1f} MB.")
        p("")
    if big:
        hwm = big["root_hwm_kb"] / 1024
        p(f"**100 MB message over Graph** (a 74 MB base64 attachment: skeleton draft, upload "
          f"session in 3.2 MB ranges, send): delivered {big['delivered']}, peak RSS (VmHWM) "
          f"**{hwm:.1f} MB** (target < {TARGET_BIG_MB} MB: "
          f"{'met' if hwm < TARGET_BIG_MB and big['delivered'] == 1 else 'NOT met'}); "
          f"received in {big['wall_s']:.1f} s, relayed {big['drain_s']:.1f} s later; postern CPU "
          f"{big['cpu_total_s']:.2f} s.")
        p("")
    p("## Targets (issue 9)")
    p("")
    for size, conc, ratio, cpu, ok in verdicts:
        p(f"- Graph {size // 1024} KB × {conc}: {100 * ratio:.0f} % of postern's acceptance rate, "
          f"{cpu:.2f} ms CPU/msg ({'under' if cpu < TARGET_CPU_MS else 'OVER'} {TARGET_CPU_MS} ms)"
          f"{'' if ok else ' — FAILED run'}")
    print("\n".join(out))


if __name__ == "__main__":
    main()
