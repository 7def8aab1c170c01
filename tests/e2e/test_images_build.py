"""Real guest image builds (minutes: the microvm kernel compiles), and a boot of each under QEMU's TCG if present."""

import base64
import shutil
import subprocess

import pytest

from popek.guestcmd import CONSOLE_PORT_WRITE
from popek.images.build import build_image, find_image

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind", ["microvm", "debian"])
def test_build_produces_kernel_and_initramfs_listing_init_and_busybox(kind):
    image = build_image(kind, progress=False)
    assert image.kernel.is_file() and image.kernel.stat().st_size > 1 << 20
    assert image.initrd.is_file()
    assert image.initrd.read_bytes()[:6] == b"070701", "initramfs must be uncompressed newc"
    if shutil.which("cpio"):
        names = subprocess.run(["cpio", "-t"], input=image.initrd.read_bytes(), capture_output=True,
                               check=True).stdout.decode().split()
        assert "init" in names and "bin/busybox" in names and "dev/console" in names
    if kind == "microvm":
        assert image.kernel.read_bytes()[:4] == b"\x7fELF" and image.version.endswith("-popek")
        assert image.system_map is not None and image.system_map.is_file()
    else:
        assert b"HdrS" in image.kernel.read_bytes()[:0x300], "vmlinuz should be a bzImage"
    assert find_image(kind) == image


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 not installed")
@pytest.mark.parametrize("kind, machine", [("microvm", "microvm,acpi=off"), ("debian", "pc")])
def test_image_runs_popek_cmd_under_qemu_tcg_and_reports_status_on_port_0x504_or_console(kind, machine, tmp_path):
    """The status goes to port 0x504 through /dev/port, or (Debian's kernel has CONFIG_DEVPORT off) as the
    console marker popek.guestcmd.CONSOLE_PORT_WRITE."""
    image = build_image(kind, progress=False)
    command = base64.b64encode(b"uname -r; exit 7").decode()
    status = tmp_path / "port504"
    proc = subprocess.run(
        ["qemu-system-x86_64", "-accel", "tcg", "-M", machine, "-m", "256", "-nographic", "-no-reboot",
         "-nic", "none", "-chardev", f"file,id=st,path={status}", "-device", "isa-debugcon,iobase=0x504,chardev=st",
         "-kernel", str(image.kernel), "-initrd", str(image.initrd),
         "-append", f"console=ttyS0 reboot=k panic=-1 quiet popek.cmd={command}"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert image.version in proc.stdout
    assert "popek-init:" not in proc.stdout
    if kind == "microvm":
        assert status.read_bytes() == b"\x07"
    else:
        marks = [(int(p), int(v)) for p, v in CONSOLE_PORT_WRITE.findall(proc.stdout.encode())]
        assert marks == [(0x505, 1), (0x504, 7)] and status.read_bytes() == b""
