"""The modern virtio-pci transport (VIRTIO 1.2 §4.1) driven as Linux's virtio_pci_modern driver drives it: capability
walk, status handshake, feature halves, queue setup, notify, MSI-X (PCI 3.0 §6.8.2) with masking and pending bits,
INTx with ISR read-to-clear, reset, DEVICE_NEEDS_RESET, the PCI config access capability, BAR moves, ioeventfds,
snapshots. No KVM: MSI-X vectors come from a real MsiRouter over a recording fake VM."""

from __future__ import annotations

import os
import struct
import threading

import pytest

from popek.bus import Bus
from popek.devices.pci import (PCI_COMMAND, PCI_COMMAND_INTX_DISABLE, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY,
                               PCI_STATUS_INTERRUPT)
from popek.devices.virtio import pci as vp
from popek.devices.virtio.device import VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VirtioDevice
from popek.devices.virtio.rng import Rng
from popek.irq import MsiRouter, RecordingIrqLine
from popek.memory import GuestMemory
from test_virtqueue import FakeDriver

BAR = 0xE000_0000
ACK, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET = 1, 2, 4, 8, 0x40
MSI_ADDRESS = 0xFEE0_0000
C = {name: off for name, (off, _) in vp.COMMON_CFG.items()}


class FakeVm:
    """Records what MsiRouter and the transport ask of KVM (routing tables, irqfds, ioeventfds)."""

    def __init__(self):
        self.tables: list[list[tuple]] = []
        self.irqfds: list[tuple[int, int, bool]] = []
        self.ioeventfds: list[tuple[int, int, int, bool]] = []

    def set_gsi_routing(self, entries):
        self.tables.append([(e.gsi, e.type, e.u.msi.address_lo, e.u.msi.data) for e in entries])

    def irqfd(self, fd, gsi, deassign=False, resample_fd=None):
        self.irqfds.append((fd, gsi, deassign))

    def ioeventfd(self, fd, addr, length, *, pio=False, datamatch=None, deassign=False):
        self.ioeventfds.append((fd, addr, length, deassign))


def fired(vector) -> int:
    """How many times the vector's eventfd was written since the last look (what KVM's irqfd would consume)."""
    try:
        return os.eventfd_read(vector.eventfd)
    except BlockingIOError:
        return 0


class ConfigDevice(VirtioDevice):
    """A one-queue test device (ID 4 like rng) with 8 bytes of configuration; requests are filled with 0x5A, and
    ``gate`` (if set) holds each request until released."""

    device_id = 4
    name = "test-config"

    def __init__(self):
        super().__init__(0, b"\x11\x22\x33\x44\x55\x66\x77\x88", [64])
        self.gate: threading.Event | None = None
        self.started = threading.Event()

    def handle_chain(self, index, chain):
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(5)
        return chain.write(0, b"\x5a" * chain.write_len)


