"""PCI configuration space: mechanism #1 ports 0xCF8-0xCFF, bus 0 functions, type-0 headers, BARs, capabilities."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# Type-0 configuration header offsets and bits (PCI Local Bus spec 3.0 §6.1-6.2; Linux include/uapi/linux/pci_regs.h).
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_STATUS = 0x06
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_CACHE_LINE_SIZE = 0x0C
PCI_LATENCY_TIMER = 0x0D
PCI_HEADER_TYPE = 0x0E
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_ROM_ADDRESS = 0x30
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D

PCI_COMMAND_IO = 0x001
PCI_COMMAND_MEMORY = 0x002
PCI_COMMAND_MASTER = 0x004
PCI_COMMAND_PARITY = 0x040
PCI_COMMAND_SERR = 0x100
PCI_COMMAND_INTX_DISABLE = 0x400
PCI_STATUS_INTERRUPT = 0x0008
PCI_STATUS_CAP_LIST = 0x0010
#: Status bits that are "write 1 to clear": parity/abort/SERR errors (spec §6.2.3).
PCI_STATUS_W1C = 0xF900
PCI_HEADER_TYPE_MULTIFUNCTION = 0x80

PCI_BASE_ADDRESS_SPACE_IO = 0x01
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x04
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x08

CONFIG_SIZE = 256
CAPABILITIES_START = 0x40

#: CONFIG_ADDRESS (port 0xCF8) fields (spec 3.0 §3.2.2.3.2).
CONFIG_ADDRESS_ENABLE = 1 << 31
CONFIG_ADDRESS_MASK = 0x80FF_FFFC  # reserved bits 30:24 and bits 1:0 read as 0

BAR_KINDS = ("io", "mem32", "mem64")


class PciError(ValueError):
    """A device, BAR or capability that does not fit the configuration space or the bus."""


@dataclass
class Bar:
    """One base address register: ``size`` in bytes (a power of two), ``kind`` "io", "mem32" or "mem64"."""

    size: int
    kind: str
    prefetchable: bool = False


class PciDevice:
    """A PCI function with a 256-byte type-0 configuration space (PCI Local Bus spec 3.0 §6.1).

    Each byte has a write mask (which bits the guest may change) and a write-1-to-clear mask; vendor, device,
    class, header type, capability pointer and interrupt pin are read-only. BARs (``add_bar``) answer the sizing
    probe: after all-ones is written, the address bits read back as ``~(size - 1)`` with the type bits (§6.2.5.1).
    When a BAR's decoded address or the command register's IO/MEMORY enables change, ``on_bar_change(index,
    old, new)`` is called with the addresses (None = not decoded: disabled, zero, or the all-ones probe value).
    Subclasses may override ``config_read``/``config_write`` to give registers side effects.

    :param vendor_id, device_id: 16-bit IDs.
    :param class_code: 24 bits: base class, subclass, programming interface (e.g. 0x060000 = host bridge).
    :param interrupt_pin: 0 = none, 1-4 = INTA#-INTD#.
    :raises PciError: if a field does not fit.
    """

    def __init__(self, vendor_id: int, device_id: int, class_code: int, *, revision_id: int = 0,
                 subsystem_vendor_id: int = 0, subsystem_id: int = 0, interrupt_pin: int = 0):
        for name, value, bits in (("vendor_id", vendor_id, 16), ("device_id", device_id, 16),
                                  ("class_code", class_code, 24), ("revision_id", revision_id, 8),
                                  ("subsystem_vendor_id", subsystem_vendor_id, 16), ("subsystem_id", subsystem_id, 16)):
            if not 0 <= value < 1 << bits:
                raise PciError(f"PCI {name} {value:#x} does not fit in {bits} bits")
        if not 0 <= interrupt_pin <= 4:
            raise PciError(f"PCI interrupt pin {interrupt_pin} is not 0 (none) or 1-4 (INTA#-INTD#)")
        self.config = bytearray(CONFIG_SIZE)
        self.wmask = bytearray(CONFIG_SIZE)
        self.w1cmask = bytearray(CONFIG_SIZE)
        self._set(PCI_VENDOR_ID, 2, vendor_id)
        self._set(PCI_DEVICE_ID, 2, device_id)
        self._set(PCI_REVISION_ID, 4, class_code << 8 | revision_id)
        self._set(PCI_SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self._set(PCI_SUBSYSTEM_ID, 2, subsystem_id)
        self.config[PCI_INTERRUPT_PIN] = interrupt_pin
        self._set(PCI_COMMAND, 2, PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_PARITY
                  | PCI_COMMAND_SERR | PCI_COMMAND_INTX_DISABLE, self.wmask)
        self._set(PCI_STATUS, 2, PCI_STATUS_W1C, self.w1cmask)
        for off in (PCI_CACHE_LINE_SIZE, PCI_LATENCY_TIMER, PCI_INTERRUPT_LINE):
            self.wmask[off] = 0xFF
        self.bars: dict[int, Bar] = {}
        self.on_bar_change: Callable[[int, int | None, int | None], None] | None = None
        self._mapped: dict[int, int | None] = {}
        self._cap_end = CAPABILITIES_START
        self._cap_last: int | None = None

    def _set(self, offset: int, size: int, value: int, where: bytearray | None = None) -> None:
        (self.config if where is None else where)[offset:offset + size] = value.to_bytes(size, "little")

    # ---- configuration space -------------------------------------------------------------------------------------

    @staticmethod
    def _check(offset: int, size: int) -> None:
        if size not in (1, 2, 4) or offset < 0 or offset + size > CONFIG_SIZE:
            raise PciError(f"PCI config access of {size} bytes at {offset:#x} is outside the 256-byte space")

    def config_read(self, offset: int, size: int) -> int:
        """The little-endian value of ``size`` (1, 2, 4) bytes at ``offset``. :raises PciError: out of range."""
        self._check(offset, size)
        return int.from_bytes(self.config[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Write ``size`` bytes of ``value`` at ``offset`` through the write masks. :raises PciError: out of range."""
        self._check(offset, size)
        for i in range(size):
            o, b = offset + i, (value >> (8 * i)) & 0xFF
            w = self.wmask[o]
            self.config[o] = ((self.config[o] & ~w) | (b & w)) & ~(b & self.w1cmask[o])
        if offset < PCI_COMMAND + 2 and offset + size > PCI_COMMAND or \
                offset < PCI_BASE_ADDRESS_0 + 24 and offset + size > PCI_BASE_ADDRESS_0:
            self._update_mappings()

    # ---- BARs ----------------------------------------------------------------------------------------------------

    def add_bar(self, index: int, size: int, kind: str = "mem32", prefetchable: bool = False) -> None:
        """Declare BAR ``index`` (0-5; a "mem64" BAR also takes ``index + 1``) decoding ``size`` bytes.

        :raises PciError: for a bad index or kind, a size that is not a power of two (at least 16 bytes of memory
            or 4 bytes of I/O, at most 256 bytes of I/O, spec §6.2.5.1), or a register already in use.
        """
        if kind not in BAR_KINDS:
            raise PciError(f"BAR kind {kind!r} is not one of {', '.join(BAR_KINDS)}")
        regs = [index, index + 1] if kind == "mem64" else [index]
        if not 0 <= index or regs[-1] > 5:
            raise PciError(f"BAR {index} ({kind}) does not fit in BAR registers 0-5")
        used = {i for j, bar in self.bars.items() for i in ([j, j + 1] if bar.kind == "mem64" else [j])}
        if used & set(regs):
            raise PciError(f"BAR register {index} is already in use")
        minimum, maximum = (4, 256) if kind == "io" else (16, 1 << (32 if kind == "mem32" else 63))
        if size & (size - 1) or not minimum <= size <= maximum:
            raise PciError(f"BAR size {size:#x} is not a power of two in {minimum:#x}-{maximum:#x} for {kind}")
        self.bars[index] = Bar(size, kind, prefetchable)
        off = PCI_BASE_ADDRESS_0 + 4 * index
        if kind == "io":
            flags = PCI_BASE_ADDRESS_SPACE_IO
        else:
            flags = (PCI_BASE_ADDRESS_MEM_TYPE_64 if kind == "mem64" else 0) | \
                    (PCI_BASE_ADDRESS_MEM_PREFETCH if prefetchable else 0)
        self._set(off, 4, flags)
        mask = ~(size - 1) & ((1 << 64) - 1 if kind == "mem64" else 0xFFFF_FFFF)
        self._set(off, 8 if kind == "mem64" else 4, mask, self.wmask)
        self._mapped[index] = None

    def bar_address(self, index: int) -> int:
        """The address programmed into BAR ``index`` (type bits removed). :raises PciError: if it is not declared."""
        bar = self._bar(index)
        off = PCI_BASE_ADDRESS_0 + 4 * index
        raw = int.from_bytes(self.config[off:off + (8 if bar.kind == "mem64" else 4)], "little")
        return raw & ~(0x3 if bar.kind == "io" else 0xF)

    def set_bar_address(self, index: int, address: int) -> None:
        """Program BAR ``index`` as firmware would (the VMM assigns addresses; there is no BIOS).

        :raises PciError: if the BAR is not declared or ``address`` is not aligned to its size.
        """
        bar = self._bar(index)
        if address % bar.size:
            raise PciError(f"BAR {index} address {address:#x} is not aligned to its size {bar.size:#x}")
        off = PCI_BASE_ADDRESS_0 + 4 * index
        self.config_write(off, 4, address & 0xFFFF_FFFF)
        if bar.kind == "mem64":
            self.config_write(off + 4, 4, address >> 32)

    def bar_mapping(self, index: int) -> int | None:
        """Where BAR ``index`` decodes now, or None: decoding disabled in the command register, address 0, or an
        address whose end is past the space (the all-ones sizing value), as QEMU's pci_bar_address decides."""
        bar = self._bar(index)
        command = int.from_bytes(self.config[PCI_COMMAND:PCI_COMMAND + 2], "little")
        if not command & (PCI_COMMAND_IO if bar.kind == "io" else PCI_COMMAND_MEMORY):
            return None
        addr = self.bar_address(index)
        limit = {"io": 1 << 16, "mem32": 1 << 32, "mem64": 1 << 64}[bar.kind]
        return None if addr == 0 or addr + bar.size >= limit else addr

    def _bar(self, index: int) -> Bar:
        try:
            return self.bars[index]
        except KeyError:
            raise PciError(f"BAR {index} is not declared on this device") from None

    def _update_mappings(self) -> None:
        for index in self.bars:
            new = self.bar_mapping(index)
            old = self._mapped[index]
            if new != old:
                self._mapped[index] = new
                if self.on_bar_change is not None:
                    self.on_bar_change(index, old, new)

    # ---- capabilities --------------------------------------------------------------------------------------------

    def add_capability(self, data: bytes, wmask: bytes | None = None) -> int:
        """Append a capability to the list at PCI_CAPABILITY_LIST (spec 3.0 §6.7) and return its offset.

        ``data`` is the whole structure: byte 0 the capability ID, byte 1 the next pointer (filled in here).
        ``wmask`` (same length) marks the bits the guest may write; default: none.
        :raises PciError: if ``data`` is shorter than 2 bytes, ``wmask`` has another length, or no room is left.
        """
        if len(data) < 2:
            raise PciError(f"a capability needs at least an ID and a next pointer, got {len(data)} bytes")
        if wmask is not None and len(wmask) != len(data):
            raise PciError(f"capability write mask has {len(wmask)} bytes for {len(data)} bytes of capability")
        offset = self._cap_end
        if offset + len(data) > CONFIG_SIZE:
            raise PciError(f"no room for a {len(data)}-byte capability at {offset:#x} in the 256-byte space")
        self.config[offset:offset + len(data)] = data
        self.config[offset + 1] = 0
        if wmask is not None:
            self.wmask[offset:offset + len(data)] = wmask
        self.wmask[offset + 1] = 0
        if self._cap_last is None:
            self.config[PCI_CAPABILITY_LIST] = offset
            self.config[PCI_STATUS] |= PCI_STATUS_CAP_LIST
        else:
            self.config[self._cap_last + 1] = offset
        self._cap_last = offset
        self._cap_end = (offset + len(data) + 3) & ~3
        return offset

    # ---- snapshots -----------------------------------------------------------------------------------------------

    def state(self) -> dict:
        """The configuration space as ``{"config": bytes(256)}`` (masks, BARs, capabilities come from construction)."""
        return {"config": bytes(self.config)}

    def restore(self, d: dict) -> None:
        """Load a dict from ``state()``; BAR mapping changes are reported through ``on_bar_change``.

        :raises PciError: if ``config`` is missing or not 256 bytes.
        """
        if len(d.get("config", b"")) != CONFIG_SIZE:
            raise PciError(f"PCI device state needs 'config' of {CONFIG_SIZE} bytes")
        self.config = bytearray(d["config"])
        self._update_mappings()


