#!/usr/bin/env python3
"""A/B: two postern binaries against one fake Microsoft 365, alternated, in one run.

Machines here drift by tens of percent between minutes, so a change is judged by running the
binary before it (A) and after it (B) side by side: both daemons start on their own spools in
front of the same fake Exchange/Graph (bench/e2e.py's setup), and each cell runs A and B in
turn, alternating which goes first, ROUNDS times; the direct client runs once per round for
scale. Prints the medians and B/A per cell.

  BIN_A=/tmp/postern-before BIN_B=target/benchmark/postern bench/ab.py
  Knobs (env): N (messages per run, 1000), ROUNDS (3), CELLS ("2048x1 2048x10 102400x1
  102400x10": size x clients), GRAPH=1 (the Graph route instead of SMTP).

A binary may be a script that execs postern with environment variables (allocator or runtime
settings), since the CPU is read from the process the script becomes.
"""
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402

N = int(os.environ.get("N", 1000))
ROUNDS = int(os.environ.get("ROUNDS", 3))
CELLS = [tuple(int(v) for v in c.split("x"))
         for c in os.environ.get("CELLS", "2048x1 2048x10 102400x1 102400x10").split()]
GRAPH = os.environ.get("GRAPH") == "1"


def main():
    bins = {"A": os.environ["BIN_A"], "B": os.environ["BIN_B"]}
    fake = e2e.start_fake()
    px = {}
    for k, b in bins.items():
        # e2e keeps each daemon's files under BENCH_DIR: one per binary.
        e2e.BENCH_DIR = tempfile.mkdtemp(prefix=f"ab{k}-", dir="/tmp/bench")
        e2e.POSTERN = b
        px[k] = e2e.start_postern(fake)
        e2e.run_postern(fake, px[k], 16, 4, 2048)
        e2e.run_postern_graph(fake, px[k], 16, 4, 2048)
    run = e2e.run_postern_graph if GRAPH else e2e.run_postern
    for size, clients in CELLS:
        res = {"A": [], "B": [], "direct": []}
        for r in range(ROUNDS):
            for k in ("A", "B") if r % 2 == 0 else ("B", "A"):
                o = run(fake, px[k], N, clients, size)
                if o["failed"]:
                    raise SystemExit(f"{k}: {o['failed']} failed: {o['first_error']}")
                res[k].append((o["msg_s"], o["cpu_ms_per_msg"]))
            res["direct"].append((e2e.run_direct(fake, N, clients, size)["msg_s"], 0.0))

        def med(k, i):
            return statistics.median(x[i] for x in res[k])
        print(f"{size // 1024:>3} KB x {clients:<2} A {med('A', 0):6.0f} msg/s "
              f"{med('A', 1):.2f} ms | B {med('B', 0):6.0f} msg/s {med('B', 1):.2f} ms | "
              f"B/A {med('B', 0) / med('A', 0):.2f} | direct {med('direct', 0):6.0f} "
              f"B/direct {med('B', 0) / med('direct', 0):.2f}", flush=True)


if __name__ == "__main__":
    try:
        main()
    finally:
        e2e.cleanup()
