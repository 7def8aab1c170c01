"""Address-range buses (port I/O and MMIO) that route an access to a device by offset."""

from __future__ import annotations

import bisect
import threading
from typing import Protocol


class BusDevice(Protocol):
    """What a device on a bus implements. It sees only offsets from the base it was inserted at.

    ``read`` returns exactly ``size`` bytes (little endian); ``write`` gets the bytes the guest wrote.
    """

    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


class BusError(ValueError):
    """An insertion overlapping a range already on the bus, or an empty range."""


class Bus:
    """Non-overlapping ``[base, base+length)`` ranges mapped to devices.

    Reads of unmapped addresses return all-ones (as on an open PC bus); writes to them are dropped and counted.
    """

    def __init__(self, name: str = "bus"):
        self.name = name
        self._bases: list[int] = []
        self._entries: list[tuple[int, int, BusDevice]] = []
        self._lock = threading.Lock()
        self.unhandled = 0

    def insert(self, base: int, length: int, device: BusDevice) -> None:
        """Map ``device`` at ``[base, base+length)``.

        :raises BusError: if the range is empty or overlaps one already mapped.
        """
        if length <= 0:
            raise BusError(f"{self.name}: empty range at {base:#x}")
        with self._lock:
            i = bisect.bisect_left(self._bases, base)
            if i > 0:
                pb, pl, _ = self._entries[i - 1]
                if pb + pl > base:
                    raise BusError(f"{self.name}: {base:#x}+{length:#x} overlaps {pb:#x}+{pl:#x}")
            if i < len(self._entries) and self._entries[i][0] < base + length:
                nb, nl, _ = self._entries[i]
                raise BusError(f"{self.name}: {base:#x}+{length:#x} overlaps {nb:#x}+{nl:#x}")
            self._bases.insert(i, base)
            self._entries.insert(i, (base, length, device))

    def remove(self, base: int) -> None:
        with self._lock:
            i = bisect.bisect_left(self._bases, base)
            if i < len(self._bases) and self._bases[i] == base:
                del self._bases[i]
                del self._entries[i]

    def resolve(self, addr: int, size: int = 1) -> tuple[BusDevice, int] | None:
        """The device and offset for an access of ``size`` bytes at ``addr``, or None if unmapped."""
        i = bisect.bisect_right(self._bases, addr) - 1
        if i < 0:
            return None
        base, length, dev = self._entries[i]
        if addr + size <= base + length:
            return dev, addr - base
        return None

    def read(self, addr: int, size: int) -> bytes:
        hit = self.resolve(addr, size)
        if hit is None:
            self.unhandled += 1
            return b"\xff" * size
        dev, off = hit
        data = dev.read(off, size)
        return data

    def write(self, addr: int, data: bytes) -> bool:
        """Deliver a write; returns False if no device is mapped there."""
        hit = self.resolve(addr, len(data))
        if hit is None:
            self.unhandled += 1
            return False
        dev, off = hit
        dev.write(off, data)
        return True

    def devices(self) -> list[tuple[int, int, BusDevice]]:
        return list(self._entries)
