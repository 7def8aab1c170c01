#!/usr/bin/env python3
"""I/O benchmark: a guest's sequential virtio-blk read and guest->host TCP stream over virtio-net on a tap, in MB/s
and host CPU time per MB, Popek vs QEMU (KVM and TCG, virtio-blk-pci and virtio-net-pci), same guest.

Run by hand, as root (taps): ``.venv/bin/python benchmarks/io.py [--disk-mib 256] [--net-mib 64] [--timeout 900]``.
Every VMM boots the same kernel (Popek's microvm vmlinux; QEMU boots it through its PVH note on the ``pc`` machine,
whose PCI bus the guest finds without ACPI), initrd and command line, with a ``--disk-mib`` raw image of random
bytes and one network interface (tap host side 198.18.30.1/30, RFC 2544's benchmarking range; the guest's init
configures 198.18.30.2 from ``popek.net=``). The guest runs ``dd if=/dev/vda of=/dev/null bs=1M iflag=direct``
(O_DIRECT: the device writes straight into dd's buffer, so this measures the virtio-blk path), then the same read
through the guest's page cache (which, on an emulating KVM, mostly measures the guest kernel copying pages), then
``dd if=/dev/zero bs=1M count=N | nc HOST PORT`` to a TCP server here that counts the bytes. Times are taken on the
host: the disk read from its console markers, the stream from the server's first to last byte; host CPU is the
VMM process's utime + stime (/proc/PID/stat, all threads) between the phase's markers. MB = 10^6 bytes. QEMU gets
the tap as an open fd (a non-persistent tap made by ``popek.net.tap.Tap``, like Popek's).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from boot import QEMU_ACCELS, Run, qemu_argv, timed  # noqa: E402
from popek.guestcmd import build_cmdline  # noqa: E402
from popek.kvm.system import detect_flavor  # noqa: E402
from popek.net.iface import NetConfig, guest_args  # noqa: E402
from popek.net.tap import Tap  # noqa: E402
from popek.runner import resolve_guest  # noqa: E402

HOST = ipaddress.IPv4Interface("198.18.30.1/30")
GUEST = ipaddress.IPv4Interface("198.18.30.2/30")
MAC = "02:00:00:00:1e:02"
MiB = 1 << 20
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
MARKS = ("@@direct-begin", "@@direct-end", "@@disk-begin", "@@disk-end", "@@net-begin", "@@net-end")
#: QEMU's report of a KVM_EXIT_INTERNAL_ERROR (the emulator failing an instruction); QEMU then pauses the VM forever.
STOP_ON = ("KVM internal error",)


class StreamSink:
    """A TCP server on HOST's address (bound before any tap has it) that counts each connection's bytes and closes
    it after ``expect`` bytes (so busybox nc, which waits for the peer, ends); ``result()`` is (bytes, first-to-last
    byte seconds) of the last connection."""

    def __init__(self, expect: int):
        self.expect = expect
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((str(HOST.ip), 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self._last: tuple[int, float] = (0, 0.0)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            n, first, last = 0, None, None
            with conn:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)
                while n < self.expect:
                    data = conn.recv(1 << 20)
                    if not data:
                        break
                    last = time.monotonic()
                    first = first or last
                    n += len(data)
            self._last = (n, (last - first) if first else 0.0)

    def reset(self) -> None:
        self._last = (0, 0.0)

    def result(self) -> tuple[int, float]:
        return self._last

    def close(self) -> None:
        self.sock.close()


@dataclass
class Result:
    name: str
    run: Run | None
    direct_mbps: float | None = None
    direct_cpu_ms_per_mb: float | None = None
    disk_mbps: float | None = None
    disk_cpu_ms_per_mb: float | None = None
    net_mbps: float | None = None
    net_cpu_ms_per_mb: float | None = None
    net_bytes: int = 0
    note: str = ""


def phase(run: Run, begin: str, end: str, mb: float) -> tuple[float | None, float | None]:
    """(MB/s, host CPU ms per MB) between two console marks, or (None, None) if either is missing."""
    if begin not in run.marks or end not in run.marks:
        return None, None
    (t0, c0), (t1, c1) = run.marks[begin], run.marks[end]
    cpu = (c1 - c0) * 1000 / mb if c0 is not None and c1 is not None else None
    return (mb / (t1 - t0) if t1 > t0 else None), cpu


def measure(name: str, argv: list[str], sink: StreamSink, disk_mb: float, timeout: float, pass_fds=()) -> Result:
    sink.reset()
    run = timed(argv, timeout, marks=MARKS, pass_fds=pass_fds, stop_on=STOP_ON)
    r = Result(name, run)
    r.direct_mbps, r.direct_cpu_ms_per_mb = phase(run, "@@direct-begin", "@@direct-end", disk_mb)
    r.disk_mbps, r.disk_cpu_ms_per_mb = phase(run, "@@disk-begin", "@@disk-end", disk_mb)
    n, seconds = sink.result()
    r.net_bytes = n
    if n:
        r.net_mbps = n / 1e6 / seconds if seconds else None
        r.net_cpu_ms_per_mb = phase(run, "@@net-begin", "@@net-end", n / 1e6)[1]
    if not run.ok:
        seen = ", ".join(m for m in MARKS if m in run.marks) or "no mark"
        why = f"stopped on {run.stopped_on!r}" if run.stopped_on else f"last line {run.last_line!r}"
        r.note = f"did not run (saw {seen}): {why}"
    print(f"{name}: direct {r.direct_mbps} MB/s, {r.direct_cpu_ms_per_mb} CPU ms/MB; disk {r.disk_mbps} MB/s, {r.disk_cpu_ms_per_mb} CPU ms/MB; net {n} bytes, {r.net_mbps} MB/s, "
          f"{r.net_cpu_ms_per_mb} CPU ms/MB; exit {run.exit_s} s" + (f"; {r.note}" if r.note else ""),
          file=sys.stderr)
    return r


def disk_image(path: Path, mib: int) -> Path:
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MiB))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", default="microvm", help="microvm or a vmlinux path (QEMU boots it via PVH)")
    ap.add_argument("--initrd", default=None)
    ap.add_argument("--memory", default="256M")
    ap.add_argument("--disk-mib", type=int, default=256)
    ap.add_argument("--net-mib", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per VMM run before giving up")
    ap.add_argument("--skip", action="append", default=[], help="skip a VMM: popek, qemu-kvm, qemu-tcg")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("io.py: needs root (it creates tap devices)")

    kernel, initrd, _ = resolve_guest(args.kernel, args.initrd)
    flavor = detect_flavor()
    sink = StreamSink(args.net_mib * MiB)
    script = (f"echo @@direct-begin; dd if=/dev/vda of=/dev/null bs=1M iflag=direct 2>&1 | tail -n 1; "
              f"echo @@direct-end; echo @@disk-begin; dd if=/dev/vda of=/dev/null bs=1M 2>&1 | tail -n 1; echo @@disk-end; "
              f"echo @@net-begin; dd if=/dev/zero bs=1M count={args.net_mib} 2>/dev/null | nc {HOST.ip} {sink.port}; "
              f"echo @@net-end")
    net = NetConfig(None, str(HOST), str(GUEST), MAC)
    cmdline = build_cmdline(emulating=flavor.emulating_cpl0, command=script, append=guest_args([net]))
    tmp = Path(tempfile.mkdtemp(prefix="popek-io-"))
    results: list[Result] = []
    try:
        disk = disk_image(tmp / "disk.img", args.disk_mib)
        disk_mb = args.disk_mib * MiB / 1e6
        if "popek" not in args.skip:
            popek = [sys.executable, "-m", "popek.cli", "run", "--kernel", str(kernel), "--memory", args.memory,
                     "--drive", f"path={disk}", "--net", f"host={HOST},guest={GUEST.ip},mac={MAC}"]
            if initrd:
                popek += ["--initrd", str(initrd)]
            results.append(measure("popek", popek + ["--", "sh", "-c", script], sink, disk_mb, args.timeout))
        qemu = shutil.which("qemu-system-x86_64")
        if qemu is None:
            print("qemu-system-x86_64 not found: apt-get install qemu-system-x86 to compare", file=sys.stderr)
        for name, accel in QEMU_ACCELS.items() if qemu else ():
            if name in args.skip:
                continue
            with Tap.create(None, str(HOST)) as tap:  # non-persistent: gone when QEMU and we close it
                argv = qemu_argv(qemu, "pc", args.memory, kernel, initrd, cmdline) + accel + [
                    "-drive", f"file={disk},if=none,id=d0,format=raw,cache=none", "-device", "virtio-blk-pci,drive=d0",
                    "-netdev", f"tap,id=n0,fd={tap.fd},vhost=off", "-device", f"virtio-net-pci,netdev=n0,mac={MAC}"]
                results.append(measure(name, argv, sink, disk_mb, args.timeout, pass_fds=(tap.fd,)))
    finally:
        sink.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(results, kernel, args, flavor.name)


def print_table(results: list[Result], kernel: Path, args, flavor: str) -> None:
    from rich.console import Console
    from rich.table import Table

    ref = next((r for r in results if r.name == "popek"), None)

    def num(x):
        return "-" if x is None else f"{x:.0f}" if x >= 100 else f"{x:.3g}"

    def ratio(x, y):
        return f"{x / y:.3g}" if x and y else "-"

    t = Table(title=f"guest I/O: {kernel.name}, {args.memory}, disk {args.disk_mib} MiB, stream {args.net_mib} MiB, "
                    f"KVM flavour {flavor}")
    for col in ("VMM", "O_DIRECT read MB/s", "host CPU ms/MB (direct)", "direct / Popek's", "disk read MB/s", "host CPU ms/MB (disk)", "disk / Popek's", "TCP guest->host MB/s",
                "host CPU ms/MB (net)", "net / Popek's", "note"):
        t.add_column(col)
    for r in results:
        t.add_row(r.name, num(r.direct_mbps), num(r.direct_cpu_ms_per_mb),
                  ratio(r.direct_mbps, ref and ref.direct_mbps), num(r.disk_mbps), num(r.disk_cpu_ms_per_mb), ratio(r.disk_mbps, ref and ref.disk_mbps),
                  num(r.net_mbps), num(r.net_cpu_ms_per_mb), ratio(r.net_mbps, ref and ref.net_mbps), r.note or "")
    Console(width=160).print(t)


if __name__ == "__main__":
    main()
