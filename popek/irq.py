"""Interrupts handed to devices: INTx lines (KVM_IRQ_LINE or a test recorder) and MSI vectors (GSI routing + irqfd)."""

from __future__ import annotations

import os
import threading
from typing import Callable, Protocol

from popek.kvm import abi


class IrqLine(Protocol):
    """One interrupt input of the irqchip (a GSI). Devices call only these two methods."""

    def set_level(self, high: bool) -> None: ...

    def pulse(self) -> None: ...


class CallbackIrqLine:
    """An interrupt line that calls ``fn(gsi, level)``; the VM wires it to ``VmFd.irq_line`` (KVM_IRQ_LINE).

    Level changes are forwarded only when the level actually changes; ``pulse`` raises then lowers (edge).
    """

    def __init__(self, gsi: int, fn: Callable[[int, int], None]):
        self.gsi = gsi
        self._fn = fn
        self._level = False
        self._lock = threading.Lock()
        self.raised = 0

    @property
    def level(self) -> bool:
        return self._level

    def set_level(self, high: bool) -> None:
        with self._lock:
            if bool(high) == self._level:
                return
            self._level = bool(high)
            if high:
                self.raised += 1
            self._fn(self.gsi, 1 if high else 0)

    def pulse(self) -> None:
        with self._lock:
            self.raised += 1
            self._fn(self.gsi, 1)
            self._fn(self.gsi, 0)
            self._level = False


class RecordingIrqLine(CallbackIrqLine):
    """An interrupt line for tests: records every level it was driven to in ``events``."""

    def __init__(self, gsi: int = 0):
        self.events: list[int] = []
        super().__init__(gsi, lambda _gsi, level: self.events.append(level))


#: KVM's default routes (arch/x86/kvm/irq_comm.c default_routing, installed by KVM_CREATE_IRQCHIP): GSI 0-15 go to
#: IOAPIC pin = GSI and to the PIC (master pins 0-7, slave pins 8-15), GSI 16-23 to IOAPIC pin = GSI.
IOAPIC_PINS = 24
#: The first GSI ``MsiRouter`` hands out for MSI routes (the ones below are the IOAPIC's).
FIRST_MSI_GSI = IOAPIC_PINS
#: GSIs stay below this: every x86 KVM allows it (KVM_MAX_IRQ_ROUTES was 1024 before 4.8, now 4096; the real limit
#: is what KVM_CHECK_EXTENSION(KVM_CAP_IRQ_ROUTING) returns).
DEFAULT_MAX_GSI = 1024


class MsiError(RuntimeError):
    """No GSI left for another MSI vector, or a vector used after it was released."""


class MsiVector:
    """One MSI(-X) message source with its own GSI: an eventfd bound to the GSI by KVM_IRQFD, routed by
    ``MsiRouter`` as a KVM_IRQ_ROUTING_MSI entry. Made by ``MsiRouter.allocate``.

    ``update(address, data, masked)`` mirrors the device's MSI-X table entry (PCI Local Bus 3.0 §6.8.2.6-9);
    ``trigger()`` sends the message: it writes the eventfd (KVM injects the interrupt without a VM exit) or, while
    masked, sets ``pending`` instead; unmasking with ``pending`` set sends it then and clears the bit (the
    Pending Bit Array rule, §6.8.2.10). Thread-safe.
    """

    def __init__(self, router: "MsiRouter", gsi: int, eventfd: int):
        self.router = router
        self.gsi = gsi
        self.eventfd = eventfd
        self.address = 0
        self.data = 0
        self.masked = True  # a table entry's reset state (§6.8.2.9)
        self.pending = False
        self.sent = 0
        self._routed: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def update(self, address: int, data: int, masked: bool) -> None:
        """The message ``address`` (64-bit), ``data`` (32-bit) and whether it is masked (entry or function mask,
        or MSI-X disabled). The route is pushed to KVM when an unmasked vector's message changed; an unmask with a
        pending message sends it.

        :raises MsiError: if the vector was released; KvmError if KVM refuses the routing table.
        """
        with self._lock:
            if self.eventfd < 0:
                raise MsiError(f"MSI vector on GSI {self.gsi} was released")
            self.address, self.data, self.masked = address, data, bool(masked)
            if not masked and self._routed != (address, data):
                self.router.route(self.gsi, address, data)
                self._routed = (address, data)
            if not masked and self.pending:
                self.pending = False
                self._send()

    def trigger(self) -> None:
        """Send the message now, or set ``pending`` if masked (a released vector ignores it)."""
        with self._lock:
            if self.eventfd < 0:
                return
            if self.masked:
                self.pending = True
            else:
                self._send()

    def _send(self) -> None:  # with self._lock held
        try:
            os.eventfd_write(self.eventfd, 1)
        except BlockingIOError:  # counter at its maximum: KVM has not consumed earlier writes; one is enough
            pass
        self.sent += 1


