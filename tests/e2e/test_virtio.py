"""End to end, virtio-pci devices with the microvm guest: virtio-blk reads the host's image byte for byte, writes
persist across boots, a read-only drive refuses writes, virtio-rng is the guest's /dev/hwrng; the devices sit on PCI
with BARs in the VMM's window and interrupt through MSI-X (or INTx with ``pci=nomsi``). Each boot takes ~20-40 s on
an emulating KVM: run with ``--run-slow``."""

from __future__ import annotations

import hashlib
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from popek.devices.platform import PCI_MMIO_END, PCI_MMIO_START

pytestmark = pytest.mark.slow

TIMEOUT = 900
MiB = 1 << 20
SECTION = re.compile(r"^== (\S+) ==\r?$", re.MULTILINE)


def popek_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "popek.cli", "run", *args], capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def guest_sh(script: str, *drive_args: str, append: str | None = None) -> subprocess.CompletedProcess:
    args = [a for d in drive_args for a in ("--drive", d)]
    if append:
        args += ["--append", append]
    return popek_run(*args, "--", "sh", "-c", script)


def sections(text: str) -> dict[str, str]:
    """The guest's output split at ``== name ==`` lines."""
    parts = SECTION.split(text.replace("\r\n", "\n"))
    return {name: body.strip("\n") for name, body in zip(parts[1::2], parts[2::2])}


def head_sha256(path: Path, n: int = 4096) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(n)).hexdigest()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def raw_image(path: Path) -> Path:
    """A sparse 64 MiB image whose first 4 KiB are a fixed pseudo-random pattern."""
    with open(path, "wb") as f:
        f.write(random.Random(1974).randbytes(4096))
        f.truncate(64 * MiB)
    return path


def ext4_image(path: Path) -> Path:
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 (e2fsprogs) is not installed")
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(path)], check=True, capture_output=True)
    return path


INSPECT = r"""
echo "== sha =="; dd if=/dev/vda bs=4096 count=1 2>/dev/null | sha256sum
echo "== pci =="; for d in /sys/bus/pci/devices/*; do echo "${d##*/}" $(cat $d/vendor $d/device $d/class); done
echo "== iomem =="; cat /proc/iomem
echo "== hwrng =="; head -c 16 /dev/hwrng | od -An -tx1
echo "== rng_current =="; cat /sys/class/misc/hw_random/rng_current
echo "== serial =="; cat /sys/block/vda/serial; echo
echo "== interrupts =="; cat /proc/interrupts
echo "== end =="
"""


@pytest.fixture(scope="module")
def inspected(tmp_path_factory):
    """One boot with a raw drive (serial ``popek-disk0``) and virtio-rng; the host's image and the guest's report."""
    img = raw_image(tmp_path_factory.mktemp("virtio") / "disk.img")
    p = guest_sh(INSPECT, f"path={img},serial=popek-disk0")
    assert p.returncode == 0, p.stderr[-2000:] + p.stdout[-3000:]
    return img, sections(p.stdout)


def test_guest_reads_the_raw_drive_with_the_hosts_sha256_of_its_first_4k(inspected):
    img, s = inspected
    assert s["sha"].split()[0] == head_sha256(img)


def test_guest_sees_virtio_blk_and_rng_on_pci_bus_0_after_the_host_bridge(inspected):
    _, s = inspected
    assert s["pci"].splitlines() == ["0000:00:00.0 0x8086 0x29c0 0x060000",
                                     "0000:00:01.0 0x1af4 0x1042 0x010000",
                                     "0000:00:02.0 0x1af4 0x1044 0xff0000"]


def test_linux_keeps_the_bar_addresses_the_vmm_assigned_in_its_window(inspected):
    _, s = inspected
    bars = re.findall(r"^([0-9a-f]+)-([0-9a-f]+) : 0000:00:0([12])\.0$", s["iomem"], re.MULTILINE)
    assert [(int(a, 16), int(b, 16) + 1, slot) for a, b, slot in bars] == [
        (PCI_MMIO_START, PCI_MMIO_START + 0x8000, "1"), (PCI_MMIO_START + 0x8000, PCI_MMIO_START + 0x10000, "2")]
    assert PCI_MMIO_START + 0x10000 <= PCI_MMIO_END


