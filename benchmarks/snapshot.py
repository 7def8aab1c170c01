#!/usr/bin/env python3
"""Snapshot benchmark: snapshot size and time, restore-to-running latency, clones per second; Popek vs QEMU (TCG).

Run by hand as root: ``.venv/bin/python benchmarks/snapshot.py [--sizes 128M,1G] [--clones 5] [--runs 3]``.

For each guest memory size one microvm guest is booted (detached, `popek start --track-dirty-pages`, a shell on
its console, no command; all sizes at once) and left idle at its shell; then:

- Full snapshot (`popek snapshot create`, CLI wall time) and its memory file's apparent size (st_size) and
  allocated size (st_blocks: zero pages are holes); a Diff (`--diff`) after one shell command, the same.
- restore via the CLI: `popek snapshot restore`, from process start until it returns (the VM is running then;
  its own VMM process), median of --runs; and until its console shell answers.
- restore in a warm process: ``popek.persist.load`` + ``Vm.start()`` in this already-imported Python process
  (no new process, no API), median of --runs, with where the time goes (``--profile`` prints cProfile's top).
- clones: `popek snapshot clone --count N`, wall time; clones/s and clones/s per core (os.cpu_count()).
- with ``--dirty-cost``, dirty-page tracking's cost: time from `popek start` to the first shell answer of the
  smallest guest booted twice side by side, with and without ``--track-dirty-pages``.

QEMU 7.2 with TCG (``-M microvm -accel tcg``; QEMU with KVM cannot boot this guest on an emulating KVM: it stops on
the ``int3`` emulation failure, README) boots the same kernel, initrd and command line; its snapshot is a
migration to a file (QMP ``migrate`` to ``exec:cat > FILE``, while running), its restore ``-incoming "exec:cat
FILE"`` from process start until QMP ``query-status`` says running, its clones N such processes at once. A rich
table per size gives the numbers and Popek's / QEMU's ratio. Every VM and QEMU is killed at the end.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from popek.consoleline import ask  # noqa: E402
from popek.guestcmd import build_cmdline  # noqa: E402
from popek.kvm.system import detect_flavor  # noqa: E402
from popek.runner import parse_size, resolve_guest  # noqa: E402

POPEK = [sys.executable, "-c", "from popek.cli import main; main()"]
BOOT_TIMEOUT = 1800.0  # the machine is shared: boots under emulation take minutes when it is loaded


def console_answer(sock_path: Path, line: str, expect: str, timeout: float) -> float:
    """Seconds until ``expect`` comes back for ``line`` typed at a console socket (``popek.consoleline.ask``)."""
    t0 = time.monotonic()
    ask(sock_path, line, expect, timeout)
    return time.monotonic() - t0


class Popek:
    """`popek` commands with a private runtime base; ``kill_all`` removes every VM made."""

    def __init__(self, base: Path):
        self.base = base
        self.env = dict(os.environ, XDG_RUNTIME_DIR=str(base))
        self.names: list[str] = []

    def run(self, *args: str, timeout: float = 600) -> tuple[float, str]:
        t0 = time.monotonic()
        p = subprocess.run([*POPEK, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"popek {' '.join(args)} exited {p.returncode}: {p.stderr.strip()}")
        return time.monotonic() - t0, p.stdout

    def name(self, role: str) -> str:
        n = f"bench-{secrets.token_hex(2)}-{role}"
        self.names.append(n)
        return n

    def console(self, name: str) -> Path:
        return self.base / "popek" / name / "console.sock"

    def start(self, memory: str, track: bool, role: str) -> tuple[str, float]:
        """A detached VM booting a shell on its console (no command): (its name, monotonic start time)."""
        name = self.name(role)
        t0 = time.monotonic()
        self.run("start", "--name", name, "--memory", memory, *(["--track-dirty-pages"] if track else []))
        return name, t0

    def wait_shell(self, name: str, t0: float) -> float:
        """Seconds from ``t0`` until VM ``name``'s shell prompt is on its console and the shell answers (nothing is
        typed before the prompt: under emulation every input byte costs the booting kernel time)."""
        log = self.base / "popek" / name / "console.log"
        while b"# " not in (log.read_bytes() if log.exists() else b""):
            if time.monotonic() - t0 > BOOT_TIMEOUT:
                raise TimeoutError(f"{name}: no shell prompt within {BOOT_TIMEOUT:g} s")
            time.sleep(0.5)
        console_answer(self.console(name), "echo up-$((6*7))", "up-42", 120)
        return time.monotonic() - t0

    def kill(self, names) -> None:
        for n in names:
            subprocess.run([*POPEK, "kill", n], env=self.env, capture_output=True)
            subprocess.run([*POPEK, "rm", n], env=self.env, capture_output=True)

    def kill_all(self) -> None:
        self.kill(self.names)
        self.names.clear()


def sizes_of(path: Path) -> tuple[float, float]:
    st = path.stat()
    return st.st_size / 2**20, st.st_blocks * 512 / 2**20


def warm_restore(d: Path, runs: int, profile: bool) -> tuple[float, list[str]]:
    """Median seconds of ``persist.load`` + ``start`` in this process; the top of a cProfile of one (if asked)."""
    from popek import persist

    times, top = [], []
    for i in range(runs + 1):  # the first one imports and warms caches: not counted
        prof = cProfile.Profile() if profile and i == runs else None
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        vm = persist.load(d / persist.STATE_FILE, d / persist.MEMORY_FILE, vsock_uds=d.parent / f"warm{i}.sock")
        vm.start()
        dt = time.perf_counter() - t0
        if prof:
            prof.disable()
            s = pstats.Stats(prof)
            s.sort_stats("cumulative")
            rows = sorted(s.stats.items(), key=lambda kv: -kv[1][3])[:15]
            top = [f"{ct * 1000:8.2f} ms cumulative  {fn[2]} ({Path(fn[0]).name}:{fn[1]})"
                   for fn, (cc, nc, tt, ct, callers) in rows]
        vm.stop()
        if i:
            times.append(dt)
    return statistics.median(times), top


@dataclass
class Qemu:
    """QEMU TCG on the same guest: boot, migrate to a file, incoming restores."""

    kernel: Path
    initrd: Path | None
    cmdline: str
    work: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def argv(self, memory: str, tag: str, incoming: Path | None = None) -> list[str]:
        qemu = shutil.which("qemu-system-x86_64")
        a = [qemu, "-M", "microvm", "-m", memory.rstrip("iB"), "-nodefaults", "-no-user-config", "-display", "none",
             "-accel", "tcg", "-kernel", str(self.kernel), "-append", self.cmdline,
             "-serial", f"unix:{self.work / (tag + '.con')},server=on,wait=off",
             "-qmp", f"unix:{self.work / (tag + '.qmp')},server=on,wait=off"]
        if self.initrd:
            a += ["-initrd", str(self.initrd)]
        if incoming:
            a += ["-incoming", f"exec:cat {incoming}"]
        return a

    def start(self, memory: str, tag: str, incoming: Path | None = None) -> subprocess.Popen:
        p = subprocess.Popen(self.argv(memory, tag, incoming), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
        self.procs.append(p)
        return p

    def qmp(self, tag: str, timeout: float = 30):
        path = self.work / (tag + ".qmp")
        t0 = time.monotonic()
        while True:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"no QMP socket {path}") from None
                time.sleep(0.005)
        f = s.makefile("rwb")
        json.loads(f.readline())  # greeting

        def cmd(name: str, **arguments):
            f.write(json.dumps({"execute": name, "arguments": arguments}).encode() + b"\n")
            f.flush()
            while True:
                msg = json.loads(f.readline())
                if "return" in msg or "error" in msg:
                    return msg
        cmd("qmp_capabilities")
        return cmd, s

    def wait_running(self, tag: str, timeout: float = 120) -> None:
        cmd, s = self.qmp(tag, timeout)
        try:
            t0 = time.monotonic()
            while cmd("query-status")["return"]["status"] != "running":
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"QEMU {tag} not running after {timeout} s")
                time.sleep(0.005)
        finally:
            s.close()

    def migrate(self, tag: str, out: Path) -> float:
        cmd, s = self.qmp(tag)
        try:
            t0 = time.monotonic()
            r = cmd("migrate", uri=f"exec:cat > {out}")
            if "error" in r:
                raise RuntimeError(f"QEMU migrate: {r['error']}")
            while True:
                st = cmd("query-migrate")["return"].get("status")
                if st == "completed":
                    return time.monotonic() - t0
                if st in ("failed", "cancelled"):
                    raise RuntimeError(f"QEMU migration {st}")
                time.sleep(0.005)
        finally:
            s.close()

    def kill_all(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        self.procs.clear()


def median_of(runs: int, fn) -> float:
    return statistics.median(fn() for _ in range(runs))


def snapshot_phase(memory: str, name: str, popek: Popek, work: Path) -> dict:
    """Full and Diff snapshots of the booted VM ``name`` (then killed): their times and sizes."""
    r: dict[str, tuple] = {}
    d0, d1 = work / f"full-{memory}", work / f"diff-{memory}"
    t, _ = popek.run("snapshot", "create", name, str(d0))
    r["Full snapshot time s"] = (t, None)
    r["Full memory file, apparent MiB"] = (sizes_of(d0 / "memory")[0], None)
    r["Full memory file, allocated MiB"] = (sizes_of(d0 / "memory")[1], None)
    console_answer(popek.console(name), "echo d > /tmp/d; echo diff-$((6*7))", "diff-42", 120)
    t, _ = popek.run("snapshot", "create", name, str(d1), "--diff")
    r["Diff snapshot time s"] = (t, None)
    r["Diff memory file, allocated MiB"] = (sizes_of(d1 / "memory")[1], None)
    popek.kill([name])
    return r


def bench_size(memory: str, r: dict, args, popek: Popek, qemu: Qemu | None, work: Path) -> dict:
    d0 = work / f"full-{memory}"

    def cli_restore() -> float:
        n = popek.name("r")
        t, _ = popek.run("snapshot", "restore", str(d0), "--name", n)
        return t

    r["restore to running, new process s"] = (median_of(args.runs, cli_restore), None)
    n = popek.name("r")
    t0 = time.monotonic()
    popek.run("snapshot", "restore", str(d0), "--name", n)
    console_answer(popek.console(n), "echo back-$((6*7))", "back-42", 60)
    r["restore via CLI to shell answer s"] = (time.monotonic() - t0, None)
    popek.kill_all()
    warm, top = warm_restore(d0, args.runs, args.profile)
    r["restore in a warm process (load + start) ms"] = (warm * 1000, None)
    t, out = popek.run("snapshot", "clone", str(d0), "--count", str(args.clones), "--name-prefix",
                       f"bench-{secrets.token_hex(2)}")
    popek.names += out.split()
    r[f"{args.clones} clones, wall s"] = (t, None)
    r["clones/s"] = (args.clones / t, None)
    r["clones/s per core"] = (args.clones / t / os.cpu_count(), None)
    popek.kill_all()

    if qemu is not None:
        try:
            tag = f"q-{memory}"
            qemu.start(memory, tag)
            console_answer(qemu.work / (tag + ".con"), "echo up-$((6*7))", "up-42", BOOT_TIMEOUT)
            mig = work / f"qemu-{memory}.mig"
            qt = qemu.migrate(tag, mig)
            qemu.kill_all()
            _, alloc = sizes_of(mig)

            def q_restore() -> float:
                t0 = time.monotonic()
                qemu.start(memory, "in", incoming=mig)
                qemu.wait_running("in")
                dt = time.monotonic() - t0
                qemu.kill_all()
                return dt

            qr = median_of(args.runs, q_restore)
            t0 = time.monotonic()
            for i in range(args.clones):
                qemu.start(memory, f"c{i}", incoming=mig)
            for i in range(args.clones):
                qemu.wait_running(f"c{i}")
            qc = time.monotonic() - t0
            qemu.kill_all()
            for key, val in (("Full snapshot time s", qt), ("Full memory file, apparent MiB", sizes_of(mig)[0]),
                             ("Full memory file, allocated MiB", alloc), ("restore to running, new process s", qr),
                             (f"{args.clones} clones, wall s", qc), ("clones/s", args.clones / qc),
                             ("clones/s per core", args.clones / qc / os.cpu_count())):
                r[key] = (r[key][0], val)
        except (OSError, RuntimeError, TimeoutError) as e:
            print(f"QEMU {memory}: {e}", file=sys.stderr)
            qemu.kill_all()
    return {"rows": r, "top": top}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="128M,1G", help="guest memory sizes, comma-separated")
    ap.add_argument("--clones", type=int, default=5)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="print where a warm restore spends its time")
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--snapshots", default=None, metavar="DIR", help="keep the snapshots (and their create times) "
                    "in DIR and reuse them in later runs instead of booting again")
    ap.add_argument("--dirty-cost", action="store_true", help="also boot the smallest guest with and without "
                    "track_dirty_pages side by side")
    args = ap.parse_args()

    kernel, initrd, _ = resolve_guest(None, None)
    work = Path(tempfile.mkdtemp(prefix="popek-snapbench-"))
    popek = Popek(work / "run")
    popek.base.mkdir()
    qemu = None
    if not args.no_qemu and shutil.which("qemu-system-x86_64"):
        qemu = Qemu(kernel, initrd, build_cmdline(emulating=detect_flavor().emulating_cpl0, command=None),
                    work / "qemu")
        qemu.work.mkdir()
    results, dirty = {}, None
    try:
        sizes = args.sizes.split(",")
        keep = Path(args.snapshots) if args.snapshots else None
        rows = {m: json.loads((keep / f"rows-{m}.json").read_text()) for m in sizes
                if keep and (keep / f"rows-{m}.json").exists()}  # snapshots of an earlier run: no boot
        booting = {m: popek.start(m, True, f"boot{m}") for m in sizes if m not in rows}  # at once: boots are slow
        for m, (name, t0) in booting.items():
            print(f"{m}: booted to the shell in {popek.wait_shell(name, t0):.1f} s", file=sys.stderr)
        for m, (name, _) in booting.items():
            rows[m] = snapshot_phase(m, name, popek, keep or work)
            if keep:
                (keep / f"rows-{m}.json").write_text(json.dumps(rows[m]))
        rows = {m: {k: tuple(v) for k, v in r.items()} for m, r in rows.items()}
        for m in sizes:
            results[m] = bench_size(m, rows[m], args, popek, qemu, keep or work)
            print(f"{m}: {results[m]['rows']}", file=sys.stderr)
        if args.dirty_cost:  # the same guest twice at the same time, once with dirty-page tracking
            smallest = min(sizes, key=parse_size)
            pair = {track: popek.start(smallest, track, f"dirty{int(track)}") for track in (False, True)}
            dirty = {track: popek.wait_shell(name, t0) for track, (name, t0) in pair.items()}
            popek.kill_all()
    finally:
        popek.kill_all()
        if qemu is not None:
            qemu.kill_all()
        shutil.rmtree(work, ignore_errors=True)

    from rich.console import Console
    from rich.table import Table

    con = Console(width=120)
    for memory, res in results.items():
        t = Table(title=f"snapshots: microvm guest, {memory}, idle at its shell; KVM flavour {detect_flavor().name}")
        for col in ("measure", "Popek", "QEMU 7.2 TCG", "Popek / QEMU"):
            t.add_column(col)
        for key, (p, q) in res["rows"].items():
            ratio = f"{p / q:.2f}" if p is not None and q else "-"
            t.add_row(key, f"{p:.3f}" if p is not None else "-", f"{q:.3f}" if q is not None else "-", ratio)
        con.print(t)
        if res["top"]:
            con.print(f"warm restore of {memory}, cProfile cumulative:\n" + "\n".join(res["top"]))
    if dirty:
        con.print(f"boot to the shell's first answer: {dirty[False]:.1f} s untracked, {dirty[True]:.1f} s with "
                  f"track_dirty_pages ({dirty[True] / dirty[False]:.2f}x)")


if __name__ == "__main__":
    main()