class LinuxDriver:
    """The driver side, following Linux 6.1: vp_modern_probe (capability walk), virtio_dev_probe (status and
    features), vp_modern_find_vqs/setup_vq (queues, vectors), vp_notify (16-bit write of the queue index)."""

    def __init__(self, dev: vp.VirtioPciDevice, bus: Bus, mem: GuestMemory, bar: int = BAR):
        self.dev, self.bus, self.mem = dev, bus, mem
        dev.set_bar_address(0, bar)  # what firmware / the VMM does before the guest runs, then pci_enable_device
        dev.config_write(PCI_COMMAND, 2, dev.config_read(PCI_COMMAND, 2) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)
        self.bar = bar
        self.caps: dict[int, tuple[int, int, int]] = {}  # cfg_type -> (cap offset, bar offset, length)
        self.msix = None
        pos = dev.config_read(0x34, 1)
        while pos:
            cap_id, nxt = dev.config_read(pos, 1), dev.config_read(pos + 1, 1)
            if cap_id == vp.PCI_CAP_ID_VNDR:
                cfg_type, bar_index = dev.config_read(pos + 3, 1), dev.config_read(pos + 4, 1)
                assert bar_index == 0
                self.caps.setdefault(cfg_type, (pos, dev.config_read(pos + 8, 4), dev.config_read(pos + 12, 4)))
            elif cap_id == vp.PCI_CAP_ID_MSIX:
                self.msix = pos
            pos = nxt
        notify_cap = self.caps[vp.VIRTIO_PCI_CAP_NOTIFY_CFG][0]
        self.multiplier = dev.config_read(notify_cap + 16, 4)
        self.queue = FakeDriver(mem, size=16, heap=0x10000)

    # register access through the MMIO bus at the BAR, as the guest's ioread/iowrite do
    def _addr(self, cfg_type: int, off: int) -> int:
        return self.bar + self.caps[cfg_type][1] + off

    def rd(self, field: str, size: int | None = None) -> int:
        size = size or vp.COMMON_CFG[field][1]
        return int.from_bytes(self.bus.read(self._addr(vp.VIRTIO_PCI_CAP_COMMON_CFG, C[field]), size), "little")

    def wr(self, field: str, value: int, size: int | None = None) -> None:
        size = size or vp.COMMON_CFG[field][1]
        self.bus.write(self._addr(vp.VIRTIO_PCI_CAP_COMMON_CFG, C[field]), value.to_bytes(size, "little"))

    def wr64(self, field: str, value: int) -> None:  # vp_iowrite64_twopart: low dword, then high dword
        base = self._addr(vp.VIRTIO_PCI_CAP_COMMON_CFG, C[field])
        self.bus.write(base, (value & 0xFFFF_FFFF).to_bytes(4, "little"))
        self.bus.write(base + 4, (value >> 32).to_bytes(4, "little"))

    def isr(self) -> int:
        return self.bus.read(self._addr(vp.VIRTIO_PCI_CAP_ISR_CFG, 0), 1)[0]

    def status(self) -> int:
        return self.rd("device_status")

    def add_status(self, bits: int) -> None:
        self.wr("device_status", self.status() | bits)

    # MSI-X (Linux msix_capability_init): enable with the function masked, program entries, unmask
    def msix_ctrl(self, value: int) -> None:
        self.dev.config_write(self.msix + 2, 2, value)

    def entry_addr(self, i: int) -> int:
        table = self.dev.config_read(self.msix + 4, 4)
        assert table & 7 == 0  # BIR 0
        return self.bar + (table & ~7) + 16 * i

    def program_vector(self, i: int, data: int, masked: bool = False) -> None:
        a = self.entry_addr(i)
        self.bus.write(a, MSI_ADDRESS.to_bytes(4, "little"))
        self.bus.write(a + 4, bytes(4))
        self.bus.write(a + 8, data.to_bytes(4, "little"))
        self.bus.write(a + 12, (1 if masked else 0).to_bytes(4, "little"))

    def pba(self) -> int:
        pba = self.dev.config_read(self.msix + 8, 4)
        return int.from_bytes(self.bus.read(self.bar + (pba & ~7), 8), "little")

    def enable_msix(self, nvectors: int) -> None:
        self.msix_ctrl(vp.PCI_MSIX_FLAGS_ENABLE | vp.PCI_MSIX_FLAGS_MASKALL)
        for i in range(nvectors):
            self.program_vector(i, 0x40 + i)
        self.msix_ctrl(vp.PCI_MSIX_FLAGS_ENABLE)

    def features(self) -> int:
        self.wr("device_feature_select", 0)
        lo = self.rd("device_feature")
        self.wr("device_feature_select", 1)
        return self.rd("device_feature") << 32 | lo

    def negotiate(self, features: int) -> bool:
        self.wr("device_status", 0)
        assert self.status() == 0
        self.add_status(ACK)
        self.add_status(DRIVER)
        for sel in (0, 1):
            self.wr("driver_feature_select", sel)
            self.wr("driver_feature", features >> 32 * sel & 0xFFFF_FFFF)
        self.add_status(FEATURES_OK)
        return bool(self.status() & FEATURES_OK)

    def setup_queue(self, index: int = 0, vector: int | None = None) -> int:
        q = self.queue
        self.wr("queue_select", index)
        assert self.rd("queue_size") >= q.size and self.rd("queue_enable") == 0
        self.wr("queue_size", q.size)
        self.wr64("queue_desc", q.desc)
        self.wr64("queue_driver", q.avail)
        self.wr64("queue_device", q.used_ring)
        if vector is not None:
            self.wr("queue_msix_vector", vector)
            assert self.rd("queue_msix_vector") == vector
        return self.rd("queue_notify_off")

    def bring_up(self, msix: bool = True, features: int | None = None) -> None:
        nvec = self.dev.config_read(self.msix + 2, 2) & vp.PCI_MSIX_FLAGS_QSIZE
        if msix:
            self.enable_msix(nvec + 1)
        assert self.negotiate(self.features() if features is None else features)
        if msix:
            self.wr("config_msix_vector", 0)
            assert self.rd("config_msix_vector") == 0
        self.notify_off = self.setup_queue(0, 1 if msix else None)
        self.wr("queue_enable", 1)
        self.add_status(DRIVER_OK)

    def notify(self, index: int = 0) -> None:
        self.bus.write(self._addr(vp.VIRTIO_PCI_CAP_NOTIFY_CFG, self.notify_off * self.multiplier),
                       index.to_bytes(2, "little"))

    def request(self, n: int = 32) -> int:
        self.queue.set_used_event(self.queue.avail_idx)  # EVENT_IDX: interrupt me when this buffer is used
        head = self.queue.add([], [n], fill=0)
        self.queue.kick()
        self.notify()
        assert self.dev.device.wait_idle(5)
        return head