class HostBridge(PciDevice):
    """The host bridge at 00:00.0: 8086:29c0 (Intel 82G33 DRAM controller, as QEMU's q35), class 0x060000, type 0."""

    def __init__(self):
        super().__init__(0x8086, 0x29C0, 0x060000)


class PciBus:
    """Bus 0: PCI functions by (device 0-31, function 0-7); the host bridge is at 00:00.0.

    Accesses to an empty slot or another bus read all-ones and drop writes (spec 3.0 §6.1: a read of Vendor ID
    0xFFFF means no function).
    """

    def __init__(self):
        self.devices: dict[tuple[int, int], PciDevice] = {}
        self.host_bridge = HostBridge()
        self.add(self.host_bridge, 0)

    def add(self, device: PciDevice, slot: int | None = None, function: int = 0) -> tuple[int, int]:
        """Place ``device`` at (``slot``, ``function``); ``slot`` None = the first device number with no functions.

        Sets the multi-function bit of function 0 once a slot has more than one function.
        :returns: (device number, function). :raises PciError: if the place is taken, out of range, or the bus full.
        """
        if slot is None:
            taken = {s for s, _ in self.devices}
            slot = next((s for s in range(32) if s not in taken), None)
            if slot is None:
                raise PciError("PCI bus 0 has no free device number")
        if not 0 <= slot < 32 or not 0 <= function < 8:
            raise PciError(f"PCI address 00:{slot:02x}.{function} is outside device 0-31, function 0-7")
        if (slot, function) in self.devices:
            raise PciError(f"PCI address 00:{slot:02x}.{function} is already taken")
        self.devices[slot, function] = device
        first = self.devices.get((slot, 0))
        if first is not None and sum(1 for s, _ in self.devices if s == slot) > 1:
            first.config[PCI_HEADER_TYPE] |= PCI_HEADER_TYPE_MULTIFUNCTION
        return slot, function

    def get(self, slot: int, function: int = 0) -> PciDevice | None:
        return self.devices.get((slot, function))

    def config_read(self, bus: int, slot: int, function: int, offset: int, size: int) -> int:
        """Read ``size`` bytes at ``offset`` of a function's configuration space; all-ones if there is none."""
        dev = self.devices.get((slot, function)) if bus == 0 else None
        return (1 << 8 * size) - 1 if dev is None else dev.config_read(offset, size)

    def config_write(self, bus: int, slot: int, function: int, offset: int, size: int, value: int) -> None:
        """Write a function's configuration space; dropped if there is none."""
        dev = self.devices.get((slot, function)) if bus == 0 else None
        if dev is not None:
            dev.config_write(offset, size, value)

    def state(self) -> dict:
        """Every function's ``state()`` keyed "DD.F" (hex device number, function)."""
        return {f"{s:02x}.{f}": dev.state() for (s, f), dev in sorted(self.devices.items())}

    def restore(self, d: dict) -> None:
        """Restore functions from ``state()``. :raises PciError: if a key names no function on this bus."""
        for key, st in d.items():
            try:
                s, f = key.split(".")
                dev = self.devices[int(s, 16), int(f)]
            except (ValueError, KeyError):
                raise PciError(f"PCI state for {key!r}: no such function on bus 0") from None
            dev.restore(st)


