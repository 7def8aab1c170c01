#!/usr/bin/env python3
"""CPU fairness check: three busy loops on one core in three VmCgroups with weights 1:2:4; their CPU shares.

Run by hand as root: ``python benchmarks/fairness.py [--seconds 10] [--cpu 0]``. Each loop is a child process pinned
(sched_setaffinity) to the same CPU and moved into its own cgroup (cpu_weight 100, 200, 400: v2 cpu.weight, or v1
cpu.shares 1024, 2048, 4096) before it starts spinning. CPU time is read from each cgroup (popek.cgroups usage()) at
the start and the end of the window; the table shows each one's share of the three's total against the ideal 1/7,
2/7, 4/7. Other load on that CPU shrinks the total but, if the scheduler is fair, not the ratios. The cgroups and the
loops are removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from popek.cgroups import VmCgroup, detect  # noqa: E402

WEIGHTS = (100, 200, 400)
LOOP = "import sys\nsys.stdin.readline()\nwhile True:\n    pass\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="measurement window (s)")
    ap.add_argument("--cpu", type=int, default=0, help="the CPU all three loops are pinned to")
    args = ap.parse_args()
    layout = detect()
    versions = sorted({f"v{layout.hierarchies[c][0]}" for c in ("cpu", "memory", "pids")})
    tag = uuid.uuid4().hex[:8]
    with ExitStack() as stack:
        groups, procs = [], []
        for w in WEIGHTS:
            cg = stack.enter_context(VmCgroup.create(f"fairness-{tag}-w{w}", cpu_weight=w, layout=layout))
            p = subprocess.Popen([sys.executable, "-c", LOOP], stdin=subprocess.PIPE)
            stack.callback(p.wait)
            stack.callback(p.kill)  # runs first on exit (ExitStack is last-in first-out), then wait, then rmdir
            os.sched_setaffinity(p.pid, {args.cpu})
            cg.add_pid(p.pid)
            groups.append(cg)
            procs.append(p)
        for p in procs:
            p.stdin.write(b"go\n")
            p.stdin.flush()
        time.sleep(0.5)  # let the three settle on the CPU
        t0, u0 = time.monotonic(), [cg.usage()["cpu_seconds"] for cg in groups]
        time.sleep(args.seconds)
        t1, u1 = time.monotonic(), [cg.usage()["cpu_seconds"] for cg in groups]
    used = [b - a for a, b in zip(u0, u1)]
    total = sum(used)
    print(f"cgroup {'/'.join(versions)}; {args.seconds:.1f} s window on CPU {args.cpu}; "
          f"the three used {total:.2f} CPU-s of {t1 - t0:.2f} s")
    print(f"{'weight':>6} {'cpu-s':>7} {'share':>7} {'ideal':>7} {'error':>7}")
    for w, u in zip(WEIGHTS, used):
        ideal = w / sum(WEIGHTS)
        share = u / total if total else 0.0
        print(f"{w:>6} {u:>7.3f} {share:>7.3f} {ideal:>7.3f} {share - ideal:>+7.3f}")


if __name__ == "__main__":
    main()