@pytest.fixture
def env():
    """(transport, driver, INTx line, fake VM) for a virtio-rng on an MMIO bus, torn down after the test."""
    made = []

    def make(device: VirtioDevice | None = None, vm: FakeVm | None = None, **kw):
        mem = GuestMemory([(0, 0x100000)])
        fvm = FakeVm()
        irq = RecordingIrqLine(11)
        dev = vp.VirtioPciDevice(device or Rng(), mem, MsiRouter(fvm).allocate, irq=irq, vm=vm, **kw)
        bus = Bus("mmio")
        dev.attach(bus)
        made.append((dev, mem))
        return dev, LinuxDriver(dev, bus, mem), irq, fvm

    yield make
    for dev, mem in made:
        dev.close()
        mem.close()


# ---- discovery ----------------------------------------------------------------------------------------------------

def test_pci_identity_is_modern_virtio_vendor_1af4_device_1040_plus_id_revision_1(env):
    dev, _, _, _ = env()
    assert (dev.config_read(0, 2), dev.config_read(2, 2), dev.config_read(8, 1)) == (0x1AF4, 0x1044, 1)
    assert dev.config_read(0x2C, 2) == 0x1AF4 and dev.config_read(0x2E, 2) >= 0x40  # §4.1.2.1 subsystem
    assert dev.config_read(8, 4) >> 8 == 0xFF0000  # rng: no PCI class of its own
    assert dev.config_read(0x3D, 1) == 1  # INTA#
    assert dev.config_read(0x10, 4) & 0x7 == 0x4  # BAR 0: 64-bit memory
    dev.config_write(0x10, 4, 0xFFFF_FFFF)
    assert dev.config_read(0x10, 4) & ~0xF == (~(vp.BAR_SIZE - 1)) & 0xFFFF_FFF0  # sizing probe


@pytest.mark.parametrize("device_id,class_code", [(1, 0x020000), (2, 0x010000), (4, 0xFF0000), (9, 0xFF0000)])
def test_class_code_follows_the_virtio_device_type(device_id, class_code):
    class D(VirtioDevice):
        pass
    D.device_id = device_id
    with GuestMemory([(0, 0x10000)]) as mem:
        dev = vp.VirtioPciDevice(D(0, b"", [8]), mem, MsiRouter(FakeVm()).allocate, irq=RecordingIrqLine())
        assert dev.config_read(8, 4) >> 8 == class_code and dev.config_read(2, 2) == 0x1040 + device_id


