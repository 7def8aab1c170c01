"""The PCI board: virtio devices on bus 0 with VMM-assigned BARs, INTA# on IOAPIC pins, MSI-X through the router."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Callable, Protocol

from popek.boot import layout
from popek.bus import Bus
from popek.devices.pci import PCI_INTERRUPT_LINE, PciBus, PciError
from popek.devices.virtio.balloon import PAGES_PER_MIB, Balloon
from popek.devices.virtio.block import Block
from popek.devices.virtio.device import VirtioDevice
from popek.devices.virtio.pci import BAR_INDEX, BAR_SIZE, VirtioPciDevice
from popek.devices.virtio.rng import Rng
from popek.devices.virtio.vsock import Vsock
from popek.irq import CallbackIrqLine, MsiRouter
from popek.memory import MMIO_HOLE_START, GuestMemory

log = logging.getLogger(__name__)

#: The PCI memory window BARs are assigned from: the 32-bit hole above what e820 could call RAM (RAM stops at
#: MMIO_HOLE_START = 3 GiB), up to the IOAPIC (everything from 0xFEC00000 is the platform's: IOAPIC, LAPIC,
#: KVM's TSS and identity-map pages).
PCI_MMIO_START = 0xD000_0000
PCI_MMIO_END = layout.IOAPIC_BASE
#: PCI INTx# goes to IOAPIC pins 16-23 (KVM's default routing maps GSI 16-23 to those pins; 0-15 are ISA IRQs):
#: slot s, INTA# -> pin 16 + s % 8, so up to 8 devices get a pin each; more share pins (wire-ORed, ``IntxPin``).
FIRST_PCI_INTX_PIN = 16
PCI_INTX_PINS = 8
#: MP table interrupt entry: INTA# is 0 (Intel MP spec 1.4 §4.3.4, source bus IRQ = device << 2 | pin).
INTA = 0


class VmIrqs(Protocol):
    """What the board needs of the VM fd (``popek.kvm.system.VmFd``): KVM_IRQ_LINE and KVM_IOEVENTFD."""

    def irq_line(self, gsi: int, level: int) -> None: ...

    def ioeventfd(self, fd: int, addr: int, length: int, *, pio: bool = False, datamatch: int | None = None,
                  deassign: bool = False) -> None: ...


class DriveLike(Protocol):
    """A drive description (``popek.vm.DriveConfig``)."""

    path: object
    readonly: bool
    serial: str | None


class VsockLike(Protocol):
    """A vsock description (``popek.vm.VsockConfig``)."""

    guest_cid: int
    uds_path: object


class BalloonLike(Protocol):
    """A balloon description (``popek.vm.BalloonConfig``)."""

    amount_mib: int
    deflate_on_oom: bool
    stats_polling_interval_s: int
    free_page_reporting: bool


class MmioWindow:
    """Hands out naturally aligned, non-overlapping BAR addresses from ``[start, end)`` (lowest first), as firmware
    does before the OS runs (PCI Local Bus 3.0 §6.2.5.1: a BAR decodes a power-of-two size at an address aligned
    to it).

    :raises PciError: if the window is empty, not inside the 32-bit MMIO hole (MMIO_HOLE_START..IOAPIC_BASE), or,
        on ``allocate``, the size is not a power of two or no room is left.
    """

    def __init__(self, start: int = PCI_MMIO_START, end: int = PCI_MMIO_END):
        if not MMIO_HOLE_START <= start < end <= layout.IOAPIC_BASE:
            raise PciError(f"PCI MMIO window {start:#x}-{end:#x} is not a non-empty range inside the 32-bit hole "
                           f"{MMIO_HOLE_START:#x}-{layout.IOAPIC_BASE:#x} (below the IOAPIC)")
        self.start, self.end, self.next = start, end, start

    def allocate(self, size: int) -> int:
        """The guest-physical address of a new ``size``-byte BAR (aligned to ``size``)."""
        if size <= 0 or size & (size - 1):
            raise PciError(f"BAR size {size:#x} is not a power of two")
        addr = (self.next + size - 1) & ~(size - 1)
        if addr + size > self.end:
            raise PciError(f"no room for a {size:#x}-byte BAR in the PCI MMIO window {self.start:#x}-{self.end:#x}")
        self.next = addr + size
        return addr


class IntxPin:
    """One IOAPIC input shared by the INTx# outputs of several PCI functions. INTx# is level-sensitive and
    wire-ORed (PCI Local Bus 3.0 §2.2.6), so the pin is high while any function asserts it; ``fn(gsi, level)``
    (KVM_IRQ_LINE) sees only changes of the OR. Thread-safe."""

    def __init__(self, gsi: int, fn: Callable[[int, int], None]):
        self.gsi, self._fn = gsi, fn
        self._asserted: set[int] = set()
        self._sources = 0
        self._lock = threading.Lock()

    def line(self) -> CallbackIrqLine:
        """A new function's INTx# output on this pin (an ``IrqLine``)."""
        source, self._sources = self._sources, self._sources + 1
        return CallbackIrqLine(self.gsi, lambda _gsi, level: self._drive(source, level))

    @property
    def level(self) -> bool:
        return bool(self._asserted)

    def _drive(self, source: int, level: int) -> None:
        with self._lock:
            before = bool(self._asserted)
            (self._asserted.add if level else self._asserted.discard)(source)
            if bool(self._asserted) != before:
                self._fn(self.gsi, int(not before))


