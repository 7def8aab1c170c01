"""Device side of a virtio split virtqueue: pops descriptor chains from guest memory and returns them as used."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from popek.memory import GuestMemory

# OASIS VIRTIO 1.2 §2.7.5 struct virtq_desc flags.
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# §2.7.6 struct virtq_avail flags and §2.7.8 struct virtq_used flags.
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

#: §2.7: the queue size is a power of 2, at most 32768.
VIRTQ_MAX_SIZE = 32768
#: §2.7.5: sizeof(struct virtq_desc).
VIRTQ_DESC_SIZE = 16
#: §2.7.5 driver requirement: a descriptor chain is at most 2^32 bytes in total (used len is a le32).
VIRTQ_MAX_CHAIN_BYTES = 0xFFFF_FFFF

_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_USED_ELEM = struct.Struct("<II")  # id, len


class VirtqueueError(Exception):
    """The driver broke a split-virtqueue rule (a hostile or buggy guest); the message names the rule."""


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Whether moving a ring index from ``old_idx`` to ``new_idx`` passed ``event_idx`` (all u16, wrapping).

    True when ``event_idx`` is one of the indices ``old_idx .. new_idx-1`` just filled: the EVENT_IDX test of
    VIRTIO 1.2 §2.7.7/§2.7.10, as ``vring_need_event`` in the spec's virtio_queue.h / Linux virtio_ring.h.
    """
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


def _slice(views: list[memoryview], start: int, stop: int) -> list[memoryview]:
    out, pos = [], 0
    for v in views:
        if pos >= stop:
            break
        lo, hi = max(start - pos, 0), min(stop - pos, len(v))
        if lo < hi:
            out.append(v[lo:hi])
        pos += len(v)
    return out