def test_capability_walk_finds_every_virtio_structure_and_msix_in_bar_0(env):
    dev, drv, _, _ = env(ConfigDevice())
    assert {t: c[1:] for t, c in drv.caps.items()} == {
        vp.VIRTIO_PCI_CAP_COMMON_CFG: (0x0000, 0x38), vp.VIRTIO_PCI_CAP_NOTIFY_CFG: (0x3000, 4),
        vp.VIRTIO_PCI_CAP_ISR_CFG: (0x1000, 1), vp.VIRTIO_PCI_CAP_DEVICE_CFG: (0x2000, 8),
        vp.VIRTIO_PCI_CAP_PCI_CFG: (0, 0)}
    assert drv.multiplier == 4
    assert drv.msix is not None
    ctrl = dev.config_read(drv.msix + 2, 2)
    assert ctrl & vp.PCI_MSIX_FLAGS_QSIZE == 1  # 2 vectors: config + one queue
    assert dev.config_read(drv.msix + 4, 4) == 0x4000 and dev.config_read(drv.msix + 8, 4) == 0x5000
    # device configuration is read through BAR 0 at the device cap's offset
    assert drv.bus.read(BAR + 0x2000 + 2, 4) == b"\x33\x44\x55\x66"


def test_device_without_configuration_has_no_device_cfg_capability(env):
    _, drv, _, _ = env(Rng())
    assert vp.VIRTIO_PCI_CAP_DEVICE_CFG not in drv.caps


# ---- initialization and the request path -----------------------------------------------------------------------

def test_features_are_offered_in_two_32_bit_halves_and_select_2_reads_zero(env):
    dev, drv, _, _ = env()
    assert drv.features() == dev.device.features
    drv.wr("device_feature_select", 2)
    assert drv.rd("device_feature") == 0


def test_linux_style_bring_up_completes_an_rng_request_and_fires_the_queue_msix_vector(env):
    dev, drv, irq, fvm = env()
    drv.bring_up(msix=True)
    assert drv.status() == ACK | DRIVER | FEATURES_OK | DRIVER_OK
    assert dev.device.active
    assert dev.device.acked_features == dev.device.features
    assert dev.device.queues[0].event_idx  # EVENT_IDX negotiated -> the Virtqueue uses it
    # MSI-X routes for both vectors were pushed once unmasked: GSI 24 (config) and 25 (queue)
    assert {(g, d) for g, t, a, d in fvm.tables[-1] if t == 2} == {(24, 0x40), (25, 0x41)}
    assert fired(dev.vectors[0]) == 0 and fired(dev.vectors[1]) == 0
    head = drv.request(32)
    used = drv.queue.used()
    assert used == [(head, 32)] and drv.queue.written(head)[0] != bytes(32)
    assert fired(dev.vectors[1]) == 1 and fired(dev.vectors[0]) == 0
    assert irq.events == [] and drv.isr() == 0  # MSI-X: no INTx, no ISR queue bit


def test_intx_path_sets_isr_bit_0_raises_the_line_and_isr_read_clears_both(env):
    dev, drv, irq, _ = env()
    drv.bring_up(msix=False)
    head = drv.request(8)
    assert drv.queue.used() == [(head, 8)]
    assert irq.events == [1] and dev.config_read(6, 2) & PCI_STATUS_INTERRUPT
    assert drv.isr() == vp.VIRTIO_PCI_ISR_QUEUE
    assert irq.events == [1, 0] and not dev.config_read(6, 2) & PCI_STATUS_INTERRUPT
    assert drv.isr() == 0 and irq.events == [1, 0]
    assert all(fired(v) == 0 for v in dev.vectors)


