"""A jailed VMM (`popek start --jail`) running a tiny guest (one `hlt` page, no Linux): its namespaces, chroot,
uid and seccomp as the host sees them; ps/pause/resume/stop/kill/rm work on it as on any VM; a process killed by
the same seccomp filter takes nothing else with it; nothing is left afterwards. Needs root and /dev/kvm."""

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from popek import jail
from popek.runtime import process_alive

TESTS = Path(__file__).parents[1]


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"popek_jail_reuse_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_many_vms = _load(TESTS / "e2e" / "test_many_vms.py")  # Host: `popek` with a private runtime base; leftovers()
tiny_vmlinux = _load(TESTS / "unit" / "test_cli.py").tiny_vmlinux  # an ELF vmlinux that is one page of `hlt`
host = _many_vms.host
wait_dead = _many_vms.wait_dead

pytestmark = [pytest.mark.kvm,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                 reason="a jail needs root and util-linux unshare")]


@pytest.fixture
def kernel(tmp_path):
    path = tmp_path / "vmlinux"
    path.write_bytes(tiny_vmlinux())
    path.chmod(0o644)
    tmp_path.chmod(0o755)
    return path


def _status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if ":\t" in line)


def _launcher(pid: int) -> int:
    return int(_status(pid)["PPid"])


def test_a_jailed_vmm_is_isolated_and_managed_like_any_vm(host, kernel, tmp_path):
    a, b = host.name("a"), host.name("b")
    host.start(a, "--jail", "--kernel", str(kernel), "--memory", "64M")
    pid, start = host.vmm(a)
    status = _status(pid)
    assert status["Uid"].split() == [str(jail.JAIL_UID)] * 4 and status["Gid"].split() == [str(jail.JAIL_GID)] * 4
    assert status["NSpid"].split() == [str(pid), "1"], "the VMM is pid 1 of its own PID namespace"
    assert (status["NoNewPrivs"], status["Seccomp"], status["CapEff"]) == ("1", "2", "0000000000000000")
    ours = jail.namespace_ids()
    theirs = jail.namespace_ids(pid)
    assert all(ours[ns] != theirs[ns] for ns in jail.NS_LINKS), (ours, theirs)

    # its root holds its own files only; its /proc shows no host process
    root = Path(f"/proc/{pid}/root")
    assert (root / str(kernel).lstrip("/")).read_bytes() == kernel.read_bytes()
    assert (root / "dev/kvm").exists() and not (root / "etc").exists() and not (root / "usr").exists()
    assert [p for p in os.listdir(root / "proc") if p.isdigit()] == ["1"]
    try:
        (root / str(kernel).lstrip("/")).write_bytes(b"x")
        pytest.fail("the kernel is writable inside the jail")
    except OSError as e:
        assert e.errno == 30  # EROFS: bound read-only

    row = host.ps()[a]
    assert (row["pid"], row["state"]) == (pid, "running")
    host.run("pause", a)
    assert host.ps()[a]["state"] == "paused"
    host.run("resume", a)
    assert host.ps()[a]["state"] == "running"
    snap = host.run("snapshot", "create", a, str(tmp_path / "snap"), check=False)
    assert snap.returncode == 1 and "jail" in snap.stderr and snap.stderr.count("\n") == 1, snap.stderr
    assert not (tmp_path / "snap").exists() and host.ps()[a]["state"] == "running"

    # the same filter kills a process that makes a disallowed call, and only that process
    p = subprocess.run([sys.executable, "-c", "from popek.jail import load_filter; load_filter(); import os; "
                        "os.execv('/bin/true', ['true'])"], capture_output=True, timeout=60)
    assert p.returncode == -signal.SIGSYS
    time.sleep(0.5)
    assert process_alive(pid, start) and host.ps()[a]["state"] == "running"

    # kill: the VMM and its launcher die, and the VM's runtime dir (its chroot mount point too) and cgroup go
    host.start(b, "--jail", "--kernel", str(kernel), "--memory", "64M")
    b_pid, b_start = host.vmm(b)
    launcher = _launcher(b_pid)
    host.run("kill", b)
    wait_dead(b_pid, b_start)
    assert not os.path.exists(f"/proc/{launcher}") or _status(launcher)["State"].startswith("Z")
    assert [x for x in host.leftovers() if b in x] == []

    # stop: a clean end recorded by the jailed VMM in its runtime dir, then rm removes everything
    host.run("stop", a)
    assert "not imported before the chroot" not in (host.vm_dir(a) / "vmm.log").read_text()
    wait_dead(pid, start)
    assert host.ps()[a]["state"] == "stopped"
    assert (host.vm_dir(a) / "result.json").exists()
    host.run("rm", a)
    assert host.leftovers() == []
    assert str(host.base) not in Path("/proc/self/mountinfo").read_text()


def test_jail_refusals_are_one_line_and_leave_nothing(host, kernel, tmp_path):
    name = host.name("bad")
    secret = tmp_path / "secret-vmlinux"
    secret.write_bytes(kernel.read_bytes())
    secret.chmod(0o600)
    cases = [(["--jail", "--kernel", str(secret)], "may not read"),
             (["--uid", "1000", "--kernel", str(kernel)], "--uid and --gid go with --jail"),
             (["--jail", "--kernel", str(kernel), "--net", ""], "network interfaces")]
    for args, words in cases:
        p = host.run("start", "--name", name, *args, check=False)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("popek: error: "), p.stderr
        assert words in p.stderr
        assert host.leftovers() == []
