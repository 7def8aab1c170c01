#!/usr/bin/env python3
"""Warm-start benchmark: `popek run -- echo MARKER` from process start to exit, cold (a boot) vs warm (from the
template, popek.warm), with where a warm run's time goes, against QEMU TCG booting the same kernel, initrd, memory
and command line in the same run (QEMU has no "run a command in a booted guest" path; its cold boot is the
reference).

Run by hand: ``.venv/bin/python benchmarks/warm.py [--runs 5] [--cold-runs 1] [--memory 256M] [--timeout 900]``.
Templates go to a private temporary POPEK_WARM_DIR (removed at the end). Prints the machine's load average too:
the machines are shared, and every guest system call costs emulated kernel time on an emulating KVM.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from boot import MARKER, QEMU_ACCELS, qemu_argv, timed  # noqa: E402

from popek.guestcmd import build_cmdline  # noqa: E402
from popek.kvm.system import detect_flavor  # noqa: E402
from popek.runner import resolve_guest  # noqa: E402

POPEK = [sys.executable, "-m", "popek.cli", "run", "--stats-json"]


def popek_runs(extra: list[str], n: int, timeout: float) -> tuple[list[float], list[dict]]:
    """``n`` runs of `popek run --stats-json EXTRA -- echo MARKER`: (seconds from process start to exit, stats)."""
    times, stats = [], []
    for _ in range(n):
        r = timed([*POPEK, *extra, "--", "echo", MARKER], timeout)
        if not r.ok or r.exit_s is None:
            raise SystemExit(f"popek run {' '.join(extra)} failed: {r.last_line}")
        times.append(r.exit_s)
        line = [ln for ln in r.output.decode(errors="replace").splitlines() if ln.startswith('{"time_to_init_s"')]
        stats.append(json.loads(line[-1]))
    return times, stats


def import_seconds(n: int = 5) -> float:
    """Median seconds of a Python process that imports popek.cli and exits (interpreter start, imports, exit)."""
    out = []
    for _ in range(n):
        t = time.monotonic()
        subprocess.run([sys.executable, "-c", "import popek.cli"], check=True)
        out.append(time.monotonic() - t)
    return statistics.median(out)


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="warm runs (the median is reported)")
    p.add_argument("--cold-runs", type=int, default=1, help="cold runs (each a ~20-40 s boot here)")
    p.add_argument("--memory", default="256M")
    p.add_argument("--timeout", type=float, default=900.0)
    args = p.parse_args()

    store = Path(tempfile.mkdtemp(prefix="popek-warm-bench-"))
    os.environ["POPEK_WARM_DIR"] = str(store)
    os.environ.pop("POPEK_NO_WARM", None)
    load_before = os.getloadavg()
    try:
        mem = ["--memory", args.memory]
        cold, _ = popek_runs(["--cold", *mem], args.cold_runs, args.timeout)
        first, first_stats = popek_runs(mem, 1, args.timeout)
        warm, warm_stats = popek_runs(mem, args.runs, args.timeout)
        if not all(s["warm"] for s in warm_stats) or first_stats[0]["warm"]:
            raise SystemExit("the warm runs did not start from the template (see --stats-json's \"warm\")")
        qemu = shutil.which("qemu-system-x86_64")
        qemu_s = None
        if qemu:
            kernel, initrd, _ = resolve_guest(None, None, progress=False)
            cmdline = build_cmdline(emulating=detect_flavor().emulating_cpl0, command=["echo", MARKER])
            r = timed(qemu_argv(qemu, "microvm", args.memory, kernel, initrd, cmdline) + QEMU_ACCELS["qemu-tcg"],
                      args.timeout)
            qemu_s = r.exit_s if r.ok else None
        imports = import_seconds()
    finally:
        shutil.rmtree(store, ignore_errors=True)
    load_after = os.getloadavg()

    warm_s = statistics.median(warm)
    t = Table(title=f"popek run -- echo (process start to exit), {args.memory}, KVM {detect_flavor().name}")
    t.add_column("run")
    t.add_column("seconds", justify="right")
    t.add_column("vs Popek warm", justify="right")
    rows = [(f"Popek cold (--cold, median of {len(cold)})", statistics.median(cold)),
            ("Popek first run (boots, makes the template)", first[0]),
            (f"Popek warm (median of {len(warm)})", warm_s),
            ("QEMU 7.2 TCG, microvm, cold boot (same kernel, initrd, command)", qemu_s)]
    for name, s in rows:
        t.add_row(name, "-" if s is None else f"{s:.2f}", "-" if s is None else f"{s / warm_s:.1f}x")
    steps = Table(title="where a warm run's time goes (medians)")
    steps.add_column("step")
    steps.add_column("seconds", justify="right")
    steps.add_row("Python start + import popek.cli + exit (no run)", f"{imports:.3f}")
    for step in warm_stats[0]["warm_steps_s"]:
        steps.add_row(f"warm step: {step}", f"{statistics.median(s['warm_steps_s'][step] for s in warm_stats):.3f}")
    console = Console()
    console.print(t)
    console.print(steps)
    console.print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} (2 cores, shared)")


if __name__ == "__main__":
    main()