def test_intx_disable_in_the_command_register_keeps_the_line_low_but_isr_still_set(env):
    dev, drv, irq, _ = env()
    dev.config_write(PCI_COMMAND, 2, dev.config_read(PCI_COMMAND, 2) | PCI_COMMAND_INTX_DISABLE)
    drv.bring_up(msix=False)
    drv.request(8)
    assert irq.events == [] and dev.config_read(6, 2) & PCI_STATUS_INTERRUPT
    dev.config_write(PCI_COMMAND, 2, dev.config_read(PCI_COMMAND, 2) & ~PCI_COMMAND_INTX_DISABLE)
    assert irq.events == [1]
    assert drv.isr() == 1 and irq.events == [1, 0]


def test_features_ok_is_refused_for_unoffered_bits_or_a_driver_without_version_1(env):
    dev, drv, _, _ = env()
    assert not drv.negotiate(1 << VIRTIO_F_VERSION_1 | 1 << 7)
    assert drv.status() == ACK | DRIVER and dev.device.acked_features == 0
    assert not drv.negotiate(1 << VIRTIO_RING_F_EVENT_IDX)
    assert drv.negotiate(1 << VIRTIO_F_VERSION_1)
    assert drv.rd("driver_feature") == 1  # select is still 1: the high half holds VERSION_1 (bit 32)
    drv.wr("driver_feature_select", 0)
    assert drv.rd("driver_feature") == 0


def test_driver_ok_without_features_ok_is_not_taken(env):
    dev, drv, _, _ = env()
    drv.add_status(ACK | DRIVER)
    drv.add_status(DRIVER_OK)
    assert drv.status() == ACK | DRIVER and not dev.device.active


def test_msix_vector_numbers_beyond_the_table_read_back_no_vector(env):
    dev, drv, _, _ = env()
    drv.wr("config_msix_vector", 2)
    assert drv.rd("config_msix_vector") == vp.VIRTIO_MSI_NO_VECTOR
    drv.wr("queue_select", 0)
    drv.wr("queue_msix_vector", 7)
    assert drv.rd("queue_msix_vector") == vp.VIRTIO_MSI_NO_VECTOR
    drv.wr("queue_select", 5)  # no such queue
    assert drv.rd("queue_size") == 0


def test_queue_registers_read_back_and_64_bit_addresses_take_two_dword_writes(env):
    dev, drv, _, _ = env()
    drv.wr("queue_select", 0)
    assert drv.rd("queue_size") == 256 and drv.rd("queue_notify_off") == 0
    drv.wr64("queue_desc", 0x1_2345_6780)
    drv.wr("queue_size", 16)
    assert drv.rd("queue_desc", 8) == 0x1_2345_6780 and dev.queues[0].desc == 0x1_2345_6780
    assert drv.rd("queue_size") == 16
    assert drv.rd("num_queues") == 1


# ---- reset and failures ----------------------------------------------------------------------------------------

def test_reset_while_a_request_is_in_flight_waits_for_it_then_clears_everything(env):
    device = ConfigDevice()
    dev, drv, _, _ = env(device)
    drv.bring_up(msix=True)
    device.gate = threading.Event()
    drv.queue.add([], [8], fill=0)
    drv.queue.kick()
    drv.notify()
    assert device.started.wait(5)
    done = threading.Event()
    t = threading.Thread(target=lambda: (drv.wr("device_status", 0), done.set()))
    t.start()
    assert not done.wait(0.2)  # the in-flight request holds the reset
    device.gate.set()
    assert done.wait(5)
    t.join()
    assert drv.status() == 0 and not device.active
    drv.wr("queue_select", 0)
    assert (drv.rd("queue_size"), drv.rd("queue_enable"), drv.rd("queue_desc", 8)) == (64, 0, 0)
    assert drv.rd("queue_msix_vector") == vp.VIRTIO_MSI_NO_VECTOR == drv.rd("config_msix_vector")
    assert drv.features() == device.features and device.acked_features == 0
    # a notify after the reset touches nothing
    used_before = drv.mem.read_u16(drv.queue.used_ring + 2)
    drv.queue.add([], [8])
    drv.queue.kick()
    drv.notify()
    assert device.wait_idle(1) and drv.mem.read_u16(drv.queue.used_ring + 2) == used_before


