"""Detached Popek VMs for benchmarks and end-to-end tests: start (optionally pinned to CPUs), console, CPU use, removal.

Used by ``benchmarks/fairness.py``, ``benchmarks/density.py`` and ``tests/e2e/test_fairness.py``. A :class:`Fleet`
runs ``popek`` commands with a private runtime base (``XDG_RUNTIME_DIR``), so its VMs never mix with other users';
``close()`` kills and removes every VM it started and the base directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

#: The `popek` command as its console script runs it (``-m popek.cli`` would import popek.cli twice).
POPEK = [sys.executable, "-c", "from popek.cli import main; main()"]


def exit_on_sigterm() -> None:
    """Make SIGTERM (``timeout``, ``kill``) exit through Python's unwinding, so ``with``/ExitStack clean-ups run."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


class FleetError(RuntimeError):
    """A `popek` command failed or a VM did not get where it was asked to within its timeout."""


@dataclass(frozen=True)
class ProcessCpu:
    """CPU time of a process with all its threads (/proc/PID/stat fields 14, 15, 43; proc(5)), in seconds:
    ``user`` (utime, guest time included), ``system`` (stime) and ``guest`` (guest_time: time the vCPU threads
    spent running guest code natively; on an emulating KVM the emulated guest kernel counts as ``system``)."""

    user: float
    system: float
    guest: float

    @classmethod
    def of(cls, pid: int) -> ProcessCpu:
        """:raises OSError: if the process is gone."""
        raw = Path(f"/proc/{pid}/stat").read_bytes()
        f = raw[raw.rindex(b")") + 2:].split()
        tick = os.sysconf("SC_CLK_TCK")
        return cls(int(f[14 - 3]) / tick, int(f[15 - 3]) / tick, int(f[43 - 3]) / tick)

    def __sub__(self, other: ProcessCpu) -> ProcessCpu:
        return ProcessCpu(self.user - other.user, self.system - other.system, self.guest - other.guest)

    @property
    def guest_fraction(self) -> float:
        """guest / (user + system): the share of this process's CPU time spent in native guest code."""
        total = self.user + self.system
        return self.guest / total if total > 0 else 0.0


def thread_affinities(pid: int) -> dict[int, set[int]]:
    """``{tid: CPUs the thread may run on}`` for every thread of ``pid`` (sched_getaffinity(2))."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = os.sched_getaffinity(int(tid))
        except ProcessLookupError:
            pass
    return out


class Fleet:
    """Starts and stops detached VMs with `popek start` under a private runtime base.

    :param cpus: pin every VMM to these CPUs: `popek start` runs with that affinity (sched_setaffinity(2)), which
        its VMM child and all the VMM's threads inherit from their first instruction on. None: no pinning.
    :param prefix: VM names are ``<prefix>-<n>``; they appear in cgroup paths (``find -iname '*popek*'``).
    """

    def __init__(self, cpus: set[int] | None = None, prefix: str = "popek-fleet"):
        # short base: socket paths must fit sun_path's 107 bytes
        self.base = Path(tempfile.mkdtemp(prefix="pkf-", dir="/tmp"))
        self.env = dict(os.environ, XDG_RUNTIME_DIR=str(self.base))
        self.cpus = cpus
        self.prefix = f"{prefix}-{os.getpid()}"
        self.names: list[str] = []

    def popek(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``popek ARGS`` with this fleet's runtime base (and CPU affinity). :raises FleetError: if ``check``
        and it exits non-zero."""
        pin = (lambda: os.sched_setaffinity(0, self.cpus)) if self.cpus else None
        p = subprocess.run([*POPEK, *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL, preexec_fn=pin)
        if check and p.returncode != 0:
            raise FleetError(f"popek {' '.join(args[:3])} ... exited {p.returncode}: {p.stderr.strip()}")
        return p

    def start(self, command: str, *options: str, role: str = "") -> str:
        """`popek start --name NAME OPTIONS -- sh -c COMMAND`; returns NAME. The VM is closed by :meth:`close`."""
        name = f"{self.prefix}-{len(self.names)}{'-' + role if role else ''}"
        self.names.append(name)
        self.popek("start", "--name", name, *options, "--", "sh", "-c", command)
        return name

    def path(self, name: str) -> Path:
        """VM ``name``'s runtime directory."""
        return self.base / "popek" / name

    def console_log(self, name: str) -> str:
        try:
            return (self.path(name) / "console.log").read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_console(self, name: str, text: str | re.Pattern, timeout: float, *, count: int = 1) -> str:
        """Wait until ``text`` (a string or a compiled regular expression) appears ``count`` times in VM ``name``'s
        console log; returns the log. :raises FleetError: on timeout (with the log's tail)."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.console_log(name)
            if (log.count(text) if isinstance(text, str) else len(text.findall(log))) >= count:
                return log
            if time.monotonic() > deadline:
                raise FleetError(f"{text!r} not on {name}'s console within {timeout:g} s: ...{log[-1500:]!r}")
            time.sleep(0.2)

    def send(self, name: str, data: bytes) -> None:
        """Write ``data`` to VM ``name``'s serial console (its console.sock)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(self.path(name) / "console.sock"))
            s.sendall(data)

    def vmm_pid(self, name: str) -> int:
        """The pid of VM ``name``'s VMM process (from vm.json)."""
        return json.loads((self.path(name) / "vm.json").read_text())["pid"]

    def cgroup(self, name: str):
        """VM ``name``'s ``popek.cgroups.VmCgroup``."""
        from popek.cgroups import VmCgroup, detect

        return VmCgroup(name, detect())

    def close(self) -> None:
        """`popek kill` (which also removes) every VM of this fleet that still has a runtime directory, then the
        base directory."""
        for name in self.names:
            if self.path(name).exists():
                self.popek("kill", name, check=False, timeout=60)
            if self.path(name).exists():
                self.popek("rm", name, check=False, timeout=60)
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