@dataclass
class DescriptorChain:
    """One available buffer: the chain starting at descriptor ``head``, as views straight into guest memory.

    ``readable`` are the device-readable buffers (read-only memoryviews), ``writable`` the device-writable ones,
    both in chain order with empty descriptors left out (VIRTIO 1.2 §2.7.4: devices must not assume a layout, so
    treat each list as one byte stream). ``segments`` lists ``(gpa, length, device_writable)`` of every non-empty
    buffer, e.g. for dirty-page tracking. ``read_len`` / ``write_len`` are the totals in bytes.
    """

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)
    segments: list[tuple[int, int, bool]] = field(default_factory=list)
    read_len: int = 0
    write_len: int = 0

    def readable_range(self, start: int, stop: int) -> list[memoryview]:
        """Views of bytes ``[start, stop)`` of the readable stream (fewer bytes if the stream is shorter)."""
        return _slice(self.readable, start, stop)

    def writable_range(self, start: int, stop: int) -> list[memoryview]:
        """Views of bytes ``[start, stop)`` of the writable stream (fewer bytes if the stream is shorter)."""
        return _slice(self.writable, start, stop)

    def read(self, offset: int, size: int) -> bytes:
        """Copy ``size`` bytes of the readable stream from ``offset`` (short if the stream ends first)."""
        return b"".join(bytes(v) for v in self.readable_range(offset, offset + size))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Scatter ``data`` into the writable stream at ``offset``; returns the bytes stored (short at its end)."""
        src, done = memoryview(data).cast("B"), 0
        for v in self.writable_range(offset, offset + len(src)):
            v[:] = src[done:done + len(v)]
            done += len(v)
        return done


class Virtqueue:
    """The device side of one split virtqueue (OASIS VIRTIO 1.2 §2.7) in guest memory.

    :param mem: guest RAM holding the rings and the buffers.
    :param size: Queue Size, a power of 2 in 1..32768 (§2.7).
    :param desc_gpa: guest physical address of the descriptor table (16-byte aligned, 16*size bytes).
    :param avail_gpa: the available ring (Driver Area; 2-byte aligned, 6+2*size bytes).
    :param used_gpa: the used ring (Device Area; 4-byte aligned, 6+8*size bytes).
    :param event_idx: VIRTIO_F_EVENT_IDX was negotiated (used_event/avail_event, §2.7.7 and §2.7.10).
    :param indirect_desc: VIRTIO_F_INDIRECT_DESC was negotiated (§2.7.5.3); without it INDIRECT is an error.
    :raises VirtqueueError: for a bad size, a misaligned part or a part outside guest RAM.

    Guest-controlled input is checked: ``pop`` raises VirtqueueError (message names the rule) and reads only the
    rings and descriptor tables; views never leave the descriptors' buffers. Ordering follows §2.7.13/§2.7.14:
    the available ``idx`` is read before the ring entries it covers, a used element is written before the used
    ``idx``. One thread at a time may use a Virtqueue.
    """

    def __init__(self, mem: GuestMemory, size: int, desc_gpa: int, avail_gpa: int, used_gpa: int,
                 event_idx: bool = False, indirect_desc: bool = True):
        if not 1 <= size <= VIRTQ_MAX_SIZE or size & (size - 1):
            raise VirtqueueError(f"queue size {size} is not a power of 2 in 1..{VIRTQ_MAX_SIZE} (§2.7)")
        for name, gpa, align, length in (("descriptor table", desc_gpa, 16, VIRTQ_DESC_SIZE * size),
                                         ("available ring", avail_gpa, 2, 6 + 2 * size),
                                         ("used ring", used_gpa, 4, 6 + 8 * size)):
            if gpa % align:
                raise VirtqueueError(f"{name} at {gpa:#x} is not {align}-byte aligned (§2.7.1)")
            if not mem.contains(gpa, length):
                raise VirtqueueError(f"{name} {gpa:#x}+{length:#x} is not in guest RAM")
        self.mem = mem
        self.size = size
        self.desc_gpa, self.avail_gpa, self.used_gpa = desc_gpa, avail_gpa, used_gpa
        self.event_idx = bool(event_idx)
        self.indirect_desc = bool(indirect_desc)
        self.last_avail_idx = 0  # next available ring entry to take (free-running u16)
        self.used_idx = 0  # our copy of used->idx; the guest's copy is never read back
        self._signalled_used = 0  # used idx at the last needs_notification() check
        self._signalled_valid = True
        self._segments: dict[int, list[tuple[int, int, bool]]] = {}  # popped, not yet used: head -> segments

    # --- available ring -------------------------------------------------------------------------------------

    def _avail_idx(self) -> int:
        return self.mem.read_u16(self.avail_gpa + 2)

    def pop(self) -> DescriptorChain | None:
        """The next available descriptor chain, or None if the driver has made none available.

        With EVENT_IDX, finding the ring empty publishes ``avail_event = last_avail_idx`` (ask to be notified
        on the next buffer, §2.7.10) and looks once more, so a buffer added meanwhile is not missed.

        :raises VirtqueueError: if the available idx moved by more than the queue size, the head index is out of
            range, or the chain breaks a rule: a loop, more buffers than the queue size (§2.7.5.3.1), a
            ``next`` beyond the table (or beyond an indirect table's len/16), a buffer outside guest RAM, a
            readable buffer after a writable one (§2.7.4.2), INDIRECT without VIRTIO_F_INDIRECT_DESC, INDIRECT
            inside an indirect table, INDIRECT together with NEXT, an indirect table of length 0 or not a
            multiple of 16, or more than 2^32-1 bytes in all (§2.7.5.2).
        """
        avail_idx = self._avail_idx()
        if avail_idx == self.last_avail_idx:
            if not self.event_idx:
                return None
            self.set_avail_event(self.last_avail_idx)
            avail_idx = self._avail_idx()
            if avail_idx == self.last_avail_idx:
                return None
        pending = (avail_idx - self.last_avail_idx) & 0xFFFF
        if pending > self.size:
            raise VirtqueueError(f"available idx {avail_idx} is {pending} entries ahead of the device's "
                                 f"{self.last_avail_idx}, more than the queue size {self.size} (§2.7.6)")
        head = self.mem.read_u16(self.avail_gpa + 4 + 2 * (self.last_avail_idx % self.size))
        chain = self._walk(head)
        self._segments[head] = chain.segments
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        return chain

    def _walk(self, head: int) -> DescriptorChain:
        if head >= self.size:
            raise VirtqueueError(f"available ring entry names descriptor {head}, beyond the table of {self.size}")
        mem, chain = self.mem, DescriptorChain(head)
        table, entries, idx, where = self.desc_gpa, self.size, head, "descriptor table"
        seen: set[int] = set()
        buffers = 0
        any_writable = False
        while True:
            if idx in seen:
                raise VirtqueueError(f"descriptor chain from head {head} loops back to {where} entry {idx}")
            seen.add(idx)
            addr, length, flags, nxt = _DESC.unpack(mem.read(table + VIRTQ_DESC_SIZE * idx, VIRTQ_DESC_SIZE))
            if flags & VIRTQ_DESC_F_INDIRECT:
                if where != "descriptor table":
                    raise VirtqueueError(f"indirect table entry {idx} is itself INDIRECT (nested tables, §2.7.5.3.1)")
                if not self.indirect_desc:
                    raise VirtqueueError(f"descriptor {idx} is INDIRECT but VIRTIO_F_INDIRECT_DESC is not negotiated")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError(f"descriptor {idx} sets both INDIRECT and NEXT (§2.7.5.3.1)")
                if length == 0 or length % VIRTQ_DESC_SIZE:
                    raise VirtqueueError(f"indirect table length {length} of descriptor {idx} is zero or not a "
                                         f"multiple of {VIRTQ_DESC_SIZE} (§2.7.5.3)")
                if not mem.contains(addr, length):
                    raise VirtqueueError(f"indirect table {addr:#x}+{length:#x} of descriptor {idx} is not in "
                                         f"guest RAM")
                table, entries, idx, where, seen = addr, length // VIRTQ_DESC_SIZE, 0, "indirect table", set()
                continue
            buffers += 1
            if buffers > self.size:
                raise VirtqueueError(f"descriptor chain from head {head} has more than the queue size "
                                     f"{self.size} buffers (§2.7.5.3.1)")
            writable = bool(flags & VIRTQ_DESC_F_WRITE)
            if not writable and any_writable:
                raise VirtqueueError(f"{where} entry {idx} is device-readable but follows a device-writable "
                                     f"descriptor (§2.7.4.2)")
            any_writable |= writable
            if chain.read_len + chain.write_len + length > VIRTQ_MAX_CHAIN_BYTES:
                raise VirtqueueError(f"descriptor chain from head {head} is longer than 2^32-1 bytes (§2.7.5.2)")
            if length:
                if not mem.contains(addr, length):
                    raise VirtqueueError(f"{where} entry {idx} buffer {addr:#x}+{length:#x} is not in guest RAM")
                view = mem.view(addr, length)
                if writable:
                    chain.writable.append(view)
                    chain.write_len += length
                else:
                    chain.readable.append(view.toreadonly())
                    chain.read_len += length
                chain.segments.append((addr, length, writable))
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            if nxt >= entries:
                raise VirtqueueError(f"{where} entry {idx} chains to next={nxt}, beyond its {entries} entries")
            idx = nxt

    def set_avail_event(self, idx: int) -> None:
        """Write ``avail_event`` (the used ring's last field, §2.7.8): notify me when avail idx passes ``idx``.

        Only with EVENT_IDX negotiated; otherwise the field is not part of the protocol and nothing is written.
        """
        if self.event_idx:
            self.mem.write_u16(self.used_gpa + 4 + 8 * self.size, idx & 0xFFFF)

    # --- used ring ------------------------------------------------------------------------------------------

    def add_used(self, head: int, written_len: int) -> None:
        """Return chain ``head`` to the driver, ``written_len`` bytes written into its writable buffers (§2.7.8).

        The element is written before the used ``idx`` is advanced. While guest memory logs host writes
        (``GuestMemory.track_host_writes``, for diff snapshots) the chain's device-writable buffers are logged
        here, when the device is done with them, and the used ring through ``GuestMemory.write``.

        :raises ValueError: if ``head`` is not a descriptor index or ``written_len`` does not fit a le32.
        """
        if not 0 <= head < self.size or not 0 <= written_len <= 0xFFFF_FFFF:
            raise ValueError(f"used element id {head} / len {written_len} out of range for queue size {self.size}")
        if self.mem.host_dirty is not None:  # diff snapshots: KVM's dirty log does not see the device's writes
            for gpa, length, writable in self._segments.pop(head, ()):
                if writable:
                    self.mem.mark_dirty(gpa, length)
        self.mem.write(self.used_gpa + 4 + 8 * (self.used_idx % self.size), _USED_ELEM.pack(head, written_len))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.mem.write_u16(self.used_gpa + 2, self.used_idx)

    def needs_notification(self) -> bool:
        """Whether the buffers used since the previous call need a used buffer notification (§2.7.7).

        False if nothing was used since then. Without EVENT_IDX: True unless the driver set
        VIRTQ_AVAIL_F_NO_INTERRUPT. With EVENT_IDX: True if the used idx passed ``used_event`` (the field after
        the available ring), i.e. the driver's requested entry is among those just used. After ``restore`` the
        first call with EVENT_IDX answers True (a spurious notification is allowed; a lost one is not).
        """
        new, old, valid = self.used_idx, self._signalled_used, self._signalled_valid
        if valid and new == old:
            return False
        self._signalled_used, self._signalled_valid = new, True
        if not self.event_idx:
            return not self.mem.read_u16(self.avail_gpa) & VIRTQ_AVAIL_F_NO_INTERRUPT
        if not valid:
            return True
        return vring_need_event(self.mem.read_u16(self.avail_gpa + 4 + 2 * self.size), new, old)

    # --- snapshot -------------------------------------------------------------------------------------------

    def state(self) -> dict:
        """Everything needed to rebuild this queue: geometry, negotiated ring features, ring positions."""
        return {"size": self.size, "desc_gpa": self.desc_gpa, "avail_gpa": self.avail_gpa,
                "used_gpa": self.used_gpa, "event_idx": self.event_idx, "indirect_desc": self.indirect_desc,
                "last_avail_idx": self.last_avail_idx, "used_idx": self.used_idx}

    def restore(self, state: dict) -> None:
        """Take over ring positions from ``state()`` of a queue with the same geometry.

        :raises VirtqueueError: if the geometry or ring features differ.
        """
        for key in ("size", "desc_gpa", "avail_gpa", "used_gpa", "event_idx", "indirect_desc"):
            if state[key] != getattr(self, key):
                raise VirtqueueError(f"cannot restore queue state: {key} is {state[key]!r}, this queue has "
                                     f"{getattr(self, key)!r}")
        self.last_avail_idx = state["last_avail_idx"] & 0xFFFF
        self.used_idx = state["used_idx"] & 0xFFFF
        self._signalled_valid = False

    @classmethod
    def from_state(cls, mem: GuestMemory, state: dict) -> "Virtqueue":
        """A queue rebuilt from ``state()`` over ``mem``."""
        q = cls(mem, state["size"], state["desc_gpa"], state["avail_gpa"], state["used_gpa"],
                event_idx=state["event_idx"], indirect_desc=state["indirect_desc"])
        q.restore(state)
        return q
