#!/usr/bin/env python3
"""Density benchmark: idle VMs started one after another; per-VM VMM memory overhead, guest RAM resident, start time.

Run by hand as root: ``.venv/bin/python benchmarks/density.py [--count 20] [--memory 128M] [--skip qemu-tcg]``.

Each VMM boots the same kernel, initrd, memory and command line (the microvm guest; its init runs ``echo <marker>;
sleep``, so the guest is idle after it): Popek with `popek start` (one VMM process per VM), QEMU with TCG
(``-M microvm -accel tcg``), started one at a time, the next once the previous one's marker is on its serial
console. QEMU with KVM does not get this guest to init on an emulating KVM (it stops on the ``int3`` emulation
failure, README "Boot benchmark"); ``--qemu-kvm`` starts one such QEMU anyway and measures it where it stopped.

Measured with all ``--count`` VMs of a VMM running (after ``--settle`` seconds), from each VMM process's
/proc/PID/smaps (popek.hostmem), with the guest RAM mapping taken out: Popek's is the ``popek-ram-*`` memfd, QEMU's
the anonymous mapping of exactly the guest's memory size.

- VMM overhead: USS (Private_Clean + Private_Dirty) of every other mapping, what one more VM costs the host beyond
  its guest's pages (shared libraries mapped by several VMMs are not in it); PSS for comparison.
- guest RAM resident: pages of the guest RAM mapping that are in host memory now.
- start: from starting the VMM (``popek start`` / QEMU's exec) until the guest's marker is on its console.

A rich table gives medians over the VMs and ratios to Popek. Every VM is killed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet import Fleet, FleetError, exit_on_sigterm  # noqa: E402
from popek.guestcmd import build_cmdline  # noqa: E402
from popek.hostmem import Mapping, MemorySplit, anonymous_of_size, is_popek_ram, read_smaps, split  # noqa: E402
from popek.kvm.system import detect_flavor  # noqa: E402
from popek.runner import parse_size, resolve_guest  # noqa: E402

MARKER = "popek-density-ready"
GUEST_COMMAND = f"echo {MARKER}; exec sleep 1000000000"
MiB = 1 << 20


@dataclass
class Sample:
    pid: int
    start_s: float
    mem: MemorySplit | None = None
    tcg_buffer_rss: int = 0


@dataclass
class Row:
    vmm: str
    samples: list[Sample] = field(default_factory=list)
    note: str = ""


def is_tcg_buffer(m: Mapping) -> bool:
    """QEMU TCG's translated-code buffer: an anonymous read-write-execute mapping (tcg_init's region)."""
    return m.path == "" and m.perms.startswith("rwx")


def measure(row: Row, is_ram) -> None:
    """Fill in each sample's memory split from its process's smaps (and print it, so a run's numbers survive)."""
    for i, s in enumerate(row.samples):
        try:
            maps = read_smaps(s.pid)
        except OSError:
            continue
        s.mem = split(maps, is_ram)
        s.tcg_buffer_rss = sum(m.get("Rss") for m in maps if is_tcg_buffer(m))
        print(f"{row.vmm} {i + 1}: start {s.start_s:.1f} s, overhead USS {s.mem.vmm_uss / MiB:.1f} MiB, "
              f"PSS {s.mem.vmm_pss / MiB:.1f}, guest RAM resident {s.mem.guest_rss / MiB:.1f} MiB "
              f"({s.mem.guest_mappings} mapping(s))", file=sys.stderr)


def out_of_time(row: Row, i: int, count: int, until: float) -> bool:
    """True (and a note on ``row``) once ``until`` (time.monotonic) has passed before VM ``i`` of ``count``."""
    if time.monotonic() < until:
        return False
    row.note = f"--time-limit reached after {i} of {count} VMs"
    return True


def popek_vms(count: int, memory: str, kernel, initrd, timeout: float, settle: float, until: float,
              stack: ExitStack) -> Row:
    fleet = stack.enter_context(Fleet(prefix="popek-density"))
    row = Row("popek")
    args = ["--memory", memory, "--kernel", str(kernel)] + (["--initrd", str(initrd)] if initrd else [])
    for i in range(count):
        if out_of_time(row, i, count, until):
            break
        t0 = time.monotonic()
        try:
            name = fleet.start(GUEST_COMMAND, *args)
            fleet.wait_console(name, MARKER, timeout)
        except FleetError as e:
            row.note = f"VM {i + 1} did not start: {str(e).strip().splitlines()[-1][-200:]}"
            print(f"popek VM {i + 1}: {e}", file=sys.stderr)
            break
        row.samples.append(Sample(fleet.vmm_pid(name), time.monotonic() - t0))
        print(f"popek VM {i + 1}/{count}: {row.samples[-1].start_s:.1f} s", file=sys.stderr)
    time.sleep(settle)
    measure(row, is_popek_ram)
    return row


def qemu_argv(memory: str, kernel, initrd, cmdline: str, log: Path, accel: list[str]) -> list[str]:
    argv = ["qemu-system-x86_64", "-M", "microvm", "-m", f"{parse_size(memory) >> 20}", "-nodefaults",
            "-no-user-config", "-display", "none", "-monitor", "none", "-serial", f"file:{log}", "-no-reboot",
            "-kernel", str(kernel), "-append", cmdline]
    return argv + (["-initrd", str(initrd)] if initrd else []) + accel


def spawn(argv: list[str], stack: ExitStack) -> subprocess.Popen:
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stack.callback(p.wait)
    stack.callback(p.kill)  # runs first (ExitStack is last-in first-out)
    return p


def wait_marker(log: Path, proc: subprocess.Popen, timeout: float) -> str | None:
    """None once the marker is in ``log``, else why not (the process ended, or the timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and MARKER.encode() in log.read_bytes():
            return None
        if proc.poll() is not None:
            return f"exited {proc.returncode}: {proc.stderr.read().decode(errors='replace').strip()[-300:]}"
        time.sleep(0.1)
    return f"no marker within {timeout:g} s"


def qemu_tcg_vms(count: int, memory: str, kernel, initrd, cmdline: str, timeout: float, settle: float,
                 until: float, stack: ExitStack) -> Row:
    tmp = Path(tempfile.mkdtemp(prefix="popek-density-qemu-"))
    stack.callback(shutil.rmtree, tmp, True)
    row = Row("qemu-tcg")
    for i in range(count):
        if out_of_time(row, i, count, until):
            break
        log = tmp / f"serial-{i}.log"
        t0 = time.monotonic()
        p = spawn(qemu_argv(memory, kernel, initrd, cmdline, log, ["-accel", "tcg"]), stack)
        why = wait_marker(log, p, timeout)
        if why:
            row.note = f"VM {i + 1} did not start: {why}"
            break
        row.samples.append(Sample(p.pid, time.monotonic() - t0))
        print(f"qemu-tcg VM {i + 1}/{count}: {row.samples[-1].start_s:.1f} s", file=sys.stderr)
    time.sleep(settle)
    measure(row, anonymous_of_size(parse_size(memory)))
    return row


def qemu_kvm_one(memory: str, kernel, initrd, cmdline: str, timeout: float, stack: ExitStack) -> Row:
    """One QEMU with KVM, measured where it stops (it does not reach init here): its overhead without TCG."""
    tmp = Path(tempfile.mkdtemp(prefix="popek-density-qemu-"))
    stack.callback(shutil.rmtree, tmp, True)
    log = tmp / "serial.log"
    t0 = time.monotonic()
    p = spawn(qemu_argv(memory, kernel, initrd, cmdline, log,
                        ["-enable-kvm", "-cpu", "host,-arch-capabilities"]), stack)
    why = wait_marker(log, p, timeout)
    row = Row("qemu-kvm")
    if why is None:
        row.samples.append(Sample(p.pid, time.monotonic() - t0))
    elif p.poll() is None:
        row.samples.append(Sample(p.pid, float("nan")))
        row.note = f"did not reach init ({why}); measured where it stopped after {timeout:g} s"
    else:
        row.note = f"did not run: {why}"
    measure(row, anonymous_of_size(parse_size(memory)))
    return row


def _med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x == x]  # drop NaN
    return statistics.median(xs) if xs else None


def report(rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    def stat(row: Row, f) -> float | None:
        return _med([f(s) for s in row.samples if s.mem is not None])

    ref = next((r for r in rows if r.vmm == "popek"), None)
    ref_uss = stat(ref, lambda s: s.mem.vmm_uss) if ref else None
    ref_start = _med([s.start_s for s in ref.samples]) if ref else None
    t = Table(title=title)
    for col in ("VMM", "VMs", "start s first / median / last", "start / Popek's", "VMM overhead USS MiB",
                "overhead / Popek's", "PSS MiB", "RSS MiB", "guest RAM resident MiB", "TCG code buffer MiB",
                "note"):
        t.add_column(col, justify="left" if col in ("VMM", "note") else "right")
    for row in rows:
        starts = [s.start_s for s in row.samples]
        uss = stat(row, lambda s: s.mem.vmm_uss)
        mst = _med(starts)

        def mib(f):
            v = stat(row, f)
            return "-" if v is None else f"{v / MiB:.1f}"

        fmt = (lambda x: "-" if x is None or x != x else f"{x:.1f}")
        t.add_row(row.vmm, str(len(row.samples)),
                  f"{fmt(starts[0])} / {fmt(mst)} / {fmt(starts[-1])}" if starts else "-",
                  f"{mst / ref_start:.3g}" if mst and ref_start else "-",
                  mib(lambda s: s.mem.vmm_uss), f"{uss / ref_uss:.2f}" if uss and ref_uss else "-",
                  mib(lambda s: s.mem.vmm_pss), mib(lambda s: s.mem.vmm_rss), mib(lambda s: s.mem.guest_rss),
                  mib(lambda s: s.tcg_buffer_rss) if row.vmm == "qemu-tcg" else "-", row.note)
    Console(width=200).print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=20, help="VMs per VMM, started one after another")
    ap.add_argument("--memory", default="128M", help="guest RAM of each VM")
    ap.add_argument("--kernel", default="microvm", help="microvm, debian or a path")
    ap.add_argument("--initrd", default=None)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds one VM may take to start")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds idle before measuring memory")
    ap.add_argument("--time-limit", type=float, default=float("inf"),
                    help="seconds per VMM after which no more VMs are started (those running are measured)")
    ap.add_argument("--skip", action="append", default=[], help="skip a VMM: popek, qemu-tcg")
    ap.add_argument("--qemu-kvm", action="store_true", help="also measure one QEMU-KVM where it stops")
    args = ap.parse_args()
    exit_on_sigterm()
    if args.count < 1:
        ap.error("--count must be at least 1")
    kernel, initrd, _ = resolve_guest(args.kernel, args.initrd)
    flavor = detect_flavor()
    cmdline = build_cmdline(emulating=flavor.emulating_cpl0, command=GUEST_COMMAND)
    have_qemu = shutil.which("qemu-system-x86_64") is not None
    if not have_qemu:
        print("qemu-system-x86_64 not found: apt-get install qemu-system-x86 to compare", file=sys.stderr)
    rows = []
    # Each VMM's VMs are measured, then killed, before the next VMM's start: they do not compete for memory or CPU.
    if "popek" not in args.skip:
        with ExitStack() as stack:
            rows.append(popek_vms(args.count, args.memory, kernel, initrd, args.timeout, args.settle,
                                  time.monotonic() + args.time_limit, stack))
    if have_qemu and "qemu-tcg" not in args.skip:
        with ExitStack() as stack:
            rows.append(qemu_tcg_vms(args.count, args.memory, kernel, initrd, cmdline, args.timeout, args.settle,
                                     time.monotonic() + args.time_limit, stack))
    if have_qemu and args.qemu_kvm:
        with ExitStack() as stack:
            rows.append(qemu_kvm_one(args.memory, kernel, initrd, cmdline, min(args.timeout, 120.0), stack))
    report(rows, f"{args.count} idle VMs per VMM, {kernel.name}, {args.memory} each, KVM flavour {flavor.name}")


if __name__ == "__main__":
    main()