def test_drive_serial_is_the_guests_block_device_serial(inspected):
    _, s = inspected
    assert s["serial"] == "popek-disk0"


def test_virtio_rng_is_the_guests_hwrng_and_gives_16_bytes(inspected):
    _, s = inspected
    assert s["rng_current"] == "virtio_rng.0"
    octets = s["hwrng"].split()
    assert len(octets) == 16 and all(re.fullmatch(r"[0-9a-f]{2}", o) for o in octets)
    assert len(set(octets)) > 4  # 16 bytes from a CSPRNG are not (nearly) constant


def test_virtio_devices_interrupt_through_msix(inspected):
    _, s = inspected
    virtio = [ln for ln in s["interrupts"].splitlines() if "virtio" in ln]
    assert virtio and all("PCI-MSI" in ln for ln in virtio), s["interrupts"]
    counts = {ln.split()[-1]: int(ln.split()[1]) for ln in virtio}
    assert counts.get("virtio0-req.0", 0) > 0 and counts.get("virtio1-input", 0) > 0, counts


def test_with_msi_off_the_devices_interrupt_through_intx_on_the_mp_table_pins(tmp_path):
    img = raw_image(tmp_path / "disk.img")
    p = guest_sh(INSPECT, f"path={img}", append="pci=nomsi")
    assert p.returncode == 0, p.stderr[-2000:] + p.stdout[-3000:]
    s = sections(p.stdout)
    assert s["sha"].split()[0] == head_sha256(img)
    assert len(s["hwrng"].split()) == 16
    lines = {ln.split()[-1]: ln for ln in s["interrupts"].splitlines() if "virtio" in ln}
    assert re.match(r"\s*17:\s+[1-9]\d*\s+IO-APIC\s+17-fasteoi", lines["virtio0"]), s["interrupts"]
    assert re.match(r"\s*18:\s+[1-9]\d*\s+IO-APIC\s+18-fasteoi", lines["virtio1"]), s["interrupts"]


def test_file_written_on_ext4_drive_persists_across_boots_and_on_the_host(tmp_path):
    img = ext4_image(tmp_path / "fs.img")
    p = guest_sh("mkdir -p /mnt && mount /dev/vda /mnt && head -c 1048576 /dev/urandom > /mnt/f && "
                 "echo '== sha ==' && sha256sum /mnt/f && sync && umount /mnt", f"path={img}")
    assert p.returncode == 0, p.stderr[-2000:] + p.stdout[-3000:]
    written = sections(p.stdout)["sha"].split()[0]
    p = guest_sh("mkdir -p /mnt && mount /dev/vda /mnt && echo '== sha ==' && sha256sum /mnt/f && umount /mnt",
                 f"path={img}")
    assert p.returncode == 0, p.stderr[-2000:] + p.stdout[-3000:]
    assert sections(p.stdout)["sha"].split()[0] == written
    if shutil.which("debugfs"):
        out = tmp_path / "f.out"
        subprocess.run(["debugfs", "-R", f"dump /f {out}", str(img)], check=True, capture_output=True)
        assert file_sha256(out) == written


def test_read_only_drive_refuses_guest_writes_and_the_image_is_unchanged(tmp_path):
    img = ext4_image(tmp_path / "fs.img")
    before = file_sha256(img)
    script = r"""
    mkdir -p /mnt
    echo "== ro =="; cat /sys/block/vda/ro
    echo "== dd =="; dd if=/dev/zero of=/dev/vda bs=4096 count=1 conv=fsync 2>&1; echo "status $?"
    echo "== write =="; mount /dev/vda /mnt 2>&1; echo data > /mnt/new 2>&1; echo "status $?"; sync
    echo "== end =="
    """
    p = guest_sh(script, f"path={img},readonly=on")
    assert p.returncode == 0, p.stderr[-2000:] + p.stdout[-3000:]
    s = sections(p.stdout)
    assert s["ro"] == "1"
    assert not s["dd"].endswith("status 0"), s["dd"]
    assert "Read-only file system" in s["write"] and not s["write"].endswith("status 0"), s["write"]
    assert file_sha256(img) == before
