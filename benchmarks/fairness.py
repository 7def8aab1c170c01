#!/usr/bin/env python3
"""CPU fairness check: three CPU-bound loads on one core in three VM cgroups with weights 1:2:4; their CPU shares.

Run by hand as root: ``python benchmarks/fairness.py [--mode guests|loops] [--seconds 25] [--cpu N]``.

- ``--mode guests`` (default): three real VMs (`popek start --cpu-weight 100|200|400`, microvm guest, 128 MiB),
  each running a busybox ``while :; do :; done`` loop in guest user space, which runs natively on an emulating
  KVM (only the guest kernel, e.g. its timer interrupts, is emulated). The VMM processes are pinned to one CPU with
  all their threads (`popek start` runs with that CPU affinity, which the VMM and its threads inherit). The guests
  boot, wait on their consoles, and start spinning together when told to; then each VM's cgroup CPU time (the
  whole VMM: vCPU, emulation, I/O threads) is read over the window. Each guest also reports its own /proc/stat
  before and after, which shows the loop stayed in user mode.
- ``--mode loops``: three host busy loops (Python processes) in the same kind of cgroups, no guests.

Weights are v2 cpu.weight 100, 200, 400 (v1 cpu.shares 1024, 2048, 4096). CPU time is read from each cgroup
(popek.cgroups usage()) at the start and the end of the window; the table shows each share of the three's total
against the ideal 1/7, 2/7, 4/7. Other load on that CPU shrinks the total but, if the scheduler is fair, not the
ratios. Everything started is removed at the end, also on Ctrl-C. ``tests/e2e/test_fairness.py`` runs the guest mode.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet import Fleet, ProcessCpu, exit_on_sigterm, thread_affinities  # noqa: E402
from popek.cgroups import VmCgroup, detect  # noqa: E402

WEIGHTS = (100, 200, 400)
LOOP = "import sys\nsys.stdin.readline()\nwhile True:\n    pass\n"
#: The guest's program: report ready, wait for a line on the console, print /proc/stat's cpu line, spin in user
#: space (a busybox sh builtin loop: no system calls) in the background until a second line, print cpu again.
#: The guest's side: shell builtins only around the window (no fork or exec, which are slow emulated guest-kernel
#: work for a guest that gets 1/7 of a CPU), the /proc/stat "cpu" line before and after, the loop in between.
GUEST_SCRIPT = ('echo fair-ready; read -r go; read -r l < /proc/stat; echo "$l"; while :; do :; done & read -r stop; '
                'read -r l < /proc/stat; echo "$l"; echo fair-done')
_CPU_LINE = re.compile(r"^cpu +(\d+(?: \d+)+)\s*$", re.MULTILINE)


@dataclass
class Shares:
    """CPU time of each load over one window: ``used[i]`` CPU-seconds of the load with ``weights[i]``;
    ``elapsed`` wall seconds; ``rows[i]`` extra per-load columns for the table."""

    weights: tuple[int, ...]
    used: list[float]
    elapsed: float
    cpu: int
    rows: list[dict[str, str]] = field(default_factory=list)

    @property
    def shares(self) -> list[float]:
        total = sum(self.used)
        return [u / total if total else 0.0 for u in self.used]

    @property
    def ideal(self) -> list[float]:
        return [w / sum(self.weights) for w in self.weights]

    @property
    def relative_errors(self) -> list[float]:
        """(share - ideal) / ideal for each load."""
        return [(s - i) / i for s, i in zip(self.shares, self.ideal)]


def measure(read: Callable[[], list[float]], seconds: float) -> tuple[list[float], float]:
    """Call ``read`` (cumulative CPU-seconds per load) before and after ``seconds``; the differences and the
    elapsed wall time."""
    t0, u0 = time.monotonic(), read()
    time.sleep(seconds)
    t1, u1 = time.monotonic(), read()
    return [b - a for a, b in zip(u0, u1)], t1 - t0


def cgroup_seconds(groups: list[VmCgroup]) -> Callable[[], list[float]]:
    return lambda: [cg.usage()["cpu_seconds"] for cg in groups]


def loops(seconds: float, cpu: int, weights: tuple[int, ...] = WEIGHTS) -> Shares:
    """Three host busy loops pinned to ``cpu`` in their own cgroups (no guests)."""
    layout = detect()
    tag = uuid.uuid4().hex[:8]
    with ExitStack() as stack:
        groups, procs = [], []
        for w in weights:
            cg = stack.enter_context(VmCgroup.create(f"fairness-{tag}-w{w}", cpu_weight=w, layout=layout))
            p = subprocess.Popen([sys.executable, "-c", LOOP], stdin=subprocess.PIPE)
            stack.callback(p.wait)
            stack.callback(p.kill)  # runs first on exit (ExitStack is last-in first-out), then wait, then rmdir
            os.sched_setaffinity(p.pid, {cpu})
            cg.add_pid(p.pid)
            groups.append(cg)
            procs.append(p)
        for p in procs:
            p.stdin.write(b"go\n")
            p.stdin.flush()
        time.sleep(0.5)  # let the three settle on the CPU
        used, elapsed = measure(cgroup_seconds(groups), seconds)
    return Shares(weights, used, elapsed, cpu)


def guest_user_share(before: str, after: str) -> float:
    """The guest's own user-mode share of its CPU time between two /proc/stat ``cpu`` lines (proc(5): user nice
    system idle iowait irq softirq steal ...; in USER_HZ ticks)."""
    a, b = ([int(x) for x in line.split()] for line in (before, after))
    delta = [y - x for x, y in zip(a, b)]
    return delta[0] / sum(delta) if sum(delta) else 0.0


@dataclass
class GuestShares(Shares):
    """:class:`Shares` of three guests, with what proves the setup: ``guest_user[i]`` the guest's own user-mode
    share (its /proc/stat), ``host_cpu[i]`` the VMM's CPU time split (:class:`fleet.ProcessCpu`) over the window,
    ``affinity[i]`` the set of CPU sets of the VMM's threads after the window, ``ready_s`` seconds from the first
    `popek start` until all three guests waited on their consoles."""

    guest_user: list[float] = field(default_factory=list)
    host_cpu: list[ProcessCpu] = field(default_factory=list)
    affinity: list[set[frozenset[int]]] = field(default_factory=list)
    ready_s: float = 0.0


def guests(seconds: float, cpu: int, weights: tuple[int, ...] = WEIGHTS, *, memory: str = "128M",
           boot_timeout: float = 900.0, fleet: Fleet | None = None) -> GuestShares:
    """Three VMs with ``weights`` pinned to ``cpu``, spinning in guest user space; their cgroup CPU time over
    ``seconds`` (see the module docstring). Uses ``fleet`` if given (it is not closed), else its own.

    :raises fleet.FleetError: if a VM does not start, boot or answer within ``boot_timeout``.
    """
    with ExitStack() as stack:
        if fleet is None:
            fleet = stack.enter_context(Fleet(cpus={cpu}, prefix="popek-fair"))
        t0 = time.monotonic()
        names = [fleet.start(GUEST_SCRIPT, "--memory", memory, "--cpu-weight", str(w), role=f"w{w}")
                 for w in weights]
        for n in names:
            fleet.wait_console(n, "fair-ready", boot_timeout)
        ready = time.monotonic() - t0
        for n in names:
            fleet.send(n, b"go\n")
        for n in names:  # each printed its first cpu line: its loop is starting
            fleet.wait_console(n, _CPU_LINE, 600)
        time.sleep(2.0)  # the three loops are running: let the scheduler settle
        pids = [fleet.vmm_pid(n) for n in names]
        groups = [fleet.cgroup(n) for n in names]
        cpu0 = [ProcessCpu.of(p) for p in pids]
        used, elapsed = measure(cgroup_seconds(groups), seconds)
        host = [ProcessCpu.of(p) - c for p, c in zip(pids, cpu0)]
        affinity = [{frozenset(s) for s in thread_affinities(p).values()} for p in pids]
        for n in names:
            fleet.send(n, b"\n")
        user = []
        for n in names:
            lines = _CPU_LINE.findall(fleet.wait_console(n, "fair-done", 600))
            user.append(guest_user_share(lines[0], lines[-1]))
    rows = [{"guest user": f"{u:.3f}", "VMM native guest": f"{h.guest_fraction:.2f}",
             "threads' CPUs": " ".join(",".join(map(str, sorted(s))) for s in a)}
            for u, h, a in zip(user, host, affinity)]
    return GuestShares(weights, used, elapsed, cpu, rows, user, host, affinity, ready)


def print_table(result: Shares, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    extra = list(result.rows[0]) if result.rows else []
    for col in ("weight", "CPU-s", "share", "ideal", "share / ideal", *extra):
        t.add_column(col, justify="right")
    for i, w in enumerate(result.weights):
        t.add_row(str(w), f"{result.used[i]:.3f}", f"{result.shares[i]:.4f}", f"{result.ideal[i]:.4f}",
                  f"{result.shares[i] / result.ideal[i]:.3f}", *(result.rows[i].values() if result.rows else ()))
    Console(width=140).print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("guests", "loops"), default="guests")
    ap.add_argument("--seconds", type=float, default=25.0, help="measurement window (s)")
    ap.add_argument("--cpu", type=int, default=max(os.sched_getaffinity(0)), help="the CPU all loads are pinned to")
    ap.add_argument("--memory", default="128M", help="guest RAM (guest mode)")
    args = ap.parse_args()
    exit_on_sigterm()
    layout = detect()
    versions = "/".join(sorted({f"v{layout.hierarchies[c][0]}" for c in ("cpu", "memory", "pids")}))
    if args.mode == "loops":
        r = loops(args.seconds, args.cpu)
        what = "host busy loops"
    else:
        r = guests(args.seconds, args.cpu, memory=args.memory)
        what = f"guests ({args.memory}; all three waiting on their consoles {r.ready_s:.0f} s after the first start)"
    print_table(r, f"{what}, cgroup {versions}: {r.elapsed:.1f} s window on CPU {args.cpu}, the three used "
                   f"{sum(r.used):.2f} CPU-s")


if __name__ == "__main__":
    main()