def test_device_can_be_brought_up_again_after_a_reset(env):
    dev, drv, _, _ = env()
    drv.bring_up(msix=True)
    drv.request()
    drv.queue = FakeDriver(drv.mem, size=16, base=0x3000, heap=0x20000)
    drv.msix_ctrl(0)  # and back to INTx
    drv.bring_up(msix=False)  # negotiate() starts with a reset
    head = drv.request(4)
    assert drv.queue.used() == [(head, 4)] and drv.isr() == 1


def test_hostile_chain_sets_device_needs_reset_and_sends_a_config_interrupt(env):
    dev, drv, _, _ = env()
    drv.bring_up(msix=True)
    generation = drv.rd("config_generation")
    q = drv.queue
    q.write_desc(q.desc, 0, 0x20000, 8, 2 | 1, 0)  # WRITE|NEXT pointing at itself: a loop
    q.place(0)
    q.kick()
    drv.notify()
    assert dev.device.wait_idle(5)
    assert drv.status() & NEEDS_RESET and drv.status() & DRIVER_OK
    assert fired(dev.vectors[0]) == 1  # config vector
    assert drv.rd("config_generation") == (generation + 1) & 0xFF
    assert drv.isr() & vp.VIRTIO_PCI_ISR_CONFIG
    drv.wr("device_status", 0)
    assert drv.status() == 0  # the driver's reset recovers


def test_hostile_chain_with_intx_sets_isr_config_bit_and_raises_the_line(env):
    dev, drv, irq, _ = env()
    drv.bring_up(msix=False)
    q = drv.queue
    q.write_desc(q.desc, 0, 0x20000, 8, 2 | 1, 0)
    q.place(0)
    q.kick()
    drv.notify()
    assert dev.device.wait_idle(5)
    assert drv.status() & NEEDS_RESET and irq.events == [1]
    assert drv.isr() == vp.VIRTIO_PCI_ISR_CONFIG and irq.events == [1, 0]


def test_ring_outside_guest_ram_at_driver_ok_sets_needs_reset(env):
    dev, drv, _, _ = env()
    drv.enable_msix(2)
    assert drv.negotiate(drv.features())
    drv.wr("config_msix_vector", 0)
    drv.setup_queue(0, 1)
    drv.wr64("queue_desc", 0x4000_0000)
    drv.wr("queue_enable", 1)
    drv.add_status(DRIVER_OK)
    assert drv.status() & NEEDS_RESET and not dev.device.active
    assert "not in guest RAM" in dev.failure and fired(dev.vectors[0]) == 1
    drv.wr("device_status", 0)
    assert drv.status() == 0 and dev.failure is None


def test_queue_not_enabled_before_driver_ok_sets_needs_reset(env):
    dev, drv, _, _ = env()
    assert drv.negotiate(drv.features())
    drv.setup_queue(0)
    drv.add_status(DRIVER_OK)
    assert drv.status() & NEEDS_RESET and "not enabled" in dev.failure


def test_config_change_bumps_config_generation_and_fires_the_config_vector(env):
    device = ConfigDevice()
    dev, drv, _, _ = env(device)
    drv.bring_up(msix=True)
    g = drv.rd("config_generation")
    device.config[0] = 0x99
    device._config_changed()  # what a device calls when its configuration changes
    assert drv.rd("config_generation") == g + 1
    assert drv.bus.read(BAR + 0x2000, 1) == b"\x99" and fired(dev.vectors[0]) == 1


# ---- MSI-X masking ------------------------------------------------------------------------------------------

def test_masked_vector_sets_its_pending_bit_and_unmasking_delivers_it_once(env):
    dev, drv, _, _ = env()
    drv.bring_up(msix=True)
    a = drv.entry_addr(1)
    drv.bus.write(a + 12, (1).to_bytes(4, "little"))  # mask the queue's vector
    drv.request()
    assert fired(dev.vectors[1]) == 0 and drv.pba() == 0b10
    drv.bus.write(a + 12, bytes(4))
    assert fired(dev.vectors[1]) == 1 and drv.pba() == 0
    drv.bus.write(a + 12, bytes(4))
    assert fired(dev.vectors[1]) == 0


