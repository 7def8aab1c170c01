"""End to end: boot the default guest (a real Linux kernel, busybox user space) and run commands in it.

Slow on an emulating KVM (minutes per boot): run with ``--run-slow``.
"""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

TIMEOUT = 1800


def popek_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "popek.cli", "run", *args], capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def test_default_guest_runs_uname_and_exits_with_its_status():
    p = popek_run("--", "uname", "-a")
    assert p.returncode == 0, p.stderr[-2000:] + p.stdout[-2000:]
    assert "Linux" in p.stdout and "x86_64" in p.stdout


def test_exit_status_of_guest_command_becomes_popek_exit_status():
    p = popek_run("--", "sh", "-c", "echo about-to-exit; exit 3")
    assert "about-to-exit" in p.stdout, p.stderr[-2000:]
    assert p.returncode == 3


def test_python_api_returns_command_output_only_and_status():
    import popek

    r = popek.run(["sh", "-c", "echo hello-from-guest; cat /proc/cpuinfo | grep -c ^processor"], cpus=2,
                  timeout=TIMEOUT)
    assert r.exit_status == 0, r.console[-3000:]
    lines = [ln.strip() for ln in r.output.splitlines() if ln.strip()]
    assert lines == ["hello-from-guest", "2"], r.console[-3000:]
    assert r.stats.init_at is not None


def test_debian_cloud_kernel_unmodified_runs_uname_r():
    """Debian's own cloud kernel (about 4 minutes to init on an emulating KVM)."""
    p = popek_run("--kernel", "debian", "--", "uname", "-r")
    assert p.returncode == 0, p.stderr[-2000:] + p.stdout[-3000:]
    assert "cloud-amd64" in p.stdout
