"""End to end, the guest agent over virtio-vsock: `popek exec` into a detached VM (stdout, stderr and exit status
apart, stdin forwarded, a command that cannot start, the by-name Python function, a snapshot restored under a new
name answering on its own socket while the original still runs), and ``popek.VM.exec`` plus REFRESH in the
in-process API. Two boots of ~20-40 s each here: run with ``--run-slow``. Prints the measured exec round trip."""

from __future__ import annotations

import subprocess
import time

import pytest

from test_many_vms import POPEK, Host, host  # noqa: F401  (the `host` fixture: a short private runtime base)

import popek
from popek.agent import AgentClient, exec_in

pytestmark = pytest.mark.slow

BOOT_TIMEOUT = 900  # generous: the machines running the suite are shared and boots slow down with load


def _round_trips(client: AgentClient, n: int = 5) -> tuple[float, float]:
    """Median seconds of a PING and of an EXEC of `true`, agent already up."""
    pings, execs = [], []
    for _ in range(n):
        t = time.perf_counter()
        client.ping()
        pings.append(time.perf_counter() - t)
        t = time.perf_counter()
        assert client.exec(["true"], timeout=60) == 0
        execs.append(time.perf_counter() - t)
    return sorted(pings)[n // 2], sorted(execs)[n // 2]


def test_popek_exec_streams_output_forwards_stdin_and_exits_with_the_status_also_in_a_restored_clone(
        host: Host, tmp_path, monkeypatch):
    name, clone = host.name("exec"), host.name("clone")
    try:
        host.start(name, "--", "sleep", "3600")
        p = host.run("exec", name, "--timeout", str(BOOT_TIMEOUT), "--", "sh", "-c", "echo out; echo err >&2; exit 7",
                     timeout=BOOT_TIMEOUT + 60, check=False)
        assert (p.returncode, p.stdout, p.stderr) == (7, "out\n", "err\n")

        p = subprocess.run([*POPEK, "exec", "-i", name, "--", "sh", "-c", "tr a-z A-Z; echo done"], env=host.env,
                           input="hello stdin\n", capture_output=True, text=True, timeout=300)
        assert (p.returncode, p.stdout) == (0, "HELLO STDIN\ndone\n"), p.stderr

        p = host.run("exec", name, "--", "/no/such/command", check=False)
        assert p.returncode == 127 and "cannot execute /no/such/command" in p.stderr

        monkeypatch.setenv("XDG_RUNTIME_DIR", str(host.base))
        r = exec_in(name, ["sh", "-c", "echo $POPEK_E2E; cat /proc/sys/kernel/hostname"], env={"POPEK_E2E": "by-name"})
        assert (r.stdout, r.exit_status) == (b"by-name\npopek\n", 0)
        ping, run_true = _round_trips(AgentClient(host.vm_dir(name) / "vsock.sock"))
        print(f"\nexec round trip (detached VM, agent up, median of 5): PING {ping * 1000:.0f} ms, "
              f"EXEC true {run_true * 1000:.0f} ms")

        snap = tmp_path / "snap"
        host.run("snapshot", "create", name, str(snap), timeout=600)
        assert host.run("snapshot", "restore", str(snap), "--name", clone, timeout=600).stdout.strip() == clone
        for vm in (clone, name):  # both answer, each on its own socket
            p = host.run("exec", vm, "--timeout", "120", "--", "echo", f"hello-{vm}", timeout=300, check=False)
            assert (p.returncode, p.stdout) == (0, f"hello-{vm}\n"), p.stderr
        assert (host.vm_dir(clone) / "vsock.sock").exists()

        host.run("stop", name)
        assert not (host.vm_dir(name) / "vsock.sock").exists(), "the stopped VM's vsock socket is still there"
        p = host.run("exec", name, "--", "true", check=False)
        assert p.returncode == 1 and "is not running" in p.stderr
    finally:
        host.force_clean()
    assert host.leftovers() == []


def test_python_api_vm_exec_and_refresh_set_clock_and_hostname():
    vm = popek.VM(["sleep", "3600"]).start()
    uds = vm.config.vsock.uds_path
    try:
        r = vm.exec(["sh", "-c", "echo $((6 * 7)); cat; echo oops >&2; exit 3"], stdin=b"from-stdin",
                    ready_timeout=BOOT_TIMEOUT, timeout=120)
        assert (r.stdout, r.stderr, r.exit_status) == (b"42\nfrom-stdin", b"oops\n", 3)
        AgentClient(uds).refresh(clock=1_700_000_000 * 10**9, hostname="popek-refreshed")
        r = vm.exec(["sh", "-c", "date +%s; cat /proc/sys/kernel/hostname"], timeout=120)
        seconds, hostname = r.stdout.split()
        assert 1_700_000_000 <= int(seconds) < 1_700_000_600 and hostname == b"popek-refreshed"
        ping, run_true = _round_trips(AgentClient(uds))
        print(f"\nexec round trip (popek.VM, agent up, median of 5): PING {ping * 1000:.0f} ms, "
              f"EXEC true {run_true * 1000:.0f} ms")
    finally:
        vm.stop()
    assert not uds.exists() and not uds.parent.exists(), "the private vsock directory outlived the VM"
