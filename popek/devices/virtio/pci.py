"""The modern virtio-pci transport (VIRTIO 1.2 §4.1): capabilities, BAR 0 registers, MSI-X, INTx, ioeventfd notify."""

from __future__ import annotations

import logging
import os
import select
import struct
import threading
from dataclasses import asdict, dataclass
from typing import Callable, Protocol

from popek.bus import Bus, BusError
from popek.devices.pci import PCI_COMMAND, PCI_COMMAND_INTX_DISABLE, PCI_STATUS, PCI_STATUS_INTERRUPT, PciDevice
from popek.devices.virtio.device import VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VirtioDevice, VirtioError
from popek.devices.virtio.queue import Virtqueue, VirtqueueError
from popek.irq import IrqLine
from popek.memory import GuestMemory

log = logging.getLogger(__name__)

# §4.1.2 PCI device discovery.
VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_PCI_DEVICE_ID_BASE = 0x1040  # + virtio device ID (non-transitional)
VIRTIO_PCI_REVISION = 1
VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
#: PCI class codes by virtio device ID (others: 0xFF0000, "unassigned class").
CLASS_CODES = {VIRTIO_ID_NET: 0x020000, VIRTIO_ID_BLOCK: 0x010000}

# §4.1.4 virtio structure PCI capabilities (struct virtio_pci_cap cfg_type).
PCI_CAP_ID_VNDR = 0x09
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

# §2.1 device status bits.
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 0x40
VIRTIO_CONFIG_S_FAILED = 0x80

# §4.1.4.5 ISR status bits.
VIRTIO_PCI_ISR_QUEUE = 1
VIRTIO_PCI_ISR_CONFIG = 2
#: §4.1.5.1.2: the vector number meaning "no MSI-X vector".
VIRTIO_MSI_NO_VECTOR = 0xFFFF

# PCI Local Bus 3.0 §6.8.2 MSI-X capability and table (Linux pci_regs.h names).
PCI_CAP_ID_MSIX = 0x11
PCI_MSIX_FLAGS_QSIZE = 0x07FF
PCI_MSIX_FLAGS_MASKALL = 0x4000
PCI_MSIX_FLAGS_ENABLE = 0x8000
PCI_MSIX_ENTRY_SIZE = 16
PCI_MSIX_ENTRY_CTRL_MASKBIT = 1

#: BAR 0 (64-bit memory, not prefetchable) layout: one 4 KiB page per structure, so the MSI-X table and PBA have
#: pages of their own (§6.8.2 recommends it).
BAR_INDEX = 0
BAR_SIZE = 0x8000
COMMON_OFFSET = 0x0000
ISR_OFFSET = 0x1000
DEVICE_OFFSET = 0x2000
NOTIFY_OFFSET = 0x3000
MSIX_TABLE_OFFSET = 0x4000
MSIX_PBA_OFFSET = 0x5000
PAGE = 0x1000
#: queue_notify_off is the queue index; a queue's notify address is NOTIFY_OFFSET + index * this (§4.1.4.4).
NOTIFY_OFF_MULTIPLIER = 4
#: The MSI-X table page holds this many 16-byte entries.
MAX_VECTORS = PAGE // PCI_MSIX_ENTRY_SIZE

#: §4.1.4.3 struct virtio_pci_common_cfg: field -> (offset, size).
COMMON_CFG = {"device_feature_select": (0x00, 4), "device_feature": (0x04, 4), "driver_feature_select": (0x08, 4),
              "driver_feature": (0x0C, 4), "config_msix_vector": (0x10, 2), "num_queues": (0x12, 2),
              "device_status": (0x14, 1), "config_generation": (0x15, 1), "queue_select": (0x16, 2),
              "queue_size": (0x18, 2), "queue_msix_vector": (0x1A, 2), "queue_enable": (0x1C, 2),
              "queue_notify_off": (0x1E, 2), "queue_desc": (0x20, 8), "queue_driver": (0x28, 8),
              "queue_device": (0x30, 8)}
COMMON_CFG_SIZE = 0x38


class MsiVectorLike(Protocol):
    """What the vector factory returns (``popek.irq.MsiVector``): mirror of one MSI-X table entry."""

    pending: bool

    def update(self, address: int, data: int, masked: bool) -> None: ...

    def trigger(self) -> None: ...


