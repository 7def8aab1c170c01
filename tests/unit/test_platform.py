"""The PCI board and its inputs, without KVM: the ``--drive`` parser and drive checks (also through the real CLI),
BAR assignment from the MMIO window (aligned, disjoint, inside the 32-bit hole, below the IOAPIC), slot/INTx/MP
table wiring, wire-ORed INTx pins, and what closing releases."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from popek.boot import layout
from popek.bus import Bus
from popek.devices.pci import PCI_COMMAND, PCI_COMMAND_MEMORY, PCI_INTERRUPT_LINE, PciBus, PciError
from popek.devices.platform import (PCI_MMIO_END, PCI_MMIO_START, IntxPin, MmioWindow, VirtioPciBoard,
                                    add_virtio_devices)
from popek.devices.virtio.block import Block
from popek.devices.virtio.device import VirtioError
from popek.devices.virtio.pci import BAR_INDEX, BAR_SIZE
from popek.devices.virtio.rng import Rng
from popek.irq import MsiRouter
from popek.memory import MMIO_HOLE_START, GuestMemory
from popek.runner import check_drive, parse_drive
from popek.vm import DriveConfig, VmError


class FakeVm:
    """Records KVM_IRQ_LINE levels and accepts routing, irqfd and ioeventfd requests."""

    def __init__(self):
        self.irq_levels: list[tuple[int, int]] = []
        self.ioeventfds: list[tuple[int, int, bool]] = []

    def irq_line(self, gsi, level):
        self.irq_levels.append((gsi, level))

    def set_gsi_routing(self, entries):
        pass

    def irqfd(self, fd, gsi, deassign=False, resample_fd=None):
        pass

    def ioeventfd(self, fd, addr, length, *, pio=False, datamatch=None, deassign=False):
        self.ioeventfds.append((fd, addr, deassign))


@pytest.fixture
def image(tmp_path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(bytes(1 << 20))
    return p


@pytest.fixture
def board():
    vm, mem = FakeVm(), GuestMemory([(0, 1 << 20)])
    router = MsiRouter(vm)
    b = VirtioPciBoard(vm, mem, PciBus(), Bus("mmio"), router)
    yield b
    b.close()
    router.close()
    mem.close()


# ---- --drive syntax ------------------------------------------------------------------------------------------------

def test_parse_drive_reads_path_readonly_and_serial_in_any_order():
    assert parse_drive("path=/a/b.img") == DriveConfig(Path("/a/b.img"), readonly=False, serial=None)
    assert parse_drive("serial=ID7,readonly=on,path=x.img") == DriveConfig(Path("x.img"), readonly=True, serial="ID7")
    assert parse_drive("path=x.img,readonly=off").readonly is False


@pytest.mark.parametrize("text, message", [
    ("", "not key=value"),
    ("x.img", "not key=value"),
    ("path=x.img,readonly", "not key=value"),
    ("readonly=on", "no path"),
    ("path=", "no path"),
    ("path=x.img,cache=none", "unknown key 'cache'"),
    ("path=x.img,path=y.img", "path given twice"),
    ("path=x.img,readonly=yes", "expected on or off"),
])
def test_parse_drive_refuses_bad_syntax_saying_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        parse_drive(text)


def test_check_drive_refuses_missing_file_directory_and_long_or_non_ascii_serial(tmp_path, image):
    with pytest.raises(VmError, match="does not exist"):
        check_drive(DriveConfig(tmp_path / "missing.img"))
    with pytest.raises(VmError, match="neither a regular file nor a block device"):
        check_drive(DriveConfig(tmp_path))
    with pytest.raises(VmError, match="serial"):
        check_drive(DriveConfig(image, serial="x" * 21))
    with pytest.raises(VmError, match="serial"):
        check_drive(DriveConfig(image, serial="disk\u00e9"))
    check_drive(DriveConfig(image, serial="x" * 20))


def test_check_drive_refuses_read_only_file_asked_read_write_but_accepts_it_read_only(image):
    image.chmod(0o444)
    with pytest.raises(VmError, match="read-only .*readonly=on"):
        check_drive(DriveConfig(image))
    check_drive(DriveConfig(image, readonly=True))


def _popek_run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "popek.cli", "run", *args, "--", "true"], capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=cwd,
                          env=dict(os.environ, XDG_CACHE_HOME=str(Path(cwd) / "cache")))


@pytest.mark.parametrize("drive, message", [
    ("path=missing.img", "drive: image 'missing.img' does not exist"),
    ("path=ro.img", "drive: image 'ro.img' is read-only (no write permission bits); attach it with readonly=on"),
    ("path=ro.img,readonly=maybe", "readonly='maybe', expected on or off"),
    ("file=ro.img", "unknown key 'file'"),
])
def test_cli_drive_errors_are_one_line_and_exit_2_before_any_image_build(tmp_path, drive, message):
    (tmp_path / "ro.img").write_bytes(bytes(4096))
    (tmp_path / "ro.img").chmod(0o444)
    p = _popek_run("--drive", "path=ro.img,readonly=on", "--drive", drive, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("popek: error: ") and message in p.stderr, p.stderr
    assert not (tmp_path / "cache").exists()


# ---- BAR window --------------------------------------------------------------------------------------------------

def test_window_is_inside_the_32_bit_hole_and_below_the_ioapic():
    assert MMIO_HOLE_START <= PCI_MMIO_START < PCI_MMIO_END <= layout.IOAPIC_BASE < 1 << 32


def test_window_allocations_are_naturally_aligned_disjoint_and_inside_it():
    w = MmioWindow()
    sizes = [BAR_SIZE, 0x1000, 0x10_0000, 0x10, BAR_SIZE, 0x1000_0000, 0x4000]
    spans = []
    for size in sizes:
        addr = w.allocate(size)
        assert addr % size == 0
        assert PCI_MMIO_START <= addr and addr + size <= PCI_MMIO_END
        spans.append((addr, addr + size))
    spans.sort()
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))


def test_window_refuses_a_bar_that_does_not_fit_or_is_not_a_power_of_two():
    w = MmioWindow(0xE000_0000, 0xE001_0000)
    assert w.allocate(0x8000) == 0xE000_0000
    assert w.allocate(0x8000) == 0xE000_8000
    with pytest.raises(PciError, match="no room"):
        w.allocate(0x10)
    with pytest.raises(PciError, match="power of two"):
        MmioWindow().allocate(0x3000)


@pytest.mark.parametrize("start, end", [(0xB000_0000, 0xD000_0000), (0xD000_0000, 0xFEE0_0000),
                                        (0xD000_0000, 0xD000_0000), (0xF000_0000, 0xE000_0000)])
def test_window_outside_the_hole_or_reaching_the_ioapic_is_refused(start, end):
    with pytest.raises(PciError, match="inside the 32-bit hole"):
        MmioWindow(start, end)


# ---- the board ---------------------------------------------------------------------------------------------------

def test_board_puts_devices_in_slots_1_up_with_bars_from_the_window_and_inta_on_pins_16_plus_slot(board, image):
    add_virtio_devices(board, [DriveConfig(image), DriveConfig(image, readonly=True)], rng=True)
    assert [type(d.device) for d in board.devices] == [Block, Block, Rng]
    assert [board.pci.get(s) for s in (1, 2, 3)] == board.devices
    addrs = [d.bar_address(BAR_INDEX) for d in board.devices]
    assert addrs == [PCI_MMIO_START, PCI_MMIO_START + BAR_SIZE, PCI_MMIO_START + 2 * BAR_SIZE]
    assert board.pci_irqs == [(1, 0, 17), (2, 0, 18), (3, 0, 19)]
    assert [d.config_read(PCI_INTERRUPT_LINE, 1) for d in board.devices] == [17, 18, 19]
    assert board.devices[1].device.readonly and not board.devices[0].device.readonly


def test_bar_is_mapped_on_the_mmio_bus_only_once_the_guest_enables_memory_decoding(board):
    add_virtio_devices(board, [], rng=True)
    dev = board.devices[0]
    assert board.mmio.resolve(PCI_MMIO_START) is None
    dev.config_write(PCI_COMMAND, 2, PCI_COMMAND_MEMORY)
    assert board.mmio.resolve(PCI_MMIO_START) == (dev, 0)
    assert len(board.vm.ioeventfds) == 1  # rng has one queue: one notify ioeventfd at its BAR address
    assert board.vm.ioeventfds[0][1] >= PCI_MMIO_START


def test_intx_of_the_device_drives_its_ioapic_pin(board):
    add_virtio_devices(board, [], rng=True)
    dev = board.devices[0]
    dev.irq.set_level(True)
    dev.irq.set_level(False)
    assert board.vm.irq_levels == [(17, 1), (17, 0)]


def test_ninth_slot_shares_the_pin_of_the_first_and_the_pin_is_a_wired_or(board):
    for _ in range(9):
        board.add(Rng())
    assert board.pci_irqs[0] == (1, 0, 17) and board.pci_irqs[8] == (9, 0, 17)
    first, ninth = board.devices[0].irq, board.devices[8].irq
    first.set_level(True)
    ninth.set_level(True)
    first.set_level(False)
    assert board.vm.irq_levels == [(17, 1)]  # still asserted by slot 9
    ninth.set_level(False)
    assert board.vm.irq_levels == [(17, 1), (17, 0)]


def test_intx_pin_forwards_only_changes_of_the_or():
    seen = []
    pin = IntxPin(20, lambda gsi, level: seen.append((gsi, level)))
    a, b = pin.line(), pin.line()
    a.set_level(True)
    b.set_level(True)
    b.set_level(False)
    assert pin.level and seen == [(20, 1)]
    a.set_level(False)
    assert seen == [(20, 1), (20, 0)] and not pin.level
    b.pulse()
    assert seen == [(20, 1), (20, 0), (20, 1), (20, 0)] and not pin.level


def test_missing_drive_fails_with_virtio_error_and_leaves_nothing_on_the_bus(board, tmp_path):
    with pytest.raises(VirtioError, match="does not exist"):
        add_virtio_devices(board, [DriveConfig(tmp_path / "nope.img")], rng=True)
    assert board.devices == [] and board.pci.get(1) is None


def test_full_bus_is_refused_and_the_refused_device_is_closed(board, image):
    for _ in range(31):
        board.add(Rng())
    blk = Block(image)
    with pytest.raises(PciError, match="no free slot"):
        board.add(blk)
    assert blk.fd == -1


def test_close_closes_the_image_files_and_unmaps_the_bars(board, image):
    add_virtio_devices(board, [DriveConfig(image)], rng=False)
    dev = board.devices[0]
    dev.config_write(PCI_COMMAND, 2, PCI_COMMAND_MEMORY)
    board.close()
    assert dev.device.fd == -1 and board.devices == []
    assert board.mmio.resolve(PCI_MMIO_START) is None
    assert board.vm.ioeventfds[-1][2] is True  # the notify ioeventfd was deassigned


def test_vsock_is_added_after_rng_listening_on_its_socket_which_closing_the_board_removes(board, tmp_path):
    from popek.devices.virtio.vsock import Vsock
    from popek.vm import VsockConfig

    sock = tmp_path / "v.sock"
    add_virtio_devices(board, [], rng=True, vsock=VsockConfig(3, sock))
    assert [type(d.device) for d in board.devices] == [Rng, Vsock]
    assert sock.is_socket() and board.devices[1].device.guest_cid == 3
    board.close()
    assert not sock.exists() and list(tmp_path.iterdir()) == []


def test_vsock_socket_path_that_exists_is_refused_and_left_alone(board, tmp_path):
    from popek.vm import VsockConfig

    taken = tmp_path / "v.sock"
    taken.write_text("not ours")
    with pytest.raises(VirtioError, match="already exists"):
        add_virtio_devices(board, [], rng=False, vsock=VsockConfig(3, taken))
    assert taken.read_text() == "not ours"
