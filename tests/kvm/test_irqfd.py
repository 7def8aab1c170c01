"""MSI routing (popek.irq.MsiRouter) and the KVM ioctls behind it: KVM_SET_GSI_ROUTING, KVM_IRQFD, KVM_IOEVENTFD,
KVM_SIGNAL_MSI — against a recording fake VM, then on the real KVM, including delivery to a tiny guest."""

from __future__ import annotations

import errno
import os
import select
import sys

import pytest

from popek.boot.x86 import setup_lapic
from popek.irq import FIRST_MSI_GSI, MsiError, MsiRouter
from popek.kvm import abi
from popek.kvm.system import KvmError

MSI_ADDRESS = 0xFEE0_0000  # destination APIC ID 0, physical mode
GUEST_VECTOR = 0x30  # the irq guest's handler; MSI data = vector, fixed delivery, edge
MMIO_BASE = 0x1000_0000  # the mmio guest's first write: 4 bytes 0x12345678 there


class FakeVm:
    """Records the routing tables and irqfd calls MsiRouter makes."""

    def __init__(self):
        self.tables: list[list[tuple[int, int, int, int]]] = []
        self.irqfds: list[tuple[int, int, bool]] = []

    def set_gsi_routing(self, entries):
        rows = []
        for e in entries:
            if e.type == abi.KVM_IRQ_ROUTING_IRQCHIP:
                rows.append((e.gsi, e.type, e.u.irqchip.irqchip, e.u.irqchip.pin))
            else:
                rows.append((e.gsi, e.type, e.u.msi.address_hi << 32 | e.u.msi.address_lo, e.u.msi.data))
        self.tables.append(rows)

    def irqfd(self, fd, gsi, deassign=False, resample_fd=None):
        self.irqfds.append((fd, gsi, deassign))


