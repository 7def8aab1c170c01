"""End to end, several VMs on one host, each in its own detached VMM process (`popek start`): ps, pause/resume, a
neighbour's VMM killed with SIGKILL, stop, logs, rm, and a killed VMM plus a guest kernel panic that leave a
busy-looping neighbour answering exec and console. Boots real
guests (~20-40 s each here, two at a time on this 2-core machine): run with ``--run-slow``."""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from popek.runtime import process_alive

pytestmark = pytest.mark.slow

POPEK = [sys.executable, "-c", "from popek.cli import main; main()"]
BOOT_TIMEOUT = 400
CGROUP_ROOT = Path("/sys/fs/cgroup")


class Host:
    """Runs `popek` commands with a private runtime base (XDG_RUNTIME_DIR), for VMs named by this test."""

    def __init__(self, base: Path):
        self.base = base
        self.env = dict(os.environ, XDG_RUNTIME_DIR=str(base))
        self.names: list[str] = []

    def name(self, role: str) -> str:
        name = f"popek-e2e-{secrets.token_hex(3)}-{role}"  # unique, and found by `find -iname '*popek*'`
        self.names.append(name)
        return name

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run([*POPEK, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            pytest.fail(f"popek {' '.join(args)} exited {p.returncode}: {p.stderr}")
        return p

    def start(self, name: str, *args: str) -> None:
        assert self.run("start", "--name", name, *args).stdout.strip() == name

    def ps(self) -> dict[str, dict]:
        return {r["name"]: r for r in json.loads(self.run("ps", "--json").stdout)}

    def vm_dir(self, name: str) -> Path:
        return self.base / "popek" / name

    def vmm(self, name: str) -> tuple[int, int] | None:
        """(pid, pid start time) from the VM's vm.json, or None."""
        try:
            d = json.loads((self.vm_dir(name) / "vm.json").read_text())
        except (OSError, ValueError):
            return None
        return d["pid"], d["pid_start_time"]

    def wait_log(self, name: str, text: str, timeout: float = BOOT_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run("logs", name, check=False).stdout
            if text in out:
                return out
            time.sleep(2)
        pytest.fail(f"{text!r} not in the console log of {name}: {out[-2000:]!r}")

    def wait_state(self, name: str, prefix: str, timeout: float = BOOT_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = self.ps().get(name)
            if row and row["state"].startswith(prefix):
                return row
            time.sleep(2)
        pytest.fail(f"{name} never reached state {prefix!r}: {self.ps().get(name)}")

    def leftovers(self) -> list[str]:
        """Every trace of this test's VMs: VMM processes, cgroups, runtime directories (sockets included)."""
        found = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if (b"popek.vmm" in cmd or b"popek.jail" in cmd) and any(n.encode() in cmd for n in self.names):
                    found.append(f"process {pid}: {b' '.join(cmd).decode(errors='replace')}")
        cgroups = subprocess.run(["find", str(CGROUP_ROOT), "-maxdepth", "3", "-iname", "*popek*"],
                                 capture_output=True, text=True).stdout.split()
        found += [f"cgroup {c}" for c in cgroups if any(c.endswith("/" + n) for n in self.names)]
        found += [f"runtime dir {self.vm_dir(n)}" for n in self.names if self.vm_dir(n).exists()]
        return found

    def force_clean(self) -> None:
        """Kill and remove whatever this test's VMs left (a failed test): by pid + start time, then `popek kill`."""
        for name in self.names:
            owner = self.vmm(name)
            if owner and process_alive(*owner):
                os.kill(owner[0], signal.SIGKILL)
            if self.vm_dir(name).exists():
                self.run("kill", name, check=False)
        for line in self.leftovers():
            if line.startswith("process "):
                os.kill(int(line.split()[1].rstrip(":")), signal.SIGKILL)
            elif line.startswith("cgroup "):
                path = Path(line.split(" ", 1)[1])
                try:
                    for pid in (path / "cgroup.procs").read_text().split():
                        os.kill(int(pid), signal.SIGKILL)
                    time.sleep(0.5)
                    path.rmdir()
                except OSError:
                    pass


@pytest.fixture
def host():
    base = Path(tempfile.mkdtemp(prefix="pk-", dir="/tmp"))  # short: socket paths must fit sun_path's 107 bytes
    h = Host(base)
    yield h
    h.force_clean()
    shutil.rmtree(base, ignore_errors=True)


def wait_dead(pid: int, start: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while process_alive(pid, start):
        if time.monotonic() > deadline:
            pytest.fail(f"process {pid} still alive after {timeout} s")
        time.sleep(0.1)


def test_two_vms_run_side_by_side_pause_resume_survive_a_killed_neighbour_and_stop_cleanly(host):
    a, b = host.name("a"), host.name("b")
    host.start(a, "--", "sh", "-c", f"echo marker-{a}; sleep 600")
    host.start(b, "--", "sh", "-c", f"echo marker-{b}; sleep 600")
    rows = host.ps()
    assert rows[a]["state"] == rows[b]["state"] == "running"
    assert rows[a]["pid"] != rows[b]["pid"] and rows[a]["vcpus"] == 1 and rows[a]["memory"] == 256 << 20
    host.wait_log(a, f"marker-{a}")
    host.wait_log(b, f"marker-{b}")
    rows = host.ps()
    assert 0 < rows[b]["uss"] <= rows[b]["rss"] and rows[b]["cpu_s"] > 0 and rows[b]["uptime_s"] > 0

    host.run("pause", a)
    paused = host.ps()
    assert paused[a]["state"] == "paused" and paused[b]["state"] == "running"
    time.sleep(3)
    assert host.ps()[a]["cpu_s"] - paused[a]["cpu_s"] < 0.5  # parked vCPUs burn no CPU
    host.run("resume", a)
    assert host.ps()[a]["state"] == "running"

    pid_a, start_a = host.vmm(a)
    os.kill(pid_a, signal.SIGKILL)
    wait_dead(pid_a, start_a)
    p = host.run("ps", "--json")
    assert f"removed stale VM {a!r}" in p.stderr
    rows = {r["name"]: r for r in json.loads(p.stdout)}
    assert a not in rows and rows[b]["state"] == "running"
    assert not host.vm_dir(a).exists() and not [x for x in host.leftovers() if a in x]
    assert f"marker-{b}" in host.run("logs", b).stdout

    pid_b, start_b = host.vmm(b)
    t = time.monotonic()
    host.run("stop", b, "--timeout", "30")
    assert time.monotonic() - t < 30
    wait_dead(pid_b, start_b, timeout=5)
    assert host.ps()[b]["state"] == "stopped"
    assert f"marker-{b}" in host.run("logs", b).stdout  # the log outlives the VM until `popek rm`
    assert not (host.vm_dir(b) / "api.sock").exists() and not (host.vm_dir(b) / "console.sock").exists()
    host.run("rm", b)
    assert host.ps() == {} and host.leftovers() == []


def test_a_killed_vmm_and_a_panicked_guest_leave_a_busy_neighbour_answering_exec_and_console(host):
    """The issue's containment case: one guest spins in a busy loop; a second VM's VMM is killed with SIGKILL and a
    third guest's kernel panics; the busy guest still answers `popek exec` and writes to its console."""
    busy, killed, doomed = host.name("busy"), host.name("killed"), host.name("panic")
    host.start(busy, "--", "sh", "-c", f"echo marker-{busy}; while :; do :; done")
    host.start(killed, "--", "sh", "-c", f"echo marker-{killed}; sleep 600")
    host.wait_log(busy, f"marker-{busy}")
    host.wait_log(killed, f"marker-{killed}")
    pid, start = host.vmm(killed)
    os.kill(pid, signal.SIGKILL)
    host.start(doomed, "--append", "init=/nonexistent rdinit=/nonexistent")  # no init: the kernel panics
    row = host.wait_state(doomed, "stopped")
    assert row["state"] == "stopped (panic)" and row["pid"] is None
    assert "Kernel panic - not syncing" in host.run("logs", doomed).stdout
    wait_dead(pid, start)
    ps = host.ps()
    assert killed not in ps or not ps[killed]["state"].startswith("running")
    assert ps[busy]["state"] == "running"
    r = host.run("exec", "--timeout", str(BOOT_TIMEOUT), busy, "--", "sh", "-c",
                 f"echo console-{busy} > /dev/console; echo alive", timeout=BOOT_TIMEOUT + 60)
    assert r.stdout == "alive\n"
    host.wait_log(busy, f"console-{busy}")
    host.run("pause", busy)  # its API still answers
    host.run("resume", busy)
    host.run("stop", busy)
    host.run("rm", busy, doomed, check=False)
    host.run("rm", killed, check=False)  # already cleaned as stale by ps, or removed here
    assert host.leftovers() == []
