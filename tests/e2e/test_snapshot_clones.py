"""End to end, one Linux boot: a detached VM with dirty-page tracking and a shell on its console gets a Full snapshot,
writes a file, gets a Diff snapshot on it; `popek snapshot clone` starts five VMs from the Diff (over its recorded
base) at once, and each one's console shell answers and still has the file, and `popek exec` (the guest agent
over each clone's own vsock socket) answers in each. Run with ``--run-slow``."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from popek.consoleline import ask
from test_many_vms import BOOT_TIMEOUT, Host  # `popek` with a private runtime base, VM names, log waits

pytestmark = pytest.mark.slow

CLONES = 5


@pytest.fixture
def host():
    h = Host(Path(tempfile.mkdtemp(prefix="popek-e2e-")))  # short: socket paths must fit sun_path
    yield h
    for name in h.names:
        h.run("kill", name, check=False)
        h.run("rm", name, check=False)
    shutil.rmtree(h.base, ignore_errors=True)


def console_says(host: Host, name: str, line: str, expect: str, timeout: float) -> str:
    """What VM ``name``'s console printed until ``expect`` came back for ``line`` typed at its shell."""
    try:
        return ask(host.vm_dir(name) / "console.sock", line, expect, timeout)
    except TimeoutError as e:
        pytest.fail(f"VM {name}: {e}")


def test_five_clones_of_a_diff_snapshot_run_at_once_and_each_answers(host, tmp_path):
    origin = host.name("origin")
    host.start(origin, "--track-dirty-pages", "--memory", "128M")
    host.wait_log(origin, "built-in shell", BOOT_TIMEOUT * 2)  # type nothing before: input slows the boot here
    console_says(host, origin, "echo up-$((6*7))", "up-42", 120)
    full, diff = tmp_path / "full", tmp_path / "diff"
    host.run("snapshot", "create", origin, str(full), timeout=600)
    console_says(host, origin, "echo after-base > /tmp/mark; cat /tmp/mark", "after-base", 120)
    host.run("snapshot", "create", origin, str(diff), "--diff", timeout=600)
    assert (diff / "memory").stat().st_blocks < (full / "memory").stat().st_blocks  # only the dirtied pages

    prefix = host.name("clone")
    names = host.run("snapshot", "clone", str(diff), "--count", str(CLONES), "--name-prefix", prefix,
                     timeout=600).stdout.split()
    host.names += names
    assert names == [f"{prefix}-{i}" for i in range(1, CLONES + 1)]
    rows = host.ps()
    assert all(rows[n]["state"] == "running" and rows[n]["pid"] for n in names), rows
    assert len({rows[n]["pid"] for n in names}) == CLONES  # one VMM process each
    for n in names:
        out = console_says(host, n, f"cat /tmp/mark; echo {n}-$((6*7))", f"{n}-42", 120)
        assert "after-base" in out, out  # the Diff's pages, over the base
        assert "Linux version" not in host.run("logs", n).stdout  # restored, not booted
    for n in names:  # the guest agent (popek exec) came along in the snapshot; each clone has its own vsock socket
        p = host.run("exec", n, "--timeout", "120", "--", "echo", f"exec-{n}", check=False, timeout=300)
        assert p.returncode == 0 and p.stdout.strip() == f"exec-{n}", (n, p.stderr)
    console_says(host, origin, "echo still-$((2*3))", "still-6", 120)  # the origin is unaffected