def counter(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


# ---- MsiRouter without KVM ----------------------------------------------------------------------------------------

def test_routing_table_keeps_kvm_default_irqchip_routes_for_gsi_0_to_23():
    vm = FakeVm()
    MsiRouter(vm).set_routing()
    table = vm.tables[-1]
    assert len(table) == 16 * 2 + 8
    pics = (abi.KVM_IRQCHIP_PIC_MASTER, abi.KVM_IRQCHIP_PIC_SLAVE)
    pic = [(g, chip, pin) for g, t, chip, pin in table if chip in pics]
    ioapic = [(g, pin) for g, t, chip, pin in table if chip == abi.KVM_IRQCHIP_IOAPIC]
    assert pic == [(g, 0 if g < 8 else 1, g % 8) for g in range(16)]
    assert ioapic == [(g, g) for g in range(24)]
    assert {t for _, t, _, _ in table} == {abi.KVM_IRQ_ROUTING_IRQCHIP}


def test_allocate_binds_an_eventfd_to_the_next_gsi_from_24_without_a_route():
    vm = FakeVm()
    r = MsiRouter(vm)
    a, b = r.allocate(), r.allocate()
    assert (a.gsi, b.gsi) == (FIRST_MSI_GSI, FIRST_MSI_GSI + 1) == (24, 25)
    assert vm.irqfds == [(a.eventfd, 24, False), (b.eventfd, 25, False)]
    assert vm.tables == [] and a.masked
    r.close()


def test_unmasking_pushes_the_msi_route_once_and_a_changed_message_pushes_again():
    vm = FakeVm()
    r = MsiRouter(vm)
    v = r.allocate()
    v.update(0x1_FEE0_1000, 0x4041, masked=True)
    assert vm.tables == []  # masked: nothing routed yet
    v.update(0x1_FEE0_1000, 0x4041, masked=False)
    assert vm.tables[-1][-1] == (24, abi.KVM_IRQ_ROUTING_MSI, 0x1_FEE0_1000, 0x4041)
    v.update(0x1_FEE0_1000, 0x4041, masked=False)
    assert len(vm.tables) == 1
    v.update(MSI_ADDRESS, 0x4042, masked=False)
    assert len(vm.tables) == 2 and vm.tables[-1][-1] == (24, abi.KVM_IRQ_ROUTING_MSI, MSI_ADDRESS, 0x4042)
    r.close()


def test_trigger_writes_the_eventfd_and_a_masked_trigger_is_held_pending_until_unmask():
    r = MsiRouter(FakeVm())
    v = r.allocate()
    v.update(MSI_ADDRESS, 0x30, masked=False)
    v.trigger()
    v.trigger()
    assert counter(v.eventfd) == 2
    v.update(MSI_ADDRESS, 0x30, masked=True)
    v.trigger()
    assert v.pending and counter(v.eventfd) == 0
    v.update(MSI_ADDRESS, 0x30, masked=False)
    assert not v.pending and counter(v.eventfd) == 1
    v.update(MSI_ADDRESS, 0x30, masked=False)
    assert counter(v.eventfd) == 0  # delivered once only
    r.close()


def test_release_unbinds_the_irqfd_drops_the_route_and_reuses_the_gsi():
    vm = FakeVm()
    r = MsiRouter(vm)
    v = r.allocate()
    fd = v.eventfd
    v.update(MSI_ADDRESS, 0x30, masked=False)
    r.release(v)
    assert vm.irqfds[-1] == (fd, 24, True)
    assert all(g < 24 for g, *_ in vm.tables[-1])
    v.trigger()  # a released vector ignores triggers
    with pytest.raises(MsiError, match="released"):
        v.update(MSI_ADDRESS, 0x30, masked=False)
    assert r.allocate().gsi == 24
    r.close()


def test_allocate_raises_msi_error_when_every_gsi_is_taken():
    r = MsiRouter(FakeVm(), max_gsi=26)
    r.allocate(), r.allocate()
    with pytest.raises(MsiError, match="no free GSI.*24-25"):
        r.allocate()
    r.close()


def test_failed_irqfd_closes_the_eventfd_and_keeps_the_gsi_free():
    class Refusing(FakeVm):
        def irqfd(self, fd, gsi, deassign=False, resample_fd=None):
            raise KvmError("KVM_IRQFD: Device or resource busy", errno.EBUSY)
    r = MsiRouter(Refusing())
    with pytest.raises(KvmError, match="KVM_IRQFD"):
        r.allocate()
    assert r.vectors == {} and r._free == [24]


# ---- on /dev/kvm ----------------------------------------------------------------------------------------------


@pytest.fixture
def vm(kvm):
    v = kvm.create_vm()
    v.create_irqchip()
    yield v
    v.close()


@pytest.mark.kvm
@pytest.mark.parametrize("cap", ["KVM_CAP_IRQ_ROUTING", "KVM_CAP_IRQFD", "KVM_CAP_IOEVENTFD", "KVM_CAP_SIGNAL_MSI"])
def test_kvm_offers_the_interrupt_and_notify_capabilities_virtio_pci_uses(vm, cap):
    assert vm.check_extension(getattr(abi, cap)) > 0, f"{cap} is missing"


@pytest.mark.kvm
def test_kvm_accepts_the_default_routes_plus_an_msi_route_and_rejects_an_unknown_route_type(vm):
    r = MsiRouter(vm)
    assert vm.check_extension(abi.KVM_CAP_IRQ_ROUTING) >= len(r.entries()) + 1
    r.route(24, MSI_ADDRESS, GUEST_VECTOR)
    bad = abi.kvm_irq_routing_entry(gsi=30, type=99)
    with pytest.raises(KvmError, match="KVM_SET_GSI_ROUTING: Invalid argument"):
        vm.set_gsi_routing(r.entries() + [bad])


@pytest.mark.kvm
def test_irqfd_write_with_no_vcpu_running_is_consumed_by_kvm(vm):
    r = MsiRouter(vm)
    v = r.allocate()
    v.update(MSI_ADDRESS, GUEST_VECTOR, masked=False)
    v.trigger()
    assert v.sent == 1
    assert counter(v.eventfd) == 0  # KVM's irqfd read the eventfd as the write happened
    with pytest.raises(KvmError, match="KVM_IRQFD: Device or resource busy"):
        vm.irqfd(v.eventfd, v.gsi)  # already bound
    r.close()
    assert r.vectors == {}


@pytest.mark.kvm
def test_ioeventfd_registers_and_deassigns_on_mmio_and_pio_addresses(vm):
    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        vm.ioeventfd(fd, 0xD000_0000, 2)
        with pytest.raises(KvmError, match="File exists"):
            vm.ioeventfd(fd, 0xD000_0000, 2)
        vm.ioeventfd(fd, 0xD000_0000, 2, deassign=True)
        with pytest.raises(KvmError, match="No such file"):
            vm.ioeventfd(fd, 0xD000_0000, 2, deassign=True)
        vm.ioeventfd(fd, 0xDC, 1, pio=True, datamatch=7)
        vm.ioeventfd(fd, 0xDC, 1, pio=True, datamatch=8)  # another value is another registration
        vm.ioeventfd(fd, 0xDC, 1, pio=True, datamatch=7, deassign=True)
        vm.ioeventfd(fd, 0xDC, 1, pio=True, datamatch=8, deassign=True)
        with pytest.raises(KvmError, match="Invalid argument"):
            vm.ioeventfd(fd, 0xD000_1000, 3)
    finally:
        os.close(fd)


@pytest.mark.kvm
def test_signal_msi_returns_without_error_once_a_vcpu_exists(vm):
    with pytest.raises(KvmError, match="KVM_SIGNAL_MSI"):
        vm.signal_msi(MSI_ADDRESS, GUEST_VECTOR)  # no vCPU has APIC ID 0 yet
    fd = vm.create_vcpu(0)
    try:
        assert vm.signal_msi(MSI_ADDRESS, GUEST_VECTOR) >= 0
    finally:
        fd.close()


@pytest.mark.kvm
def test_msi_through_gsi_route_and_irqfd_runs_the_guest_handler(machine):
    m = machine("irq", irqchip=True)
    setup_lapic(m.vcpus[0])
    out, irq = m.log("PORT_OUT"), m.log("PORT_IRQ")
    r = MsiRouter(m.vm)
    v = r.allocate()
    v.update(MSI_ADDRESS, GUEST_VECTOR, masked=False)
    runner = m.runner(0)
    runner.start()
    assert out.wait(1, 5), runner.stop_detail
    for n in (1, 2):
        v.trigger()
        assert irq.wait(n, 5), f"MSI {n} not delivered: {runner.stop_detail or runner.exit_counts}"
    v.update(MSI_ADDRESS, GUEST_VECTOR, masked=True)
    v.trigger()
    assert not irq.wait(3, 0.3) and v.pending
    v.update(MSI_ADDRESS, GUEST_VECTOR, masked=False)
    assert irq.wait(3, 5)
    assert m.vm.signal_msi(MSI_ADDRESS, GUEST_VECTOR) == 1
    assert irq.wait(4, 5) and irq.values == [1, 2, 3, 4]
    r.close()


@pytest.mark.kvm
def test_guest_writes_matching_an_ioeventfd_signal_it_instead_of_exiting(machine):
    m = machine("mmio")

    class Dev:
        def __init__(self):
            self.writes = []

        def read(self, offset, size):
            return bytes(size)

        def write(self, offset, data):
            self.writes.append((offset, bytes(data)))

    dev = Dev()
    done = sys.modules["popek_test_guests"].ports()["PORT_DONE"]  # registered by tests/kvm/conftest.py
    m.mmio.insert(MMIO_BASE, 0x1000, dev)
    done_port = m.log("PORT_DONE")
    mmio_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    pio_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        m.vm.ioeventfd(mmio_fd, MMIO_BASE, 4, datamatch=0x12345678)
        m.vm.ioeventfd(pio_fd, done, 1, pio=True)
        runner = m.runner(0)
        runner.start()
        ready, _, _ = select.select([pio_fd], [], [], 5)
        assert ready, f"the guest's PORT_DONE write did not signal the ioeventfd: {runner.stop_detail}"
        assert counter(pio_fd) == 1 and done_port.values == []
        assert counter(mmio_fd) == 1
        assert dev.writes == [(8, (0x0123456789ABCDEF).to_bytes(8, "little")), (3, b"\xab")]
    finally:
        m.vm.ioeventfd(mmio_fd, MMIO_BASE, 4, datamatch=0x12345678, deassign=True)
        m.vm.ioeventfd(pio_fd, done, 1, pio=True, deassign=True)
        os.close(mmio_fd)
        os.close(pio_fd)