def test_function_mask_holds_every_vector_pending_until_cleared(env):
    dev, drv, _, _ = env()
    drv.bring_up(msix=True)
    drv.msix_ctrl(vp.PCI_MSIX_FLAGS_ENABLE | vp.PCI_MSIX_FLAGS_MASKALL)
    drv.request()
    assert fired(dev.vectors[1]) == 0 and drv.pba() == 0b10
    drv.msix_ctrl(vp.PCI_MSIX_FLAGS_ENABLE)
    assert fired(dev.vectors[1]) == 1 and drv.pba() == 0


def test_msix_table_entries_read_back_and_reserved_control_bits_stay_zero(env):
    dev, drv, _, _ = env()
    a = drv.entry_addr(1)
    assert drv.bus.read(a + 12, 4) == b"\x01\0\0\0"  # masked at reset
    drv.bus.write(a, struct.pack("<QII", 0xFEE0_1000, 0x4055, 0xFFFF_FFFE))
    assert struct.unpack("<QII", drv.bus.read(a, 16)) == (0xFEE0_1000, 0x4055, 0)
    assert drv.dev.config_read(drv.msix + 2, 2) & 0x3FFF == 1  # table size is read-only
    drv.dev.config_write(drv.msix + 2, 2, 0x3FFF)
    assert drv.dev.config_read(drv.msix + 2, 2) == 1


def test_vector_address_change_while_unmasked_pushes_a_new_route(env):
    dev, drv, _, fvm = env()
    drv.bring_up(msix=True)
    n = len(fvm.tables)
    drv.bus.write(drv.entry_addr(1) + 8, (0x77).to_bytes(4, "little"))
    assert len(fvm.tables) == n + 1 and (25, 2, MSI_ADDRESS, 0x77) in fvm.tables[-1]


# ---- PCI config access capability, BAR moves, ioeventfds -----------------------------------------------------

def test_pci_cfg_capability_reads_and_writes_bar_0_through_config_space(env):
    dev, drv, _, _ = env()
    cap = drv.caps[vp.VIRTIO_PCI_CAP_PCI_CFG][0]

    def window(off, length):
        dev.config_write(cap + 4, 1, 0)
        dev.config_write(cap + 8, 4, off)
        dev.config_write(cap + 12, 4, length)
    window(C["num_queues"], 2)
    assert dev.config_read(cap + 16, 2) == 1
    window(C["device_status"], 1)
    dev.config_write(cap + 16, 1, ACK)
    assert drv.status() == ACK
    window(C["device_status"], 3)  # invalid length: ignored
    dev.config_write(cap + 16, 1, 0)
    assert drv.status() == ACK


def test_bar_move_remaps_the_registers_and_disabling_memory_decode_unmaps_them(env):
    dev, drv, _, _ = env()
    assert drv.bus.read(BAR + C["num_queues"], 2) == b"\x01\0"
    dev.set_bar_address(0, 0x1_0000_0000)
    assert drv.bus.read(BAR + C["num_queues"], 2) == b"\xff\xff"
    assert drv.bus.read(0x1_0000_0000 + C["num_queues"], 2) == b"\x01\0"
    cmd = dev.config_read(PCI_COMMAND, 2)
    dev.config_write(PCI_COMMAND, 2, cmd & ~PCI_COMMAND_MEMORY)
    assert [b for b, _, _ in drv.bus.devices()] == []
    dev.config_write(PCI_COMMAND, 2, cmd)
    assert [b for b, _, _ in drv.bus.devices()] == [0x1_0000_0000]


