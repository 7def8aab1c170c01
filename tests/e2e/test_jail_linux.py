"""End to end, Linux (the microvm guest) in a jailed VMM (`popek start --jail`): it boots, its console works both
ways through the socket in its runtime directory, `popek exec` reaches its guest agent over the vsock socket
there, `popek logs` has its output, and `popek stop`/`rm` leave nothing. One boot; run with ``--run-slow``."""

import socket
import time

import pytest

from popek import jail
from test_many_vms import BOOT_TIMEOUT, host  # noqa: F401  (the fixture)

pytestmark = pytest.mark.slow


def _console_reply(path, line: bytes, want: bytes, timeout: float = 120) -> bytes:
    got = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        s.settimeout(2)
        s.sendall(line)
        deadline = time.monotonic() + timeout
        while want not in got and time.monotonic() < deadline:
            try:
                got += s.recv(4096)
            except TimeoutError:
                pass
    return got


def test_linux_runs_in_a_jail_with_console_exec_logs_and_a_clean_stop(host):  # noqa: F811
    name = host.name("jail")
    host.start(name, "--jail", "--", "sh", "-c", "echo jail-ready; while read l; do echo got-$l; done")
    host.wait_log(name, "jail-ready", BOOT_TIMEOUT)
    pid, _ = host.vmm(name)
    assert jail.namespace_ids(pid)["pid"] != jail.namespace_ids()["pid"]

    got = _console_reply(host.vm_dir(name) / "console.sock", b"ping\n", b"got-ping")
    assert b"got-ping" in got, got

    p = host.run("exec", name, "--", "sh", "-c", "echo out-$((6*7)); echo err >&2; exit 7", check=False,
                 timeout=BOOT_TIMEOUT)
    assert (p.returncode, p.stdout, p.stderr) == (7, "out-42\n", "err\n")

    assert "got-ping" in host.run("logs", name).stdout
    host.run("stop", name)
    assert host.ps()[name]["state"] == "stopped"
    assert "not imported before the chroot" not in (host.vm_dir(name) / "vmm.log").read_text()
    host.run("rm", name)
    assert host.leftovers() == []