class PciConfigIo:
    """Configuration mechanism #1 on ports 0xCF8-0xCFF (PCI Local Bus spec 3.0 §3.2.2.3.2).

    Offset 0 is CONFIG_ADDRESS, taken only as a 32-bit access (others read all-ones and are dropped, since they are
    plain I/O cycles): bit 31 enable, 23:16 bus, 15:11 device, 10:8 function, 7:2 register. Offsets 4-7 are
    CONFIG_DATA: an access of 1, 2 or 4 bytes at offset 4+k reaches register + k. With the enable bit clear, data
    reads are all-ones and writes are dropped.
    """

    def __init__(self, bus: PciBus):
        self.bus = bus
        self.address = 0

    def _target(self) -> tuple[int, int, int, int] | None:
        a = self.address
        if not a & CONFIG_ADDRESS_ENABLE:
            return None
        return (a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 0x7, a & 0xFC

    def read(self, offset: int, size: int) -> bytes:
        if offset == 0 and size == 4:
            return self.address.to_bytes(4, "little")
        target = self._target()
        if offset < 4 or target is None:
            return b"\xff" * size
        bus, slot, fn, reg = target
        return self.bus.config_read(bus, slot, fn, reg + offset - 4, size).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0 and len(data) == 4:
            self.address = int.from_bytes(data, "little") & CONFIG_ADDRESS_MASK
            return
        target = self._target()
        if offset < 4 or target is None:
            return
        bus, slot, fn, reg = target
        self.bus.config_write(bus, slot, fn, reg + offset - 4, len(data), int.from_bytes(data, "little"))

    def state(self) -> dict:
        """``{"address": CONFIG_ADDRESS}`` (the functions' state is ``PciBus.state()``)."""
        return {"address": self.address}

    def restore(self, d: dict) -> None:
        """Load a dict from ``state()``. :raises ValueError: if ``address`` is missing."""
        if "address" not in d:
            raise ValueError("PCI config I/O state lacks 'address'")
        self.address = d["address"] & CONFIG_ADDRESS_MASK
