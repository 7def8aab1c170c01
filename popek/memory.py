"""Guest physical memory: memfd-backed regions mapped shared, addressed by guest physical address."""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from dataclasses import dataclass, field

PAGE_SIZE = 4096

#: x86 PCI/MMIO hole below 4 GiB: RAM beyond this point is placed above 4 GiB.
MMIO_HOLE_START = 0xC000_0000
MMIO_HOLE_END = 0x1_0000_0000


class GuestMemoryError(ValueError):
    """A guest physical access outside every RAM region (or straddling two)."""


@dataclass
class GuestRegion:
    """One contiguous range of guest RAM backed by its own memfd.

    :param gpa: guest physical start address (bytes, page aligned)
    :param size: length in bytes (page multiple)
    :param private: ``map`` is a MAP_PRIVATE file mapping (a restored snapshot, ``GuestMemory.from_file``), not a
        shared one; it decides how ``GuestMemory.release`` gives pages back.
    """

    gpa: int
    size: int
    fd: int = -1
    map: mmap.mmap = field(default=None, repr=False)  # type: ignore[assignment]
    private: bool = False

    def __post_init__(self) -> None:
        if self.gpa % PAGE_SIZE or self.size % PAGE_SIZE or self.size <= 0:
            raise GuestMemoryError(f"region {self.gpa:#x}+{self.size:#x} is not page aligned")
        if self.fd < 0:
            self.fd = os.memfd_create(f"popek-ram-{self.gpa:x}", os.MFD_CLOEXEC)
        try:
            if self.map is None:
                os.ftruncate(self.fd, self.size)
                self.map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def host_address(self) -> int:
        """Host virtual address of the mapping (for ``kvm_userspace_memory_region.userspace_addr``)."""
        return ctypes.addressof(ctypes.c_char.from_buffer(self.map))

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:
            pass  # a memoryview is still exported; the mapping goes when it does
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class GuestMemory:
    """All guest RAM of a VM.

    :param regions: list of ``(gpa, size)`` pairs in bytes; they must not overlap.
    :raises GuestMemoryError: on overlap or misalignment.
    """

    def __init__(self, regions: list[tuple[int, int]]):
        spans = sorted(regions)
        for (a, asz), (b, _) in zip(spans, spans[1:]):
            if a + asz > b:
                raise GuestMemoryError(f"regions {a:#x}+{asz:#x} and {b:#x} overlap")
        self.regions = []
        self.host_dirty: set[int] | None = None
        try:
            for gpa, size in spans:
                self.regions.append(GuestRegion(gpa, size))
        except BaseException:
            self.close()  # the regions made before the one that failed
            raise

    # Host-write log (for diff snapshots, popek.snapshot.dirty_bitmaps): KVM_GET_DIRTY_LOG reports only the
    # guest's own writes; the VMM's writes through ``write`` and the virtqueues' used rings and device-writable
    # buffers (popek.devices.virtio.queue calls ``mark_dirty``) are logged here, as page-aligned guest physical
    # addresses, while tracking is on.
    def track_host_writes(self) -> None:
        """Start (or restart, emptied) the host-write log ``host_dirty``."""
        self.host_dirty = set()

    def take_host_dirty(self) -> set[int]:
        """The page-aligned guest physical addresses the host wrote since the last call (or since
        ``track_host_writes``); starts a new log. Empty while tracking is off."""
        if self.host_dirty is None:
            return set()
        taken, self.host_dirty = self.host_dirty, set()
        return taken

    def mark_dirty(self, gpa: int, size: int) -> None:
        """Log a host write of ``size`` bytes at ``gpa`` (no-op while tracking is off)."""
        if self.host_dirty is not None and size > 0:
            self.host_dirty.update(range(gpa & ~(PAGE_SIZE - 1), gpa + size, PAGE_SIZE))

    @classmethod
    def x86(cls, size: int) -> "GuestMemory":
        """RAM of ``size`` bytes laid out around the MMIO hole at 3–4 GiB, as PCs do."""
        if size <= 0 or size % PAGE_SIZE:
            raise GuestMemoryError(f"memory size {size} is not a positive multiple of {PAGE_SIZE}")
        low = min(size, MMIO_HOLE_START)
        regions = [(0, low)]
        if size > low:
            regions.append((MMIO_HOLE_END, size - low))
        return cls(regions)

    @property
    def size(self) -> int:
        """Total RAM in bytes."""
        return sum(r.size for r in self.regions)

    def region_of(self, gpa: int, size: int = 1) -> GuestRegion:
        """The region holding ``[gpa, gpa+size)``.

        :raises GuestMemoryError: if no single region holds the whole range.
        """
        for r in self.regions:
            if r.gpa <= gpa and gpa + size <= r.end:
                return r
        raise GuestMemoryError(f"guest physical range {gpa:#x}+{size:#x} is not in guest RAM")

    def contains(self, gpa: int, size: int = 1) -> bool:
        return any(r.gpa <= gpa and gpa + size <= r.end for r in self.regions)

    def release(self, gpa: int, size: int) -> None:
        """Give the host memory behind guest RAM ``[gpa, gpa+size)`` back to the host (a balloon, VIRTIO 1.2 §5.5).

        Shared mappings (the memfd, or a file mapped shared) get madvise(MADV_REMOVE), which punches a hole in the
        backing file (as fallocate(FALLOC_FL_PUNCH_HOLE)): the pages read as zero afterwards. A MAP_PRIVATE file
        mapping (a restored snapshot) gets MADV_DONTNEED: its copied pages are dropped and read back from the file.
        Either way the contents become undefined to the guest, as for a balloon page (madvise(2)).

        :param gpa: page-aligned guest physical address. :param size: bytes, a positive multiple of 4 KiB.
        :raises GuestMemoryError: if the range is not page aligned or not inside one RAM region (nothing is
            released then); OSError if the kernel refuses the madvise.
        """
        if gpa % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
            raise GuestMemoryError(f"range {gpa:#x}+{size:#x} to release is not whole 4 KiB pages")
        r = self.region_of(gpa, size)
        r.map.madvise(mmap.MADV_DONTNEED if r.private else mmap.MADV_REMOVE, gpa - r.gpa, size)
        self.mark_dirty(gpa, size)

    def view(self, gpa: int, size: int) -> memoryview:
        """A writable memoryview of ``size`` bytes at ``gpa`` (zero copy; for device DMA)."""
        if size < 0:
            raise GuestMemoryError(f"negative size {size}")
        r = self.region_of(gpa, max(size, 1))
        off = gpa - r.gpa
        return memoryview(r.map)[off:off + size]

    def read(self, gpa: int, size: int) -> bytes:
        r = self.region_of(gpa, max(size, 1))
        off = gpa - r.gpa
        return r.map[off:off + size]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        r = self.region_of(gpa, max(n, 1))
        off = gpa - r.gpa
        r.map[off:off + n] = bytes(data) if isinstance(data, memoryview) else data
        if self.host_dirty is not None:
            self.mark_dirty(gpa, n)

    def read_u8(self, gpa: int) -> int:
        return self.read(gpa, 1)[0]

    def read_u16(self, gpa: int) -> int:
        return struct.unpack("<H", self.read(gpa, 2))[0]

    def read_u32(self, gpa: int) -> int:
        return struct.unpack("<I", self.read(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        return struct.unpack("<Q", self.read(gpa, 8))[0]

    def write_u8(self, gpa: int, v: int) -> None:
        self.write(gpa, struct.pack("<B", v))

    def write_u16(self, gpa: int, v: int) -> None:
        self.write(gpa, struct.pack("<H", v))

    def write_u32(self, gpa: int, v: int) -> None:
        self.write(gpa, struct.pack("<I", v))

    def write_u64(self, gpa: int, v: int) -> None:
        self.write(gpa, struct.pack("<Q", v))

    def close(self) -> None:
        for r in self.regions:
            r.close()

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def from_file(cls, path: str | os.PathLike, regions: list[tuple[int, int]], private: bool = True) -> "GuestMemory":
        """RAM mapped from a file holding the ``(gpa, size)`` regions back to back from offset 0 (a snapshot memory
        file, popek.snapshot); bytes after the last region (e.g. a trailer) are not mapped.

        ``private``: MAP_PRIVATE (mmap(2)): pages load lazily from the file and a guest or VMM write copies the page,
        so the file never changes and VMs restored from one file share its unwritten pages in the page cache; the
        file is opened read-only and each region's ``fd`` is that file, not a memfd. ``private=False``: MAP_SHARED
        on a file opened read-write: writes go to the file.
        :raises GuestMemoryError: for misaligned or overlapping regions, or a file shorter than the regions;
            OSError if the file cannot be opened.
        """
        spans = list(regions)
        ordered = sorted(spans)
        for (a, asz), (b, _) in zip(ordered, ordered[1:]):
            if a + asz > b:
                raise GuestMemoryError(f"regions {a:#x}+{asz:#x} and {b:#x} overlap")
        fd = os.open(path, (os.O_RDONLY if private else os.O_RDWR) | os.O_CLOEXEC)
        self = cls.__new__(cls)
        self.regions = []
        self.host_dirty = None
        try:
            need = sum(size for _, size in spans)
            have = os.fstat(fd).st_size
            if have < need:
                raise GuestMemoryError(f"{path}: {have} bytes, the memory regions need {need}")
            offset = 0
            for gpa, size in spans:
                if gpa % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
                    raise GuestMemoryError(f"region {gpa:#x}+{size:#x} is not page aligned")
                m = mmap.mmap(fd, size, mmap.MAP_PRIVATE if private else mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
                self.regions.append(GuestRegion(gpa, size, fd=os.dup(fd), map=m, private=private))
                offset += size
            self.regions.sort(key=lambda r: r.gpa)
        except BaseException:
            self.close()
            raise
        finally:
            os.close(fd)
        return self
