#!/usr/bin/env python3
"""Boot benchmark: time from process start to guest init and to exit, Popek vs QEMU (KVM and TCG), same guest.

Run by hand: ``.venv/bin/python benchmarks/boot.py [--kernel microvm|debian] [--runs 3] [--timeout 600]``.
Each VMM boots the same kernel, initrd, memory and command line and runs ``echo <marker>``; "init" is the moment the
marker appears on the serial console (so every VMM is timed the same way), "exit" the VMM process's end. Prints a
table of medians, the ratio to Popek, and each VMM's peak RSS (ru_maxrss of the child). A VMM that does not reach
the marker within --timeout is reported with the last console line it printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from popek.guestcmd import build_cmdline  # noqa: E402
from popek.kvm.system import detect_flavor  # noqa: E402
from popek.runner import resolve_guest  # noqa: E402

MARKER = "popek-bench-marker"


@dataclass
class Run:
    """One VMM run: ``init_s`` when MARKER appeared, ``exit_s`` its end (None: killed at the timeout), peak RSS,
    the last console line, ``ok`` (every mark seen, no timeout); ``marks`` maps each mark seen to (seconds since
    start, the VMM process's CPU seconds then), ``output`` is all it printed, ``stopped_on`` the output line that
    made ``timed`` kill it (one of its ``stop_on`` texts), else None."""

    init_s: float | None
    exit_s: float | None
    rss_mib: float
    last_line: str
    ok: bool
    marks: dict[str, tuple[float, float | None]] = field(default_factory=dict)
    output: bytes = b""
    stopped_on: str | None = None


@dataclass
class Row:
    name: str
    runs: list[Run] = field(default_factory=list)


def timed(argv: list[str], timeout: float, marks: tuple[str, ...] = (MARKER,), pass_fds=(),
          stop_on: tuple[str, ...] = ()) -> Run:
    """Start ``argv`` (with ``pass_fds`` open in it), watch its stdout for each of ``marks`` (noting the time and
    the process's CPU seconds when it first appears), wait for it to end (or kill it at ``timeout``, or as soon as
    it prints one of ``stop_on``: e.g. QEMU's "KVM internal error", after which it pauses the VM for good)."""
    import popek.cli  # noqa: F401  (loads the CLI modules in their order; cli_vms alone is a circular import)
    from popek.cli_vms import process_cpu_seconds

    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            pass_fds=pass_fds)
    seen: dict[str, tuple[float, float | None]] = {}
    lines: list[str] = [""]
    out = bytearray()
    stopped: list[str] = []

    def reader() -> None:
        buf = out
        longest = max(map(len, marks), default=0)
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):
            buf += chunk
            # The command line carries the command base64-encoded, so the marker text appears only when it runs.
            for m in marks:
                if m not in seen and buf.find(m.encode(), max(0, len(buf) - len(chunk) - longest)) >= 0:
                    seen[m] = (time.monotonic() - t0, process_cpu_seconds(proc.pid))
            for text in stop_on:
                at = buf.find(text.encode(), max(0, len(buf) - len(chunk) - len(text)))
                if at >= 0 and not stopped:
                    start = buf.rfind(b"\n", 0, at) + 1
                    stopped.append(buf[start:buf.find(b"\n", at) if b"\n" in buf[at:] else None].decode(
                        errors="replace").strip())
                    proc.kill()
            text = buf[-400:].decode(errors="replace").replace("\r", "")
            tail = [ln for ln in text.split("\n") if ln.strip()]
            if tail:
                lines[0] = tail[-1][-120:]

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    timed_out = False
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() - t0 > timeout:
            proc.kill()
            timed_out = True
            pid, status, ru = os.wait4(proc.pid, 0)
            break
        time.sleep(0.005)
    exit_s = None if timed_out else time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    th.join(2)
    init = seen.get(MARKER)
    return Run(init and init[0], exit_s, ru.ru_maxrss / 1024, lines[0],
               len(seen) == len(marks) and not timed_out and not stopped, seen, bytes(out),
               stopped[0] if stopped else None)


