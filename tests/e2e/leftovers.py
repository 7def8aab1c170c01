"""What an end-to-end test left behind: Popek VMM processes, runtime dirs, sockets, cgroups, taps, network namespaces.

Only what this test run made counts (other runs may share the host): the session marks its environment with
``POPEK_TEST_RUN=<token>``, which every `popek` process a test starts (and every VMM those start) inherits, and
gives `popek` a private runtime base (``XDG_RUNTIME_DIR``) unless one is set. Before and after each test the
fixture takes a snapshot: processes carrying the token (read from /proc/PID/environ), entries and sockets under the
private base, VM cgroups (popek.cgroups parents), tap devices (/sys/class/net/*/tun_flags) and named network
namespaces. A new cgroup counts as this run's if a process with the token is in it or its VM name has a runtime
directory in the private base; new taps and namespaces count when they outlive the test. Leftover processes are
SIGKILLed and their cgroups removed before the test is failed, so one leak does not cascade.
"""

from __future__ import annotations

import os
import secrets
import signal
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from popek.cgroups import CgroupError, VmCgroup, detect
from popek.runtime import pid_start_time

#: Where `ip netns add` puts named network namespaces (ip-netns(8)).
NETNS_RUN_DIR = "/var/run/netns"
TOKEN_VAR = "POPEK_TEST_RUN"
TOKEN = os.environ.setdefault(TOKEN_VAR, secrets.token_hex(8))
_TOKEN_BYTES = f"{TOKEN_VAR}={TOKEN}".encode()
OWN_BASE = not os.environ.get("XDG_RUNTIME_DIR", "").startswith("/tmp/pkt-")  # else an outer session's
if OWN_BASE:
    os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="pkt-", dir="/tmp")  # short: sun_path is 108 bytes
BASE = Path(os.environ["XDG_RUNTIME_DIR"])


def _marked_processes() -> dict[tuple[int, int], str]:
    """{(pid, start time): command line} of live processes whose environment carries this run's token."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if _TOKEN_BYTES not in Path(entry.path, "environ").read_bytes().split(b"\0"):
                continue
            st = Path(entry.path, "stat").read_bytes()
            if st[st.rindex(b")") + 2:][:1] in (b"Z", b"X"):
                continue  # an exited child its parent has not reaped yet
            cmd = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        start = pid_start_time(int(entry.name))
        if start is not None:
            out[(int(entry.name), start)] = cmd
    return out


def _under_base() -> set[str]:
    """Runtime directories (``popek/NAME``) and sockets anywhere under the private base."""
    out = set()
    vms = BASE / "popek"
    if vms.is_dir():
        out |= {f"runtime dir {p}" for p in vms.iterdir()}
    for root, _dirs, files in os.walk(BASE):
        for f in files:
            p = os.path.join(root, f)
            try:
                if stat.S_ISSOCK(os.lstat(p).st_mode):
                    out.add(f"socket {p}")
            except OSError:
                pass
    return out


def _cgroups() -> set[Path]:
    try:
        parents = detect().parents()
    except CgroupError:
        return set()
    out = set()
    for parent in parents:
        try:
            out |= {p for p in parent.iterdir() if p.is_dir()}
        except OSError:
            pass
    return out


def _taps() -> set[str]:
    return {p.name for p in Path("/sys/class/net").iterdir() if (p / "tun_flags").exists()}


def _netns() -> set[str]:
    try:
        return set(os.listdir(NETNS_RUN_DIR))
    except OSError:
        return set()


@dataclass
class Snapshot:
    processes: dict[tuple[int, int], str]
    base: set[str]
    cgroups: set[Path]
    taps: set[str]
    netns: set[str]

    @classmethod
    def take(cls) -> Snapshot:
        return cls(_marked_processes(), _under_base(), _cgroups(), _taps(), _netns())


def _cgroup_pids(path: Path) -> set[int]:
    try:
        return {int(x) for x in (path / "cgroup.procs").read_text().split()}
    except OSError:
        return set()


def leftovers(before: Snapshot, after: Snapshot) -> tuple[list[str], list[tuple[int, int]], list[Path]]:
    """What ``after`` has that ``before`` had not and this run made: (descriptions, leaked processes as (pid,
    start time), leaked cgroup directories)."""
    procs = [k for k in after.processes if k not in before.processes]
    ours = {pid for pid, _ in after.processes}
    names = {Path(x.split(" ", 2)[2]).name for x in after.base if x.startswith("runtime dir ")}
    cgroups = sorted(p for p in after.cgroups - before.cgroups if _cgroup_pids(p) & ours or p.name in names)
    found = [f"process {pid}: {after.processes[(pid, start)]}" for pid, start in procs]
    found += sorted(after.base - before.base)
    found += [f"cgroup {p}" for p in cgroups]
    found += [f"tap {t}" for t in sorted(after.taps - before.taps)]
    found += [f"network namespace {n}" for n in sorted(after.netns - before.netns)]
    return found, procs, cgroups


def kill(procs: list[tuple[int, int]]) -> None:
    for pid, start in procs:
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            if pid_start_time(pid) == start:  # the pidfd holds this very process, not a recycled pid
                signal.pidfd_send_signal(fd, signal.SIGKILL)
        except OSError:
            pass
        finally:
            os.close(fd)


def remove_cgroups(paths: list[Path]) -> None:
    """Remove leaked VM cgroups, SIGKILLing what is still in them (popek.cgroups.VmCgroup.remove)."""
    layout = None
    for path in paths:
        try:
            layout = layout or detect()
            VmCgroup(path.name, layout).remove(force=True)
        except (CgroupError, ValueError):
            pass