class VirtioPciBoard:
    """Places virtio devices on PCI bus 0 as firmware would (there is none): each ``add`` takes the next free slot
    (1, 2, ...), programs BAR 0 from the MMIO window and the Interrupt Line register, wires INTA# to IOAPIC pin
    16 + slot % 8 and MSI-X vectors through ``msi`` (KVM_SET_GSI_ROUTING + KVM_IRQFD), gives the queue
    notifications ioeventfds, and maps BAR 0 on ``mmio`` whenever the guest enables memory decoding (the command
    register is left as at reset: Linux's pci_enable_device sets PCI_COMMAND_MEMORY, and with no ACPI it keeps
    the BAR addresses it finds, arch/x86/pci/i386.c pcibios_allocate_dev_resources).

    ``pci_irqs`` lists ``(slot, INTA, pin)`` for ``popek.boot.mptable.write_mptable``, so Linux routes INTA#.

    :param vm: the VM fd (KVM_IRQ_LINE for INTx, KVM_IOEVENTFD for notifications).
    :param mem: guest RAM. :param pci: bus 0. :param mmio: the MMIO bus. :param msi: the VM's GSI router.
    :param window: where BARs go (default PCI_MMIO_START..PCI_MMIO_END).
    """

    def __init__(self, vm: VmIrqs, mem: GuestMemory, pci: PciBus, mmio: Bus, msi: MsiRouter,
                 window: MmioWindow | None = None):
        self.vm, self.mem, self.pci, self.mmio, self.msi = vm, mem, pci, mmio, msi
        self.window = window or MmioWindow()
        self.devices: list[VirtioPciDevice] = []
        self.pci_irqs: list[tuple[int, int, int]] = []
        self._pins: dict[int, IntxPin] = {}

    def add(self, device: VirtioDevice) -> VirtioPciDevice:
        """Put ``device`` on the bus; on failure it is closed (if it has ``close``) and nothing is left on the bus.

        :raises PciError: if bus 0 has no free slot or the MMIO window no room; VirtioError from the transport;
            KvmError if KVM refuses an irqfd.
        """
        try:
            slot = next((s for s in range(1, 32) if self.pci.get(s) is None), None)
            if slot is None:
                raise PciError(f"PCI bus 0 has no free slot for {device.name}")
            pin = FIRST_PCI_INTX_PIN + slot % PCI_INTX_PINS
            intx = self._pins.setdefault(pin, IntxPin(pin, self.vm.irq_line)).line()
            address = self.window.allocate(BAR_SIZE)
            dev = VirtioPciDevice(device, self.mem, self.msi.allocate, irq=intx, vm=self.vm)
        except BaseException:
            _close_model(device)
            raise
        dev.set_bar_address(BAR_INDEX, address)
        dev.config_write(PCI_INTERRUPT_LINE, 1, pin)
        self.pci.add(dev, slot)
        dev.attach(self.mmio)
        self.devices.append(dev)
        self.pci_irqs.append((slot, INTA, pin))
        log.info("%s at 00:%02x.0, BAR 0 %#x, INTA# IOAPIC pin %d", device.name, slot, address, pin)
        return dev

    def close(self) -> None:
        """Stop every device (unmap BAR 0, remove ioeventfds, join threads, reset) and close its backing (image
        files). The MSI-X vectors are the router's (``MsiRouter.close``)."""
        for dev in self.devices:
            try:
                dev.close()
            finally:
                _close_model(dev.device)
        self.devices.clear()


def _close_model(device: VirtioDevice) -> None:
    close = getattr(device, "close", None)
    if close is not None:
        close()


def add_virtio_devices(board: VirtioPciBoard, drives: Iterable[DriveLike], *, rng: bool = True,
                       nets: Iterable = (), vsock: VsockLike | None = None,
                       balloon: BalloonLike | None = None) -> None:
    """Add a virtio-blk device per drive (in order: the first is /dev/vda), a virtio-net device per ``nets`` entry
    (``popek.net.iface.NetConfig``: its tap is created now, ``popek.net.iface.open_net``, and removed when the
    board closes), then virtio-rng if ``rng``, then virtio-vsock if ``vsock`` (``popek.vm.VsockConfig``: its
    Unix socket is bound now and removed when the board closes), then virtio-balloon if ``balloon``
    (``popek.vm.BalloonConfig``).

    :raises VirtioError: for a drive image that cannot be used as asked (missing, read-only asked read-write, bad
        serial), a tap that cannot be created; PciError when the bus or window is full.
    """
    for d in drives:
        board.add(Block(d.path, readonly=d.readonly, serial=d.serial))
    if nets:
        from popek.net.iface import open_net  # pyroute2 is imported only for VMs with a network

        for n in nets:
            board.add(open_net(n))
    if rng:
        board.add(Rng())
    if vsock is not None:
        board.add(Vsock(vsock.guest_cid, vsock.uds_path))
    if balloon is not None:
        board.add(Balloon(balloon.amount_mib * PAGES_PER_MIB, deflate_on_oom=balloon.deflate_on_oom,
                          stats_interval_s=balloon.stats_polling_interval_s,
                          free_page_reporting=balloon.free_page_reporting))
