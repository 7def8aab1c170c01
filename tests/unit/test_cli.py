"""`popek run` on bad input: one `popek: error:` line, exit status 2, refused before any slow work, nothing left
behind (no process, no cache entry, no fd). Runs the real CLI as a subprocess; no guest boots."""

import ctypes
import os
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from popek.boot.linux import BootError

MiB = 1 << 20
KMAP = 0xFFFF_FFFF_8000_0000
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2

kvm_usable = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="/dev/kvm is not usable here")


def tiny_vmlinux() -> bytes:
    """An ELF64 vmlinux with one 64 KiB PT_LOAD at physical 16 MiB (virtual __START_KERNEL_map + 16 MiB)."""
    text = b"\xf4" * 0x10000  # hlt
    ph = struct.pack("<IIQQQQQQ", 1, 5, 0x1000, KMAP + 16 * MiB, 16 * MiB, len(text), len(text), 0x1000)
    eh = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), 2, 62, 1, 16 * MiB, 64, 0, 0, 64, 56, 1,
                     64, 0, 0)
    return (eh + ph).ljust(0x1000, b"\0") + text


def drop_dac_override() -> None:
    """preexec_fn: remove CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH from the bounding set, so the exec'd process (root
    or not) gets file permission checks like an ordinary user."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@dataclass
class Refusal:
    """What a `popek run` printed, its status, the pids left in its session, the files it made in the cache."""

    returncode: int
    stdout: str
    stderr: str
    leftovers: list[str]
    cache_files: list[str]
    seconds: float


def popek_run(tmp_path, *args, env=None, preexec_fn=None, timeout=60) -> Refusal:
    """Run `python -m popek.cli run ARGS -- true` in its own session with an empty XDG_CACHE_HOME; report what it
    printed and what it left: processes still in its session, files created under the cache directory."""
    cache = tmp_path / "xdg-cache"
    cache.mkdir()
    full_env = dict(os.environ, XDG_CACHE_HOME=str(cache), **(env or {}))
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "popek.cli", "run", *args, "--", "true"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                         start_new_session=True, preexec_fn=preexec_fn)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"popek run {' '.join(args)[:200]} still running after {timeout} s (slow work before the "
                    f"check?): {err[-2000:]}")
    seconds = time.monotonic() - t0
    left = subprocess.run(["pgrep", "-s", str(p.pid)], capture_output=True, text=True).stdout.split()
    for pid in left:
        os.kill(int(pid), signal.SIGKILL)
    return Refusal(p.returncode, out, err, left, sorted(str(f.relative_to(cache)) for f in cache.rglob("*")), seconds)


def assert_refused(r: Refusal, *words: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("popek: error: "), r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert r.stdout == ""
    assert r.leftovers == [], "processes left in popek's session"
    assert r.cache_files == [], "popek wrote to the image cache"
    assert r.seconds < 30


@pytest.fixture
def kernel(tmp_path):
    path = tmp_path / "vmlinux"
    path.write_bytes(tiny_vmlinux())
    return path


@pytest.fixture
def sparse_initrd(tmp_path):
    path = tmp_path / "initrd.img"
    with open(path, "wb") as f:
        f.truncate(300 * MiB)
    return path


# ---- the kernel --------------------------------------------------------------------------------------------------

def test_missing_kernel_is_refused_naming_the_path(tmp_path):
    assert_refused(popek_run(tmp_path, "--kernel", str(tmp_path / "missing")), "kernel", "missing",
                   "No such file or directory")


def test_kernel_path_that_is_a_directory_is_refused(tmp_path):
    assert_refused(popek_run(tmp_path, "--kernel", str(tmp_path)), "cannot read kernel", "Is a directory")


def test_kernel_without_read_permission_is_refused(tmp_path, kernel):
    kernel.chmod(0)
    try:
        r = popek_run(tmp_path, "--kernel", str(kernel), preexec_fn=drop_dac_override if os.geteuid() == 0 else None)
    except subprocess.SubprocessError as e:
        pytest.skip(f"cannot drop CAP_DAC_OVERRIDE for the child, so root reads any file: {e}")
    assert_refused(r, "cannot read kernel", str(kernel), "Permission denied")


def test_random_bytes_are_refused_as_not_a_kernel(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(64 * 1024))
    assert_refused(popek_run(tmp_path, "--kernel", str(junk)), "not a Linux kernel")


# ---- initrd, memory, vCPUs, command line --------------------------------------------------------------------------

def test_initrd_bigger_than_guest_memory_is_refused_before_building_the_default_image(tmp_path, sparse_initrd):
    assert_refused(popek_run(tmp_path, "--initrd", str(sparse_initrd), "--memory", "64M"),
                   "initrd of 300.0 MiB", "64 MiB of guest memory")


def test_initrd_that_does_not_fit_above_the_kernel_is_refused_by_the_loader(tmp_path, kernel):
    initrd = tmp_path / "initrd.img"
    with open(initrd, "wb") as f:
        f.truncate(60 * MiB)  # smaller than the 64 MiB of RAM, but RAM above the kernel at 16 MiB is 48 MiB
    assert_refused(popek_run(tmp_path, "--kernel", str(kernel), "--initrd", str(initrd), "--memory", "64M"),
                   "initrd of 60.0 MiB does not fit")


def test_missing_initrd_is_refused_before_building_the_default_image(tmp_path):
    assert_refused(popek_run(tmp_path, "--initrd", str(tmp_path / "nope.cpio")), "cannot read initrd",
                   "No such file or directory")


@pytest.mark.parametrize("memory, words", [
    ("8M", ("8 MiB of guest memory", "below the 32 MiB")),
    ("banana", ("'banana'", "as a size")),
    ("33554433", ("not a multiple of the 4 KiB page size",)),
], ids=["below-minimum", "not-a-size", "not-page-multiple"])
def test_bad_memory_size_is_refused_before_building_the_default_image(tmp_path, memory, words):
    assert_refused(popek_run(tmp_path, "--memory", memory), *words)


@pytest.mark.parametrize("cpus", ["0", "255"])
def test_vcpu_count_outside_1_to_254_is_refused(tmp_path, cpus):
    assert_refused(popek_run(tmp_path, "--cpus", cpus), f"{cpus} vCPUs", "1 to 254")


def test_overlong_append_is_refused_before_building_the_default_image(tmp_path):
    assert_refused(popek_run(tmp_path, "--append", "x" * 5000), "command line is", "at most 2047")


def test_overlong_append_is_refused_by_the_loader_for_a_kernel_path(tmp_path, kernel):
    assert_refused(popek_run(tmp_path, "--kernel", str(kernel), "--append", "x" * 5000),
                   "command line is", "this kernel accepts at most 2047")


# ---- KVM ---------------------------------------------------------------------------------------------------------

def test_missing_kvm_device_is_refused_before_building_the_default_image(tmp_path):
    missing = str(tmp_path / "kvm")
    assert_refused(popek_run(tmp_path, env={"POPEK_KVM_DEVICE": missing}), missing, "does not exist",
                   "KVM is not available")


def test_character_device_that_is_not_kvm_is_refused(tmp_path, kernel):
    assert_refused(popek_run(tmp_path, "--kernel", str(kernel), env={"POPEK_KVM_DEVICE": "/dev/null"}),
                   "/dev/null is not a KVM device", "KVM_GET_API_VERSION")


def test_kvm_device_without_permission_is_refused(tmp_path, kernel):
    node = tmp_path / "kvm"
    try:
        os.mknod(node, 0o600 | 0o020000, os.makedev(10, 232))  # S_IFCHR, /dev/kvm's numbers
    except PermissionError:
        pytest.skip("cannot create a device node here (no CAP_MKNOD)")
    node.chmod(0)
    try:
        r = popek_run(tmp_path, "--kernel", str(kernel), env={"POPEK_KVM_DEVICE": str(node)},
                      preexec_fn=drop_dac_override)
    except subprocess.SubprocessError as e:
        pytest.skip(f"cannot drop CAP_DAC_OVERRIDE for the child: {e}")
    assert_refused(r, "no permission to open", str(node))


# ---- the VM constructor releases what it took --------------------------------------------------------------------

def open_fds() -> dict[str, str]:
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the fd listdir itself used
            pass
    return fds


@kvm_usable
def test_vm_constructor_closes_kvm_vm_and_memfd_on_a_bad_kernel(tmp_path):
    from popek.vm import Vm, VmConfig

    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(4096))
    before = open_fds()
    with pytest.raises(BootError, match="not a Linux kernel"):
        Vm(VmConfig(kernel=junk, cmdline="console=ttyS0", memory=64 * MiB))
    assert open_fds() == before


@kvm_usable
def test_vm_constructor_closes_vcpu_fds_when_vcpu_setup_fails(tmp_path, kernel, monkeypatch):
    import popek.vm
    from popek.vm import Vm, VmConfig

    calls = []

    def failing_setup_lapic(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise popek.vm.VmError("injected: LAPIC setup of the second vCPU failed")

    monkeypatch.setattr(popek.vm, "setup_lapic", failing_setup_lapic)
    before = open_fds()
    with pytest.raises(popek.vm.VmError, match="injected"):
        Vm(VmConfig(kernel=kernel, cmdline="console=ttyS0", memory=64 * MiB, cpus=3))
    assert len(calls) == 2
    assert open_fds() == before


@pytest.mark.parametrize("args, words", [(["run", "--cpus", "banana", "--", "true"], ["--cpus", "banana", "--help"]),
                                         (["run", "--no-such-option"], ["--no-such-option"]),
                                         (["no-such-command"], ["no-such-command"])])
def test_click_usage_errors_are_one_popek_error_line_with_status_2(args, words):
    p = subprocess.run([sys.executable, "-m", "popek.cli", *args], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 2
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("popek: error: "), p.stderr
    assert all(w in lines[0] for w in words), lines[0]