def qemu_argv(qemu: str, machine: str, memory: str, kernel: Path, initrd: Path | None, cmdline: str) -> list[str]:
    """QEMU booting ``kernel`` (a vmlinux ELF boots through its PVH note) with ``initrd`` and ``cmdline`` on
    ``machine``, no default devices, the serial console on stdout, exiting when the guest resets."""
    argv = [qemu, "-M", machine, "-m", memory.rstrip("iB"), "-nodefaults", "-no-user-config", "-nographic",
            "-serial", "stdio", "-no-reboot", "-kernel", str(kernel), "-append", cmdline]
    return argv + (["-initrd", str(initrd)] if initrd else [])


#: QEMU with KVM on this KVM needs the arch-capabilities MSR hidden (environment notes); TCG is pure emulation.
QEMU_ACCELS = {"qemu-kvm": ["-enable-kvm", "-cpu", "host,-arch-capabilities"], "qemu-tcg": ["-accel", "tcg"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", default="microvm", help="microvm, debian or a path")
    ap.add_argument("--initrd", default=None)
    ap.add_argument("--memory", default="256M")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per boot before giving up")
    ap.add_argument("--skip", action="append", default=[], help="skip a VMM: popek, qemu-kvm, qemu-tcg")
    args = ap.parse_args()

    kernel, initrd, _ = resolve_guest(args.kernel, args.initrd)
    flavor = detect_flavor()
    cmd = f"echo {MARKER}"
    cmdline = build_cmdline(emulating=flavor.emulating_cpl0, command=cmd)
    popek = [sys.executable, "-m", "popek.cli", "run", "--kernel", str(kernel), "--memory", args.memory]
    if initrd:
        popek += ["--initrd", str(initrd)]
    vmms: dict[str, list[str]] = {"popek": popek + ["--", "sh", "-c", cmd]}
    qemu = shutil.which("qemu-system-x86_64")
    if qemu:
        base = qemu_argv(qemu, "microvm", args.memory, kernel, initrd, cmdline)
        vmms.update({name: base + accel for name, accel in QEMU_ACCELS.items()})
    else:
        print("qemu-system-x86_64 not found: apt-get install qemu-system-x86 to compare", file=sys.stderr)

    rows = []
    for name, argv in vmms.items():
        if name in args.skip:
            continue
        row = Row(name)
        for i in range(args.runs):
            r = timed(argv, args.timeout)
            print(f"{name} run {i + 1}: init {r.init_s} s, exit {r.exit_s} s, rss {r.rss_mib:.1f} MiB"
                  + ("" if r.ok else f", stopped at: {r.last_line!r}"), file=sys.stderr)
            row.runs.append(r)
            if not r.ok:
                break  # a VMM that cannot boot this guest here does not get better on a second try
        rows.append(row)

    from rich.console import Console
    from rich.table import Table

    def med(xs):
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else None

    ref = next((med([r.init_s for r in row.runs]) for row in rows if row.name == "popek"), None)
    t = Table(title=f"boot to init: {kernel.name}, {args.memory}, KVM flavour {flavor.name}")
    for col in ("VMM", "runs", "init s (median)", "exit s (median)", "init time / Popek's", "peak RSS MiB", "note"):
        t.add_column(col)
    stuck = []
    for row in rows:
        mi, me = med([r.init_s for r in row.runs]), med([r.exit_s for r in row.runs])
        ratio = f"{mi / ref:.2f}" if mi and ref else "-"
        note = "" if all(r.ok for r in row.runs) else "did not reach init"
        if note:
            stuck.append(f"{row.name} stopped at: {row.runs[-1].last_line}")
        t.add_row(row.name, str(len(row.runs)), f"{mi:.2f}" if mi else "-", f"{me:.2f}" if me else "-", ratio,
                  f"{max(r.rss_mib for r in row.runs):.1f}", note)
    Console(width=120).print(t)
    for line in stuck:
        print(line)


if __name__ == "__main__":
    main()