class MsiRouter:
    """Owns the VM's GSI routing table (KVM API doc, KVM_SET_GSI_ROUTING / KVM_IRQFD): KVM's default IRQCHIP
    routes for GSI 0-23 (IOAPIC pins, and the PIC for 0-15) plus one KVM_IRQ_ROUTING_MSI route per allocated
    vector, from GSI 24 up.

    :param vm: a ``popek.kvm.system.VmFd`` (anything with ``set_gsi_routing(entries)`` and ``irqfd(fd, gsi,
        deassign=False)``), with its in-kernel irqchip already created.
    :param max_gsi: GSIs handed out stay below this.
    """

    def __init__(self, vm, max_gsi: int = DEFAULT_MAX_GSI):
        self.vm = vm
        self.max_gsi = max_gsi
        self.routes: dict[int, tuple[int, int]] = {}  # GSI -> (address, data)
        self.vectors: dict[int, MsiVector] = {}
        self._free: list[int] = []
        self._next = FIRST_MSI_GSI
        self._lock = threading.RLock()

    def entries(self) -> list[abi.kvm_irq_routing_entry]:
        """The full table as ``kvm_irq_routing_entry`` structures: the default IRQCHIP routes, then the MSI ones."""
        out = []
        for gsi in range(IOAPIC_PINS):
            out.append(_chip_entry(gsi, abi.KVM_IRQCHIP_IOAPIC, gsi))
            if gsi < 16:
                out.append(_chip_entry(gsi, abi.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else abi.KVM_IRQCHIP_PIC_SLAVE,
                                       gsi % 8))
        with self._lock:
            for gsi, (address, data) in sorted(self.routes.items()):
                e = abi.kvm_irq_routing_entry(gsi=gsi, type=abi.KVM_IRQ_ROUTING_MSI)
                e.u.msi.address_lo, e.u.msi.address_hi, e.u.msi.data = address & 0xFFFF_FFFF, address >> 32, data
                out.append(e)
        return out

    def set_routing(self) -> None:
        """Push the whole table to KVM with KVM_SET_GSI_ROUTING. :raises KvmError: if KVM refuses it."""
        with self._lock:
            self.vm.set_gsi_routing(self.entries())

    def allocate(self) -> MsiVector:
        """A new vector: the lowest free GSI >= 24, a non-blocking eventfd bound to it with KVM_IRQFD, no route yet
        (masked). This is the factory a device transport takes.

        :raises MsiError: if every GSI below ``max_gsi`` is taken; KvmError if KVM_IRQFD fails.
        """
        with self._lock:
            if self._free:
                gsi = self._free.pop(0)
            elif self._next < self.max_gsi:
                gsi, self._next = self._next, self._next + 1
            else:
                raise MsiError(f"no free GSI for an MSI vector: all of {FIRST_MSI_GSI}-{self.max_gsi - 1} are in use")
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            try:
                self.vm.irqfd(fd, gsi)
            except BaseException:
                os.close(fd)
                self._free.insert(0, gsi)
                raise
            v = self.vectors[gsi] = MsiVector(self, gsi, fd)
            return v

    def route(self, gsi: int, address: int, data: int) -> None:
        """Route ``gsi`` to the MSI (``address``, ``data``) and push the table. :raises KvmError: if KVM refuses."""
        with self._lock:
            self.routes[gsi] = (address, data)
            self.set_routing()

    def release(self, vector: MsiVector) -> None:
        """Unbind the vector's irqfd, drop its route, close its eventfd and free its GSI."""
        with vector._lock:  # never hold a vector's lock while taking the router's (update() nests the other way)
            fd, vector.eventfd = vector.eventfd, -1
        if fd < 0:
            return
        with self._lock:
            try:
                self.vm.irqfd(fd, vector.gsi, deassign=True)
            finally:
                os.close(fd)
            self.vectors.pop(vector.gsi, None)
            if self.routes.pop(vector.gsi, None) is not None:
                self.set_routing()
            self._free.append(vector.gsi)
            self._free.sort()

    def close(self) -> None:
        """Release every vector."""
        for v in list(self.vectors.values()):
            self.release(v)


def _chip_entry(gsi: int, chip: int, pin: int) -> abi.kvm_irq_routing_entry:
    e = abi.kvm_irq_routing_entry(gsi=gsi, type=abi.KVM_IRQ_ROUTING_IRQCHIP)
    e.u.irqchip.irqchip, e.u.irqchip.pin = chip, pin
    return e