def test_bar_moved_onto_another_device_stays_unmapped_instead_of_failing_the_config_write(env):
    dev, drv, _, _ = env()
    drv.bus.insert(0x3_0000_0000, 0x1000, object())
    dev.set_bar_address(0, 0x3_0000_0000)
    assert [b for b, _, _ in drv.bus.devices()] == [0x3_0000_0000]
    dev.set_bar_address(0, BAR)
    assert sorted(b for b, _, _ in drv.bus.devices()) == [BAR, 0x3_0000_0000]


def test_a_refused_ioeventfd_leaves_notifications_to_mmio_exits(env):
    class Refusing(FakeVm):
        def ioeventfd(self, fd, addr, length, **kw):
            raise RuntimeError("KVM_IOEVENTFD: Function not implemented")
    dev, drv, _, _ = env(vm=Refusing())
    assert dev._registered == []
    drv.bring_up(msix=True)
    head = drv.request(4)
    assert drv.queue.used() == [(head, 4)]


def test_notify_ioeventfds_follow_the_bar_and_a_signalled_eventfd_runs_the_queue(env):
    vm = FakeVm()
    dev, drv, _, _ = env(vm=vm)
    fd = dev._notify_fds[0]
    assert vm.ioeventfds == [(fd, BAR + 0x3000, 2, False)]
    dev.set_bar_address(0, 0x2_0000_0000)
    assert vm.ioeventfds[-2:] == [(fd, BAR + 0x3000, 2, True), (fd, 0x2_0000_0000 + 0x3000, 2, False)]
    drv.bar = 0x2_0000_0000
    drv.bring_up(msix=True)
    head = drv.queue.add([], [16], fill=0)
    drv.queue.kick()
    os.eventfd_write(fd, 1)  # what KVM does on the guest's notify write: no MMIO exit reaches us
    for _ in range(100):
        if drv.queue.used():
            break
        threading.Event().wait(0.02)
    else:
        pytest.fail("the ioeventfd notify did not run the queue")
    assert drv.queue.written(head)[0] != bytes(16)
    dev.close()
    assert vm.ioeventfds[-1] == (fd, 0x2_0000_0000 + 0x3000, 2, True)


# ---- snapshots --------------------------------------------------------------------------------------------------

def test_state_restore_into_a_fresh_transport_keeps_registers_vectors_and_queue_positions(env):
    dev, drv, _, _ = env()
    drv.bring_up(msix=True)
    drv.request()
    drv.queue.used()
    drv.bus.write(drv.entry_addr(1) + 12, (1).to_bytes(4, "little"))
    drv.request()
    assert drv.pba() == 0b10
    st = dev.state()
    dev.close()

    dev2 = vp.VirtioPciDevice(Rng(), drv.mem, MsiRouter(FakeVm()).allocate, irq=RecordingIrqLine())
    bus2 = Bus("mmio")
    dev2.attach(bus2)
    dev2.restore(st)
    try:
        assert dev2.device.wait_idle(5)  # the restored device looks at its queues once (maybe a spurious notify)
        drv.dev, drv.bus = dev2, bus2
        assert drv.status() == ACK | DRIVER | FEATURES_OK | DRIVER_OK and dev2.device.active
        assert drv.pba() == 0b10 and dev2.vectors[1].pending
        drv.bus.write(drv.entry_addr(1) + 12, bytes(4))
        assert fired(dev2.vectors[1]) == 1
        head = drv.request(4)
        assert drv.queue.used()[-1] == (head, 4) and fired(dev2.vectors[1]) == 1
    finally:
        dev2.close()


def test_restore_refuses_a_state_with_another_queue_count(env):
    dev, _, _, _ = env()
    st = dev.state()
    st["queues"].append(st["queues"][0])
    with pytest.raises(vp.VirtioError, match="2 queues"):
        dev.restore(st)


def test_num_vectors_outside_1_to_256_is_refused():
    with GuestMemory([(0, 0x10000)]) as mem:
        with pytest.raises(vp.VirtioError, match="1-256"):
            vp.VirtioPciDevice(Rng(), mem, MsiRouter(FakeVm()).allocate, irq=RecordingIrqLine(), num_vectors=0)
