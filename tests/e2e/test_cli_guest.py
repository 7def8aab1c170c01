"""End to end, `popek run` with a real guest: kernel panic, the interactive shell on a pseudo-terminal (raw mode,
Ctrl-A x), SIGINT, exit status. Each test boots the default microvm guest (~20-40 s here): run with ``--run-slow``."""

import os
import re
import select
import signal
import subprocess
import sys
import termios
import time

import pytest

pytestmark = pytest.mark.slow

BOOT_TIMEOUT = 300
POPEK = [sys.executable, "-m", "popek.cli", "run"]
#: busybox ash's prompt ("/ # "), then the cursor-position query (ESC [6n) its line editing sends.
PROMPT = re.compile(rb"[#$] (?:\x1b\[6n)?\Z")


def session_processes(sid: int) -> list[str]:
    return subprocess.run(["pgrep", "-s", str(sid)], capture_output=True, text=True).stdout.split()


class PtyPopek:
    """`popek run ARGS` with stdin/stdout/stderr on a new pseudo-terminal; the test holds the master."""

    def __init__(self, *args: str):
        self.master, self.slave = os.openpty()
        self.attrs_before = termios.tcgetattr(self.slave)
        self.proc = subprocess.Popen([*POPEK, *args], stdin=self.slave, stdout=self.slave, stderr=self.slave,
                                     start_new_session=True)
        self.output = bytearray()

    def read_until(self, pattern: re.Pattern, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            m = pattern.search(self.output)
            if m:
                return m
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                pytest.fail(f"no {pattern.pattern!r} on the console (popek status {self.proc.poll()}): "
                            f"{bytes(self.output[-3000:])!r}")
            if select.select([self.master], [], [], min(left, 0.5))[0]:
                try:
                    self.output += os.read(self.master, 65536)
                except OSError:
                    pass

    def wait_prompt(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Wait until the guest shell prints its prompt and then stays quiet for a moment."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read_until(PROMPT, deadline - time.monotonic())
            n = len(self.output)
            time.sleep(1.0)
            self.drain()
            if len(self.output) == n:
                return
        pytest.fail(f"no shell prompt: {bytes(self.output[-3000:])!r}")

    def drain(self) -> None:
        while select.select([self.master], [], [], 0)[0]:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            self.output += data

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.drain()
            time.sleep(0.05)
        self.drain()
        if self.proc.poll() is None:
            self.kill()
            pytest.fail(f"popek did not exit within {timeout} s: {bytes(self.output[-3000:])!r}")
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def close(self) -> None:
        self.kill()
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def pty_popek():
    made = []

    def start(*args):
        made.append(PtyPopek(*args))
        return made[-1]

    yield start
    for p in made:
        p.close()


def test_guest_kernel_panic_ends_popek_with_one_line_naming_the_panic():
    p = subprocess.run([*POPEK, "--append", "rdinit=/nonexistent init=/nonexistent", "--", "true"],
                       capture_output=True, text=True, timeout=BOOT_TIMEOUT, stdin=subprocess.DEVNULL)
    assert p.returncode not in (0, 2), p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert re.fullmatch(r"popek: guest kernel panic: \S.*", lines[0]), lines[0]
    assert "Kernel panic - not syncing" in p.stdout  # the guest's own console output is shown


def test_interactive_shell_runs_typed_commands_and_exit_ends_popek_with_status_0(pty_popek):
    p = pty_popek()
    p.wait_prompt()
    raw = termios.tcgetattr(p.slave)
    assert not raw[3] & termios.ECHO and not raw[3] & termios.ICANON, "the host terminal is not in raw mode"
    p.type(b"echo hi-$((6*7))\r")
    p.read_until(re.compile(rb"\bhi-42\b"), 60)
    p.wait_prompt()
    p.type(b"exit\r")
    assert p.wait_exit(120) == 0, bytes(p.output[-2000:])
    assert termios.tcgetattr(p.slave) == p.attrs_before
    assert session_processes(p.proc.pid) == []


def test_interactive_shell_has_job_control_on_the_serial_console(pty_popek):
    p = pty_popek()
    p.wait_prompt()
    p.type(b"tty; sleep 100\r")
    p.read_until(re.compile(rb"/dev/ttyS0"), 60)
    time.sleep(1)
    p.type(b"\x03")  # Ctrl-C goes to the guest (raw mode): it interrupts the guest's sleep, not popek
    p.wait_prompt(timeout=30)
    assert p.proc.poll() is None, "Ctrl-C stopped popek instead of the guest's foreground job"
    p.type(b"echo after-$((1+1))\r")
    p.read_until(re.compile(rb"\bafter-2\b"), 60)
    p.type(b"\x01x")
    assert p.wait_exit(30) == 0


def test_ctrl_a_x_stops_the_vm_promptly_and_restores_the_terminal(pty_popek):
    p = pty_popek()
    p.wait_prompt()
    t0 = time.monotonic()
    p.type(b"\x01x")
    status = p.wait_exit(30)
    assert time.monotonic() - t0 < 10
    assert status == 0, bytes(p.output[-2000:])
    assert termios.tcgetattr(p.slave) == p.attrs_before
    assert session_processes(p.proc.pid) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_or_sigterm_stops_the_vm_cleanly_with_status_130(sig):
    proc = subprocess.Popen([*POPEK, "--", "sh", "-c", "echo sleeping; exec sleep 1000"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out = b""
        deadline = time.monotonic() + BOOT_TIMEOUT
        while b"sleeping" not in out:
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, f"guest never ran the command: {out[-2000:]!r}"
            out += line
        time.sleep(1)
        t0 = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=15)
        assert time.monotonic() - t0 < 5
        assert proc.returncode == 130, err
        assert b"interrupted; VM stopped" in err and b"Traceback" not in err, err
        assert session_processes(proc.pid) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_guest_command_exit_status_3_becomes_popek_exit_status():
    p = subprocess.run([*POPEK, "--", "sh", "-c", "exit 3"], capture_output=True, text=True, timeout=BOOT_TIMEOUT,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 3, p.stderr[-2000:]
