"""End to end: a Linux guest printing ticks in a detached VM (`popek start`) is snapshotted (`popek snapshot
create`) and restored as a second VM (`popek snapshot restore`), whose console goes on counting from the snapshot
instead of booting again. Boots a real guest: run with ``--run-slow``."""

import os
import re
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

POPEK = [sys.executable, "-c", "from popek.cli import main; main()"]
BOOT_TIMEOUT = 400
TICK_RE = re.compile(r"tick-(\d+)")
SCRIPT = "i=0; while true; do echo tick-$i; i=$((i+1)); sleep 1; done"


@pytest.fixture
def popek(tmp_path):
    env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    names: list[str] = []

    def run(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        if args[0] == "start" or args[:2] == ("snapshot", "restore"):
            names.append(args[args.index("--name") + 1])
        p = subprocess.run([*POPEK, *args], env=env, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            pytest.fail(f"popek {' '.join(args)} exited {p.returncode}: {p.stderr}")
        return p

    yield run
    for name in names:
        run("kill", name, check=False)
        run("rm", name, check=False)


def _ticks(popek, name: str) -> list[int]:
    return [int(n) for n in TICK_RE.findall(popek("logs", name).stdout)]


def _wait_tick(popek, name: str, at_least: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ticks = _ticks(popek, name)
        if ticks and ticks[-1] >= at_least:
            return ticks
        time.sleep(1)
    pytest.fail(f"VM {name} printed ticks {_ticks(popek, name)[-5:]}, not tick-{at_least}, in {timeout} s:\n"
                f"{popek('logs', name).stdout[-2000:]}")


def test_restored_vm_continues_the_ticks_after_the_snapshot_instead_of_restarting(popek, tmp_path):
    popek("start", "--name", "a", "--", "sh", "-c", SCRIPT, timeout=BOOT_TIMEOUT)
    _wait_tick(popek, "a", 3, BOOT_TIMEOUT)
    before = _ticks(popek, "a")[-1]
    assert popek("snapshot", "create", "a", str(tmp_path / "snap"), timeout=600).stdout.strip() == \
        str(tmp_path / "snap")
    after = _ticks(popek, "a")[-1]  # the VM was paused for the snapshot, then resumed
    assert (tmp_path / "snap" / "state").is_file() and (tmp_path / "snap" / "memory").is_file()
    assert popek("snapshot", "restore", str(tmp_path / "snap"), "--name", "b", timeout=600).stdout.strip() == "b"
    ticks = _wait_tick(popek, "b", after + 3, 120)
    assert ticks[0] >= before and ticks[0] <= after + 1, (before, after, ticks[:5])  # not tick-0: no reboot
    assert ticks == list(range(ticks[0], ticks[0] + len(ticks))), ticks
    log = popek("logs", "b").stdout
    assert "Linux version" not in log and "Segmentation fault" not in log, log[:2000]  # no reboot, no lost SYSCALL
    _wait_tick(popek, "a", after + 3, 60)  # the original goes on too