class IoEventFds(Protocol):
    """Registers ioeventfds (``popek.kvm.system.VmFd.ioeventfd``, KVM_IOEVENTFD)."""

    def ioeventfd(self, fd: int, addr: int, length: int, *, pio: bool = False, datamatch: int | None = None,
                  deassign: bool = False) -> None: ...


@dataclass
class QueueRegs:
    """The per-queue common configuration registers (§4.1.4.3): size, MSI-X vector, enable, ring addresses."""

    size: int
    msix_vector: int = VIRTIO_MSI_NO_VECTOR
    enable: int = 0
    desc: int = 0
    driver: int = 0
    device: int = 0


def _virtio_cap(cfg_type: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    # struct virtio_pci_cap (§4.1.4): cap_vndr, cap_next, cap_len, cfg_type, bar, id, padding[2], offset, length
    return struct.pack("<BBBBBBxxII", PCI_CAP_ID_VNDR, 0, 16 + len(extra), cfg_type, BAR_INDEX, 0, offset,
                       length) + extra


class VirtioPciDevice(PciDevice):
    """A virtio device on PCI, modern interface only (VIRTIO 1.2 §4.1): vendor 0x1AF4, device 0x1040 + device ID,
    revision 1, subsystem 0x1AF4:(0x1040 + device ID), class by device type (``CLASS_CODES``), INTA#.

    BAR 0 is a 32 KiB 64-bit memory BAR: common configuration at 0x0000 (0x38 bytes), ISR status at 0x1000,
    device-specific configuration at 0x2000, notifications at 0x3000 (queue i at 0x3000 + 4*i: queue_notify_off
    = i, notify_off_multiplier 4), MSI-X table at 0x4000 and PBA at 0x5000. The capability list holds the common,
    notify, ISR and device (left out when the device has no configuration) virtio capabilities, the PCI
    configuration access capability (type 5, §4.1.4) and MSI-X (PCI 3.0 §6.8.2, ``num_vectors`` entries).

    The object is the bus device of BAR 0 (``read``/``write`` take offsets into it): ``attach(mmio_bus)`` maps
    it where BAR 0 decodes and follows the guest's BAR moves. Interrupts: with MSI-X enabled, each queue's
    ``queue_msix_vector`` and ``config_msix_vector`` select a vector (from ``msi()``) that is triggered, or left
    pending while masked; otherwise ISR bits and the level-triggered INTx# line ``irq``. Notifications: a write
    to a queue's notify address calls ``device.queue_notify``; with ``vm`` each address also gets an ioeventfd
    (KVM_IOEVENTFD, 2 bytes: Linux writes the 16-bit queue index) that a thread turns into ``queue_notify``, so
    the vCPU does not leave KVM (if KVM refuses one, that queue's notifications come as MMIO exits).

    :param device: the virtio device model.
    :param mem: guest RAM (the virtqueues live there).
    :param msi: factory of MSI-X vectors (``popek.irq.MsiRouter.allocate``); called ``num_vectors`` times now.
        The caller owns the vectors (e.g. ``MsiRouter.close`` releases them).
    :param irq: the INTx# line (the VM routes INTA# of the slot to a GSI).
    :param num_vectors: MSI-X table size, 1-256; default one per queue plus one for configuration changes.
    :param vm: something with ``ioeventfd`` (a VmFd), or None for notifications through MMIO exits only.
    :raises VirtioError: for ``num_vectors`` outside 1-256, or more queues or configuration than a page holds.
    """

    def __init__(self, device: VirtioDevice, mem: GuestMemory, msi: Callable[[], MsiVectorLike], *,
                 irq: IrqLine, num_vectors: int | None = None, vm: IoEventFds | None = None):
        nq = len(device.queue_max_sizes)
        num_vectors = nq + 1 if num_vectors is None else num_vectors
        if not 1 <= num_vectors <= MAX_VECTORS:
            raise VirtioError(f"{device.name}: {num_vectors} MSI-X vectors, the transport supports 1-{MAX_VECTORS}")
        if nq * NOTIFY_OFF_MULTIPLIER > PAGE or len(device.config) > PAGE:
            raise VirtioError(f"{device.name}: {nq} queues / {len(device.config)} config bytes do not fit BAR 0")
        super().__init__(VIRTIO_PCI_VENDOR_ID, VIRTIO_PCI_DEVICE_ID_BASE + device.device_id,
                         CLASS_CODES.get(device.device_id, 0xFF0000), revision_id=VIRTIO_PCI_REVISION,
                         subsystem_vendor_id=VIRTIO_PCI_VENDOR_ID,
                         subsystem_id=VIRTIO_PCI_DEVICE_ID_BASE + device.device_id, interrupt_pin=1)
        self.device, self.mem, self.irq, self.vm = device, mem, irq, vm
        self.add_bar(BAR_INDEX, BAR_SIZE, "mem64")
        self.add_capability(_virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET, COMMON_CFG_SIZE))
        self.add_capability(_virtio_cap(VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER * nq,
                                        struct.pack("<I", NOTIFY_OFF_MULTIPLIER)))
        self.add_capability(_virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, 1))
        if device.config:
            self.add_capability(_virtio_cap(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET, len(device.config)))
        # virtio_pci_cfg_cap: bar (byte 4), offset (8), length (12) and pci_cfg_data (16) are driver-writable.
        self._cfg_cap = self.add_capability(_virtio_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, bytes(4)),
                                            bytes(4) + b"\xff" + bytes(3) + b"\xff" * 12)
        self._msix_cap = self.add_capability(
            struct.pack("<BBHII", PCI_CAP_ID_MSIX, 0, num_vectors - 1, MSIX_TABLE_OFFSET | BAR_INDEX,
                        MSIX_PBA_OFFSET | BAR_INDEX), bytes(3) + b"\xc0" + bytes(8))
        self.num_vectors = num_vectors
        self.vectors = [msi() for _ in range(num_vectors)]
        self._table = bytearray(PCI_MSIX_ENTRY_SIZE * num_vectors)
        for i in range(num_vectors):
            self._table[PCI_MSIX_ENTRY_SIZE * i + 12] = PCI_MSIX_ENTRY_CTRL_MASKBIT  # masked at reset (§6.8.2.9)
        self._lock = threading.RLock()  # registers (vCPU threads)
        self._irq_lock = threading.Lock()  # ISR, INTx, generation (also the device worker)
        self.isr = 0
        self.config_generation = 0
        self._intx = False
        self._reset_registers()
        self._bus = None
        self._mapped_at: int | None = None
        self._notify_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(nq if vm is not None else 0)]
        self._registered: list[tuple[int, int]] = []  # (eventfd, address) given to KVM_IOEVENTFD
        self._stop_fd = -1
        self._thread: threading.Thread | None = None

    def _reset_registers(self) -> None:
        self.status = 0
        self.device_feature_select = self.driver_feature_select = 0
        self.driver_features = 0
        self.msix_config = VIRTIO_MSI_NO_VECTOR
        self.queue_select = 0
        self.queues = [QueueRegs(size) for size in self.device.queue_max_sizes]
        self.failure: str | None = None  # why the transport set DEVICE_NEEDS_RESET (activation failed)

    # ---- BAR 0 as a bus device --------------------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """A guest read of ``size`` bytes at ``offset`` in BAR 0 (unused space reads 0)."""
        if offset < COMMON_OFFSET + COMMON_CFG_SIZE:
            with self._lock:
                return self._common_bytes()[offset:offset + size].ljust(size, b"\0")
        if offset == ISR_OFFSET:
            return self.read_isr().to_bytes(size, "little")
        if DEVICE_OFFSET <= offset < DEVICE_OFFSET + PAGE:
            return self.device.config_read(offset - DEVICE_OFFSET, size)
        if MSIX_TABLE_OFFSET <= offset < MSIX_TABLE_OFFSET + len(self._table):
            with self._lock:
                off = offset - MSIX_TABLE_OFFSET
                return bytes(self._table[off:off + size]).ljust(size, b"\0")
        if MSIX_PBA_OFFSET <= offset < MSIX_PBA_OFFSET + 8 * ((self.num_vectors + 63) // 64):
            bits = sum(1 << i for i, v in enumerate(self.vectors) if v.pending)
            pba = bits.to_bytes(8 * ((self.num_vectors + 63) // 64), "little")
            off = offset - MSIX_PBA_OFFSET
            return pba[off:off + size].ljust(size, b"\0")
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        """A guest write at ``offset`` in BAR 0 (read-only and unused space ignore it)."""
        if offset < COMMON_OFFSET + COMMON_CFG_SIZE:
            with self._lock:
                self._common_write(offset, data)
        elif NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_OFF_MULTIPLIER * len(self.queues):
            self.device.queue_notify((offset - NOTIFY_OFFSET) // NOTIFY_OFF_MULTIPLIER)
        elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + PAGE:
            self.device.config_write(offset - DEVICE_OFFSET, data)
        elif MSIX_TABLE_OFFSET <= offset < MSIX_TABLE_OFFSET + len(self._table):
            with self._lock:
                off = offset - MSIX_TABLE_OFFSET
                end = min(off + len(data), len(self._table))
                for o in range(off, end):
                    b = data[o - off]
                    self._table[o] = b & PCI_MSIX_ENTRY_CTRL_MASKBIT if o % 16 == 12 else 0 if o % 16 > 12 else b
                for i in range(off // PCI_MSIX_ENTRY_SIZE, (end - 1) // PCI_MSIX_ENTRY_SIZE + 1):
                    self._msix_update(i)

    # ---- common configuration (§4.1.4.3) -------------------------------------------------------------------------

    def _common_bytes(self) -> bytes:
        out = bytearray(COMMON_CFG_SIZE)
        for name, (off, size) in COMMON_CFG.items():
            out[off:off + size] = self._reg_get(name).to_bytes(size, "little")
        return bytes(out)

    def _common_write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        for name, (off, size) in COMMON_CFG.items():
            if off < end and offset < off + size:  # merge the written bytes into the field's current value
                cur = bytearray(self._reg_get(name).to_bytes(size, "little"))
                lo, hi = max(off, offset), min(off + size, end)
                cur[lo - off:hi - off] = data[lo - offset:hi - offset]
                self._reg_set(name, int.from_bytes(cur, "little"))

    def _queue(self) -> QueueRegs | None:
        return self.queues[self.queue_select] if self.queue_select < len(self.queues) else None

    def _reg_get(self, name: str) -> int:
        q = self._queue()
        if name == "device_feature":
            return self.device.features >> 32 * self.device_feature_select & 0xFFFF_FFFF \
                if self.device_feature_select < 2 else 0
        if name == "driver_feature":
            return self.driver_features >> 32 * self.driver_feature_select & 0xFFFF_FFFF \
                if self.driver_feature_select < 2 else 0
        if name == "config_msix_vector":
            return self.msix_config
        if name == "num_queues":
            return len(self.queues)
        if name == "device_status":
            return self.device_status
        if name == "config_generation":
            return self.config_generation
        if name == "queue_notify_off":
            return self.queue_select if q else 0
        if name.startswith("queue_") and name != "queue_select":
            return getattr(q, name[6:]) if q else 0
        return getattr(self, name)  # the two feature selects, queue_select

    def _reg_set(self, name: str, value: int) -> None:
        q = self._queue()
        if name in ("device_feature_select", "driver_feature_select", "queue_select"):
            setattr(self, name, value)
        elif name == "driver_feature":
            if self.driver_feature_select < 2 and not self.status & VIRTIO_CONFIG_S_FEATURES_OK:
                shift = 32 * self.driver_feature_select
                self.driver_features = self.driver_features & ~(0xFFFF_FFFF << shift) | value << shift
        elif name == "config_msix_vector":
            self.msix_config = value if value < self.num_vectors else VIRTIO_MSI_NO_VECTOR  # §4.1.5.1.2
        elif name == "device_status":
            self._set_status(value)
        elif q is None:
            pass
        elif name == "queue_msix_vector":
            q.msix_vector = value if value < self.num_vectors else VIRTIO_MSI_NO_VECTOR
        elif self.status & VIRTIO_CONFIG_S_DRIVER_OK:
            pass  # the queues are live: the driver must not change them (§4.1.4.3.2)
        elif name == "queue_enable":
            q.enable = q.enable or int(value == 1)  # the driver must not write 0 (§4.1.4.3.2)
        elif name in ("queue_size", "queue_desc", "queue_driver", "queue_device") and not q.enable:
            setattr(q, name[6:], value)

    @property
    def device_status(self) -> int:
        """device_status as the driver reads it: its bits plus DEVICE_NEEDS_RESET if the device or transport failed."""
        needs = self.failure is not None or self.device.needs_reset
        return self.status | (VIRTIO_CONFIG_S_NEEDS_RESET if needs else 0)

    def _set_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        old, new = self.status, value & ~VIRTIO_CONFIG_S_NEEDS_RESET
        if new & VIRTIO_CONFIG_S_FEATURES_OK and not old & VIRTIO_CONFIG_S_FEATURES_OK:
            if not self.device.ack_features(self.driver_features):  # §2.2, §3.1.1 step 5-6
                log.info("%s: driver features %#x refused", self.device.name, self.driver_features)
                new &= ~VIRTIO_CONFIG_S_FEATURES_OK
        if new & VIRTIO_CONFIG_S_DRIVER_OK and not old & VIRTIO_CONFIG_S_DRIVER_OK:
            if not new & VIRTIO_CONFIG_S_FEATURES_OK:
                log.warning("%s: DRIVER_OK without FEATURES_OK ignored", self.device.name)
                new &= ~VIRTIO_CONFIG_S_DRIVER_OK
            else:
                self.status = new
                self._activate()
                return
        self.status = new

    def _activate(self) -> None:
        feats = self.device.acked_features
        in_use = self.queues[:self.device.queues_in_use()]  # the rest may stay disabled (§4.1.4.3 queue_enable)
        try:
            for i, q in enumerate(in_use):
                if not q.enable:
                    raise VirtioError(f"queue {i} was not enabled before DRIVER_OK")
            queues = [Virtqueue(self.mem, q.size, q.desc, q.driver, q.device,
                                event_idx=bool(feats >> VIRTIO_RING_F_EVENT_IDX & 1),
                                indirect_desc=bool(feats >> VIRTIO_RING_F_INDIRECT_DESC & 1)) for q in in_use]
            self.device.activate(self.mem, queues, self._queue_interrupt, self._config_changed)
        except (VirtioError, VirtqueueError) as e:
            log.error("%s: activation failed, device needs reset: %s", self.device.name, e)
            self.failure = str(e)
            self._config_changed()

    def reset(self) -> None:
        """Device reset (driver wrote 0 to device_status, §2.4): stop the device after its in-flight request, then
        zero the transport registers, ISR and INTx. The MSI-X table is PCI state and stays."""
        with self._lock:
            self.device.reset()
            self._reset_registers()
            with self._irq_lock:
                self.isr = 0
                self._update_intx()

    # ---- interrupts --------------------------------------------------------------------------------------------------

    @property
    def msix_enabled(self) -> bool:
        """MSI-X Enable in the capability's Message Control (PCI 3.0 §6.8.2.3)."""
        return bool(self.config_read(self._msix_cap + 2, 2) & PCI_MSIX_FLAGS_ENABLE)

    def read_isr(self) -> int:
        """Read the ISR status (§4.1.4.5): returns it and clears it, lowering INTx#."""
        with self._irq_lock:
            value, self.isr = self.isr, 0
            self._update_intx()
            return value

    def _update_intx(self) -> None:  # with _irq_lock held
        pending = bool(self.isr) and not self.msix_enabled
        status = self.config[PCI_STATUS]
        self.config[PCI_STATUS] = status | PCI_STATUS_INTERRUPT if pending else status & ~PCI_STATUS_INTERRUPT
        level = pending and not self.config_read(PCI_COMMAND, 2) & PCI_COMMAND_INTX_DISABLE
        if level != self._intx:
            self._intx = level
            self.irq.set_level(level)

    def _raise(self, isr_bit: int, vector: int) -> None:
        if self.msix_enabled:
            if isr_bit == VIRTIO_PCI_ISR_CONFIG:
                with self._irq_lock:
                    self.isr |= isr_bit  # §4.1.4.5: set even with MSI-X
            if vector < self.num_vectors:
                self.vectors[vector].trigger()
            return
        with self._irq_lock:
            self.isr |= isr_bit
            self._update_intx()

    def _queue_interrupt(self, index: int) -> None:
        """The device's used buffer notification for queue ``index`` (worker thread)."""
        self._raise(VIRTIO_PCI_ISR_QUEUE, self.queues[index].msix_vector)

    def _config_changed(self) -> None:
        """A configuration change notification (§4.1.5.4), also sent when DEVICE_NEEDS_RESET gets set."""
        with self._irq_lock:
            self.config_generation = (self.config_generation + 1) & 0xFF
        self._raise(VIRTIO_PCI_ISR_CONFIG, self.msix_config)

    def _msix_update(self, i: int) -> None:
        lo, hi, data, ctrl = struct.unpack_from("<IIII", self._table, PCI_MSIX_ENTRY_SIZE * i)
        control = self.config_read(self._msix_cap + 2, 2)
        masked = bool(ctrl & PCI_MSIX_ENTRY_CTRL_MASKBIT) or bool(control & PCI_MSIX_FLAGS_MASKALL) \
            or not control & PCI_MSIX_FLAGS_ENABLE
        try:
            self.vectors[i].update(hi << 32 | lo, data, masked)
        except Exception:  # a routing failure must not take the vCPU down; the guest sees a lost interrupt
            log.exception("%s: MSI-X vector %d update failed", self.device.name, i)

    # ---- configuration space side effects -------------------------------------------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        """PciDevice.config_read, plus the PCI configuration access capability: reading its pci_cfg_data reads
        cap.length bytes at cap.offset of BAR 0 into it first (§4.1.4, PCI configuration access capability)."""
        data = self._cfg_cap + 16
        if offset < data + 4 and offset + size > data:
            self._cfg_access(write=False)
        return super().config_read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        """PciDevice.config_write, plus: MSI-X Message Control updates every vector's mask and INTx; the command
        register's INTx Disable updates INTx; a pci_cfg_data write goes to BAR 0 (PCI configuration access
        capability, §4.1.4)."""
        with self._irq_lock:
            super().config_write(offset, size, value)
        end, control, data = offset + size, self._msix_cap + 2, self._cfg_cap + 16
        if offset < data + 4 and end > data:
            self._cfg_access(write=True)
        if offset < control + 2 and end > control:
            with self._lock:
                for i in range(self.num_vectors):
                    self._msix_update(i)
        if offset < control + 2 and end > control or offset < PCI_COMMAND + 2 and end > PCI_COMMAND:
            with self._irq_lock:
                self._update_intx()

    def _cfg_access(self, write: bool) -> None:
        c = self._cfg_cap
        bar, (off, length) = self.config[c + 4], struct.unpack_from("<II", self.config, c + 8)
        if bar != BAR_INDEX or length not in (1, 2, 4) or off % length or off + length > BAR_SIZE:
            return  # the driver must give a valid BAR, a 1/2/4-byte length and an offset aligned to it
        if write:
            self.write(off, bytes(self.config[c + 16:c + 16 + length]))
        else:
            self.config[c + 16:c + 16 + length] = self.read(off, length)

    # ---- mapping, ioeventfds ----------------------------------------------------------------------------------------

    def attach(self, mmio_bus: Bus) -> None:
        """Map BAR 0 on ``mmio_bus`` where it decodes now, and move it (with the notify
        ioeventfds) whenever the guest moves or disables it (``on_bar_change``)."""
        self._bus = mmio_bus
        self.on_bar_change = self._bar_changed
        addr = self.bar_mapping(BAR_INDEX)
        if addr != self._mapped_at:
            self._bar_changed(BAR_INDEX, self._mapped_at, addr)

    def _bar_changed(self, index: int, old: int | None, new: int | None) -> None:
        if index != BAR_INDEX or self._bus is None:
            return
        if self._mapped_at is not None:
            self._bus.remove(self._mapped_at)
            for fd, addr in self._registered:
                self.vm.ioeventfd(fd, addr, 2, deassign=True)
            self._registered = []
        self._mapped_at = None
        if new is None:
            return
        try:
            self._bus.insert(new, BAR_SIZE, self)
        except BusError as e:  # e.g. a BAR sizing probe landing on another device: leave BAR 0 unmapped
            log.error("%s: BAR 0 not mapped at %#x: %s", self.device.name, new, e)
            return
        self._mapped_at = new
        for i, fd in enumerate(self._notify_fds):
            addr = new + NOTIFY_OFFSET + NOTIFY_OFF_MULTIPLIER * i
            try:
                self.vm.ioeventfd(fd, addr, 2)
            except RuntimeError as e:  # a KvmError: notifications still arrive, as MMIO exits
                log.warning("%s: no ioeventfd for queue %d at %#x: %s", self.device.name, i, addr, e)
                continue
            self._registered.append((fd, addr))
        if self._notify_fds and self._thread is None:
            self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._thread = threading.Thread(target=self._notify_loop, name=f"{self.device.name}-ioeventfd",
                                            daemon=True)
            self._thread.start()

    def _notify_loop(self) -> None:
        queue_of = {fd: i for i, fd in enumerate(self._notify_fds)}
        with select.epoll() as ep:
            ep.register(self._stop_fd, select.EPOLLIN)
            for fd in queue_of:
                ep.register(fd, select.EPOLLIN)
            while True:
                for fd, _ in ep.poll():
                    if fd == self._stop_fd:
                        return
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        continue
                    self.device.queue_notify(queue_of[fd])

    def close(self) -> None:
        """Unmap BAR 0, remove the ioeventfds, stop the notify thread, reset the device, close the eventfds."""
        self._bar_changed(BAR_INDEX, self._mapped_at, None)
        if self._thread is not None:
            os.eventfd_write(self._stop_fd, 1)
            self._thread.join()
            os.close(self._stop_fd)
            self._thread = None
        self.device.reset()
        for fd in self._notify_fds:
            os.close(fd)
        self._notify_fds = []

    # ---- snapshots ---------------------------------------------------------------------------------------------------

    def state(self) -> dict:
        """PCI configuration space, transport registers, MSI-X table and pending bits, and ``device.state()``."""
        with self._lock:
            return {"pci": super().state(), "status": self.status,
                    "device_feature_select": self.device_feature_select,
                    "driver_feature_select": self.driver_feature_select, "driver_features": self.driver_features,
                    "msix_config": self.msix_config, "queue_select": self.queue_select,
                    "queues": [asdict(q) for q in self.queues], "failure": self.failure,
                    "isr": self.isr, "config_generation": self.config_generation,
                    "msix_table": bytes(self._table), "msix_pending": [v.pending for v in self.vectors],
                    "device": self.device.state()}

    def restore(self, d: dict) -> None:
        """Load ``state()``: configuration space (the BAR is remapped through ``on_bar_change``), registers,
        MSI-X entries (pending messages stay pending until unmasked), then the device, which resumes its queues.

        :raises VirtioError: if the state has another number of queues or MSI-X vectors than this device;
            PciError for a bad configuration space.
        """
        if len(d["queues"]) != len(self.queues) or len(d["msix_table"]) != len(self._table):
            raise VirtioError(f"{self.device.name}: state has {len(d['queues'])} queues and "
                              f"{len(d['msix_table']) // PCI_MSIX_ENTRY_SIZE} vectors, the device "
                              f"{len(self.queues)} and {self.num_vectors}")
        with self._lock:
            self.device.reset()
            super().restore(d["pci"])
            for key in ("status", "device_feature_select", "driver_feature_select", "driver_features",
                        "msix_config", "queue_select", "failure"):
                setattr(self, key, d[key])
            self.queues = [QueueRegs(**q) for q in d["queues"]]
            self._table[:] = d["msix_table"]
            for v, pending in zip(self.vectors, d["msix_pending"]):
                v.pending = pending
            for i in range(self.num_vectors):
                self._msix_update(i)
            with self._irq_lock:
                self.isr, self.config_generation = d["isr"], d["config_generation"]
                self._update_intx()
            self.device.restore(d["device"], self.mem, self._queue_interrupt, self._config_changed)
