"""Split virtqueues (VIRTIO 1.2 §2.7): chains with NEXT and INDIRECT, used ring, notification suppression,
every hostile-driver rule, and random descriptor tables thrown at pop()."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from popek.devices.virtio.queue import (VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
                                        VIRTQ_DESC_F_WRITE, Virtqueue, VirtqueueError, vring_need_event)
from popek.memory import GuestMemory

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT


class FakeDriver:
    """A virtio driver's side of one split virtqueue, laid out in guest memory as §2.7 describes.

    Descriptor table at ``base``, available ring after it, used ring 4-byte aligned after that, buffers from a
    bump allocator further up. ``add`` builds a chain (optionally through an indirect table) and puts its head
    in the available ring without publishing; ``kick`` publishes avail idx; ``used`` reads new used elements.
    """

    def __init__(self, mem: GuestMemory, size: int = 16, base: int = 0x1000, event_idx: bool = False,
                 indirect_desc: bool = True, heap: int = 0x8000):
        self.mem, self.size = mem, size
        self.event_idx, self.indirect_desc = event_idx, indirect_desc
        self.desc = base
        self.avail = base + 16 * size
        self.used_ring = (self.avail + 6 + 2 * size + 3) & ~3
        mem.write(base, bytes(self.used_ring + 6 + 8 * size - base))
        self.heap = heap
        self.next_free = 0
        self.avail_idx = 0  # driver's private copy, published by kick()
        self.last_used = 0
        self.buffers: dict[int, tuple[list[int], list[tuple[int, int]]]] = {}

    def queue(self) -> Virtqueue:
        return Virtqueue(self.mem, self.size, self.desc, self.avail, self.used_ring,
                         event_idx=self.event_idx, indirect_desc=self.indirect_desc)

    def alloc(self, n: int, align: int = 16) -> int:
        self.heap = (self.heap + align - 1) & ~(align - 1)
        gpa, self.heap = self.heap, self.heap + max(n, 1)
        return gpa

    def write_desc(self, table: int, i: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.mem.write(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def take(self) -> int:
        i = self.next_free
        self.next_free = (self.next_free + 1) % self.size
        return i

    def add(self, readable: list[bytes] = (), writable: list[int] = (), indirect: bool = False,
            fill: int = 0xEE) -> int:
        """Chain device-readable buffers holding ``readable`` then device-writable ones of ``writable`` sizes
        (pre-filled with ``fill``); returns the head index, already placed in the available ring."""
        bufs = []
        for data in readable:
            gpa = self.alloc(len(data))
            self.mem.write(gpa, data)
            bufs.append((gpa, len(data), 0))
        for n in writable:
            gpa = self.alloc(n)
            self.mem.write(gpa, bytes([fill]) * n)
            bufs.append((gpa, n, WRITE))
        if indirect:
            table = self.alloc(16 * len(bufs))
            for i, (gpa, n, flags) in enumerate(bufs):
                last = i == len(bufs) - 1
                self.write_desc(table, i, gpa, n, flags | (0 if last else NEXT), i + 1)
            head = self.take()
            self.write_desc(self.desc, head, table, 16 * len(bufs), INDIRECT)
        else:
            ids = [self.take() for _ in bufs]
            for k, (gpa, n, flags) in enumerate(bufs):
                last = k == len(bufs) - 1
                self.write_desc(self.desc, ids[k], gpa, n, flags | (0 if last else NEXT), 0 if last else ids[k + 1])
            head = ids[0]
        self.buffers[head] = ([g for g, _, f in bufs if not f], [(g, n) for g, n, f in bufs if f])
        self.place(head)
        return head

    def place(self, head: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    def kick(self) -> None:
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def used(self) -> list[tuple[int, int]]:
        out = []
        idx = self.mem.read_u16(self.used_ring + 2)
        while self.last_used != idx:
            slot = self.used_ring + 4 + 8 * (self.last_used % self.size)
            out.append(struct.unpack("<II", self.mem.read(slot, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def written(self, head: int) -> list[bytes]:
        return [self.mem.read(g, n) for g, n in self.buffers[head][1]]

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write_u16(self.avail, flags)

    def set_used_event(self, idx: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * self.size, idx)

    def avail_event(self) -> int:
        return self.mem.read_u16(self.used_ring + 4 + 8 * self.size)


@pytest.fixture
def mem():
    with GuestMemory([(0, 0x40000)]) as m:
        yield m


# --- chains -------------------------------------------------------------------------------------------------


def test_pop_returns_none_when_nothing_is_available(mem):
    d = FakeDriver(mem)
    q = d.queue()
    d.add([b"x"])  # placed in the ring but avail idx not yet published
    assert q.pop() is None


def test_next_chain_gives_readable_then_writable_views_into_guest_memory(mem):
    d = FakeDriver(mem)
    q = d.queue()
    head = d.add([b"hello", b"world!"], [3, 5])
    d.kick()
    chain = q.pop()
    assert chain.head == head
    assert [bytes(v) for v in chain.readable] == [b"hello", b"world!"]
    assert (chain.read_len, chain.write_len) == (11, 8)
    assert chain.read(3, 5) == b"lowor"
    chain.writable[1][:] = b"ABCDE"  # zero copy: lands in the driver's buffer
    assert d.written(head) == [b"\xee" * 3, b"ABCDE"]
    assert chain.write(2, b"xyz") == 3
    assert d.written(head) == [b"\xee\xeex", b"yzCDE"]
    assert [(g, n, w) for g, n, w in chain.segments] == [
        (d.buffers[head][0][0], 5, False), (d.buffers[head][0][1], 6, False),
        (d.buffers[head][1][0][0], 3, True), (d.buffers[head][1][1][0], 5, True)]


def test_readable_views_cannot_be_written(mem):
    d = FakeDriver(mem)
    q = d.queue()
    d.add([b"ro"])
    d.kick()
    with pytest.raises(TypeError):
        q.pop().readable[0][0] = 1


def test_ranges_slice_across_descriptor_boundaries(mem):
    d = FakeDriver(mem)
    q = d.queue()
    d.add([b"abc", b"defg"], [2, 2, 2])
    d.kick()
    chain = q.pop()
    assert [bytes(v) for v in chain.readable_range(2, 5)] == [b"c", b"de"]
    assert [len(v) for v in chain.writable_range(1, 6)] == [1, 2, 2]
    assert chain.writable_range(5, 99)[0].nbytes == 1
    assert chain.read(5, 100) == b"fg"


def test_indirect_table_chain_is_walked(mem):
    d = FakeDriver(mem)
    q = d.queue()
    head = d.add([b"hdr", b"payload"], [4], indirect=True)
    d.kick()
    chain = q.pop()
    assert chain.head == head
    assert [bytes(v) for v in chain.readable] == [b"hdr", b"payload"]
    assert chain.write_len == 4


def test_direct_descriptors_followed_by_an_indirect_table_are_one_chain(mem):
    # §2.7.5.3.2: "zero or more normal chained descriptors followed by a single descriptor with INDIRECT".
    d = FakeDriver(mem)
    q = d.queue()
    a = d.alloc(2)
    mem.write(a, b"AB")
    b, c = d.alloc(3), d.alloc(4)
    mem.write(b, b"CDE")
    table = d.alloc(32)
    d.write_desc(table, 0, b, 3, NEXT, 1)
    d.write_desc(table, 1, c, 4, WRITE)
    d.write_desc(d.desc, 5, a, 2, NEXT, 6)
    d.write_desc(d.desc, 6, table, 32, INDIRECT | WRITE)  # WRITE on the table pointer is ignored
    d.place(5)
    d.kick()
    chain = q.pop()
    assert [bytes(v) for v in chain.readable] == [b"AB", b"CDE"]
    assert chain.write_len == 4


def test_zero_length_descriptors_yield_no_views(mem):
    d = FakeDriver(mem)
    q = d.queue()
    d.write_desc(d.desc, 0, 0xDEAD_0000, 0, NEXT, 1)  # address never dereferenced
    d.write_desc(d.desc, 1, 0x9000, 8, WRITE)
    d.place(0)
    d.kick()
    chain = q.pop()
    assert (chain.readable, chain.read_len, len(chain.writable)) == ([], 0, 1)


def test_used_elements_reach_the_driver_in_order(mem):
    d = FakeDriver(mem)
    q = d.queue()
    heads = [d.add([b"a"], [8]) for _ in range(3)]
    d.kick()
    for h in heads:
        assert q.pop().head == h
        q.add_used(h, 8 - heads.index(h))
    assert d.used() == [(heads[0], 8), (heads[1], 7), (heads[2], 6)]
    assert q.pop() is None


def test_add_used_rejects_a_head_outside_the_table(mem):
    q = FakeDriver(mem).queue()
    with pytest.raises(ValueError, match="out of range"):
        q.add_used(16, 0)


def test_indices_wrap_at_65536_and_ring_slots_wrap_at_queue_size(mem):
    d = FakeDriver(mem, size=4)
    q = d.queue()
    start = 0xFFFE
    q.restore({**q.state(), "last_avail_idx": start, "used_idx": start})
    d.avail_idx = d.last_used = start
    d.mem.write_u16(d.used_ring + 2, start)
    for round_ in range(3):
        heads = [d.add([bytes([round_, k])]) for k in range(3)]
        d.kick()
        for h in heads:
            chain = q.pop()
            assert chain.head == h
            q.add_used(h, 0)
        assert [u[0] for u in d.used()] == heads
    assert q.last_avail_idx == q.used_idx == (start + 9) & 0xFFFF


def test_a_full_ring_of_queue_size_entries_is_accepted(mem):
    d = FakeDriver(mem, size=4)
    q = d.queue()
    for _ in range(4):
        d.add([b"z"])
    d.kick()
    assert [q.pop().head for _ in range(4)] == [0, 1, 2, 3]
    assert q.pop() is None


# --- notification suppression -------------------------------------------------------------------------------


def used_one(d, q):
    h = d.add([b"r"])
    d.kick()
    q.add_used(q.pop().head, 0)
    return h


def test_without_event_idx_notify_unless_no_interrupt_flag(mem):
    d = FakeDriver(mem)
    q = d.queue()
    used_one(d, q)
    assert q.needs_notification()
    assert not q.needs_notification()  # nothing used since
    d.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    used_one(d, q)
    assert not q.needs_notification()
    d.set_avail_flags(0)
    used_one(d, q)
    assert q.needs_notification()


def test_event_idx_ignores_the_no_interrupt_flag(mem):
    d = FakeDriver(mem, event_idx=True)
    q = d.queue()
    d.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    d.set_used_event(0)
    used_one(d, q)
    assert q.needs_notification()


def test_event_idx_used_event_zero_notifies_after_the_first_buffer_only(mem):
    # §2.7.7 note: used_event 0 -> notify after the first buffer (and again after the 65536th).
    d = FakeDriver(mem, event_idx=True)
    q = d.queue()
    d.set_used_event(0)
    used_one(d, q)
    assert q.needs_notification()
    for _ in range(5):
        used_one(d, q)
        assert not q.needs_notification()


def test_event_idx_notifies_when_a_batch_crosses_used_event(mem):
    d = FakeDriver(mem, event_idx=True)
    q = d.queue()
    d.set_used_event(3)  # "notify when the entry at index 3 is written", i.e. used idx reaches 4
    used_one(d, q)
    used_one(d, q)
    assert not q.needs_notification()  # used idx 0 -> 2: entries 0, 1
    used_one(d, q)
    used_one(d, q)
    assert q.needs_notification()  # used idx 2 -> 4: entries 2, 3 include 3
    used_one(d, q)
    assert not q.needs_notification()


def test_event_idx_used_event_behind_the_batch_does_not_notify(mem):
    d = FakeDriver(mem, event_idx=True)
    q = d.queue()
    for _ in range(3):
        used_one(d, q)
    q.needs_notification()
    d.set_used_event(1)  # stale: already passed
    used_one(d, q)
    assert not q.needs_notification()
    d.set_used_event(4)  # exactly the entry written next
    used_one(d, q)
    assert q.needs_notification()


def test_vring_need_event_wraps_like_the_spec_helper():
    assert vring_need_event(0xFFFF, 1, 0xFFFE)
    assert not vring_need_event(1, 1, 0xFFFE)
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(5, 5, 5)


def test_popping_an_empty_ring_publishes_avail_event_with_event_idx(mem):
    d = FakeDriver(mem, event_idx=True)
    q = d.queue()
    for _ in range(3):
        d.add([b"a"])
    d.kick()
    while q.pop() is not None:
        pass
    assert d.avail_event() == 3  # notify me when you write ring entry 3
    d.add([b"b"])
    d.kick()
    q.set_avail_event(9)
    assert d.avail_event() == 9


def test_avail_event_is_not_written_without_event_idx(mem):
    d = FakeDriver(mem, event_idx=False)
    q = d.queue()
    mem.write_u16(d.used_ring + 4 + 8 * d.size, 0x5555)
    assert q.pop() is None
    q.set_avail_event(1)
    assert d.avail_event() == 0x5555


# --- state ----------------------------------------------------------------------------------------------------


def test_state_round_trip_continues_where_the_old_queue_stopped(mem):
    d = FakeDriver(mem, event_idx=True)
    q = d.queue()
    used_one(d, q)
    h = d.add([b"next"])
    d.kick()
    q2 = Virtqueue.from_state(mem, q.state())
    assert (q2.last_avail_idx, q2.used_idx) == (1, 1)
    assert q2.pop().head == h
    q2.add_used(h, 0)
    d.set_used_event(0)  # already passed: but the first check after restore notifies anyway
    assert q2.needs_notification()


def test_restore_refuses_another_geometry(mem):
    d = FakeDriver(mem)
    state = d.queue().state()
    other = Virtqueue(mem, 8, d.desc, d.avail, d.used_ring)
    with pytest.raises(VirtqueueError, match="size"):
        other.restore(state)


@pytest.mark.parametrize("size, desc, avail, used, rule", [
    (3, 0x1000, 0x2000, 0x3000, "power of 2"),
    (65536, 0x1000, 0x2000, 0x3000, "power of 2"),
    (16, 0x1008, 0x2000, 0x3000, "descriptor table .* aligned"),
    (16, 0x1000, 0x2001, 0x3000, "available ring .* aligned"),
    (16, 0x1000, 0x2000, 0x3002, "used ring .* aligned"),
    (16, 0x3FF10, 0x2000, 0x3000, "descriptor table .* not in guest RAM"),
    (16, 0x1000, 0x2000, 0x3FFF0, "used ring .* not in guest RAM"),
])
def test_queue_geometry_is_checked(mem, size, desc, avail, used, rule):
    with pytest.raises(VirtqueueError, match=rule):
        Virtqueue(mem, size, desc, avail, used)


# --- hostile drivers ----------------------------------------------------------------------------------------


def hostile(d, head=0):
    d.place(head)
    d.kick()
    return d.queue()


def test_loop_in_a_chain_is_refused(mem):
    d = FakeDriver(mem)
    d.write_desc(d.desc, 0, 0x9000, 4, NEXT, 1)
    d.write_desc(d.desc, 1, 0x9000, 4, NEXT, 0)
    with pytest.raises(VirtqueueError, match="loops"):
        hostile(d).pop()


def test_loop_inside_an_indirect_table_is_refused(mem):
    d = FakeDriver(mem)
    d.write_desc(0x6000, 0, 0x9000, 4, NEXT, 1)
    d.write_desc(0x6000, 1, 0x9000, 4, NEXT, 1)
    d.write_desc(d.desc, 0, 0x6000, 32, INDIRECT)
    with pytest.raises(VirtqueueError, match="loops"):
        hostile(d).pop()


def test_chain_with_more_buffers_than_the_queue_size_is_refused(mem):
    d = FakeDriver(mem, size=4)
    for i in range(4):  # a loop-free indirect table of 4 entries after one direct buffer: 5 buffers in all
        d.write_desc(0x6000, i, 0x9000, 4, NEXT if i < 3 else 0, i + 1)
    d.write_desc(d.desc, 0, 0x9000, 4, NEXT, 1)
    d.write_desc(d.desc, 1, 0x6000, 64, INDIRECT)
    with pytest.raises(VirtqueueError, match="more than the queue size"):
        hostile(d).pop()


def test_next_beyond_an_indirect_tables_len_is_refused(mem):
    d = FakeDriver(mem)
    d.write_desc(0x6000, 0, 0x9000, 4, NEXT, 1)
    d.write_desc(0x6000, 1, 0x9000, 4, NEXT, 2)  # table len 32 = 2 entries: next=2 is past it
    d.write_desc(0x6000, 2, 0x9000, 4, 0)
    d.write_desc(d.desc, 0, 0x6000, 32, INDIRECT)
    with pytest.raises(VirtqueueError, match="beyond its 2 entries"):
        hostile(d).pop()


def test_next_beyond_the_descriptor_table_is_refused(mem):
    d = FakeDriver(mem)
    d.write_desc(d.desc, 0, 0x9000, 4, NEXT, 16)
    with pytest.raises(VirtqueueError, match="beyond its 16 entries"):
        hostile(d).pop()


def test_head_beyond_the_descriptor_table_is_refused(mem):
    d = FakeDriver(mem)
    with pytest.raises(VirtqueueError, match="names descriptor 16"):
        hostile(d, head=16).pop()


@pytest.mark.parametrize("addr, length", [(0x40000, 16), (0x3FFF8, 16), (0xFFFF_FFFF_FFFF_FFF0, 0x20)])
def test_buffer_outside_guest_ram_is_refused(mem, addr, length):
    d = FakeDriver(mem)
    d.write_desc(d.desc, 0, addr, length, WRITE)
    with pytest.raises(VirtqueueError, match="not in guest RAM"):
        hostile(d).pop()


def test_buffer_in_the_hole_between_regions_is_refused():
    with GuestMemory([(0, 0x10000), (0x20000, 0x10000)]) as m:
        d = FakeDriver(m)
        d.write_desc(d.desc, 0, 0xF000, 0x2000, 0)  # straddles the end of the first region
        with pytest.raises(VirtqueueError, match="not in guest RAM"):
            hostile(d).pop()


def test_readable_after_writable_is_refused(mem):
    d = FakeDriver(mem)
    d.write_desc(d.desc, 0, 0x9000, 4, WRITE | NEXT, 1)
    d.write_desc(d.desc, 1, 0x9100, 4, 0)
    with pytest.raises(VirtqueueError, match="device-readable but follows a device-writable"):
        hostile(d).pop()


def test_readable_in_an_indirect_table_after_a_direct_writable_is_refused(mem):
    d = FakeDriver(mem)
    d.write_desc(0x6000, 0, 0x9000, 4, 0)
    d.write_desc(d.desc, 0, 0x9100, 4, WRITE | NEXT, 1)
    d.write_desc(d.desc, 1, 0x6000, 16, INDIRECT)
    with pytest.raises(VirtqueueError, match="device-readable but follows"):
        hostile(d).pop()


def test_indirect_descriptor_inside_an_indirect_table_is_refused(mem):
    d = FakeDriver(mem)
    d.write_desc(0x6000, 0, 0x6100, 16, INDIRECT)
    d.write_desc(0x6100, 0, 0x9000, 4, 0)
    d.write_desc(d.desc, 0, 0x6000, 16, INDIRECT)
    with pytest.raises(VirtqueueError, match="nested"):
        hostile(d).pop()


@pytest.mark.parametrize("length", [0, 8, 24])
def test_indirect_table_of_zero_or_odd_length_is_refused(mem, length):
    d = FakeDriver(mem)
    d.write_desc(d.desc, 0, 0x6000, length, INDIRECT)
    with pytest.raises(VirtqueueError, match="zero or not a multiple of 16"):
        hostile(d).pop()


def test_indirect_with_next_is_refused(mem):
    d = FakeDriver(mem)
    d.write_desc(0x6000, 0, 0x9000, 4, 0)
    d.write_desc(d.desc, 0, 0x6000, 16, INDIRECT | NEXT, 1)
    with pytest.raises(VirtqueueError, match="both INDIRECT and NEXT"):
        hostile(d).pop()


def test_indirect_without_the_negotiated_feature_is_refused(mem):
    d = FakeDriver(mem, indirect_desc=False)
    d.write_desc(0x6000, 0, 0x9000, 4, 0)
    d.write_desc(d.desc, 0, 0x6000, 16, INDIRECT)
    with pytest.raises(VirtqueueError, match="VIRTIO_F_INDIRECT_DESC is not negotiated"):
        hostile(d).pop()


def test_indirect_table_outside_guest_ram_is_refused(mem):
    d = FakeDriver(mem)
    d.write_desc(d.desc, 0, 0x3FFF0, 32, INDIRECT)
    with pytest.raises(VirtqueueError, match="indirect table .* not in guest RAM"):
        hostile(d).pop()


def test_avail_idx_jumping_by_more_than_the_queue_size_is_refused(mem):
    d = FakeDriver(mem)
    mem.write_u16(d.avail + 2, 17)
    with pytest.raises(VirtqueueError, match="more than the queue size 16"):
        d.queue().pop()


def test_avail_idx_moving_backwards_is_refused(mem):
    d = FakeDriver(mem)
    q = d.queue()
    used_one(d, q)
    mem.write_u16(d.avail + 2, 0)  # "unexposing" a buffer looks like a jump of 65535
    with pytest.raises(VirtqueueError, match="ahead of the device"):
        q.pop()


def test_chain_longer_than_4_gib_is_refused():
    with GuestMemory([(0, 0xC000_0000)]) as m:  # sparse memfd: only touched pages are allocated
        d = FakeDriver(m)
        d.write_desc(d.desc, 0, 0x1000_0000, 0x8000_0000, NEXT, 1)
        d.write_desc(d.desc, 1, 0x1000_0000, 0x8000_0000, 0)
        with pytest.raises(VirtqueueError, match="2\\^32"):
            hostile(d).pop()


# --- random descriptor tables ----------------------------------------------------------------------------------

REGIONS = [(0, 0x8000), (0x10000, 0x8000)]
QSIZE = 8
DESC, AVAIL, USED = 0x1000, 0x1100, 0x1200
TABLES = [0x2000 + 0x400 * k for k in range(4)]  # where random indirect tables are written


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds):
    def expire(*_):
        raise _Timeout(f"pop() did not return within {seconds} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.py_object), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


def view_gpa(mem: GuestMemory, view: memoryview) -> int:
    """The guest physical address a memoryview points at, from its raw buffer pointer (independent of pop)."""
    pb = _PyBuffer()
    ctypes.pythonapi.PyObject_GetBuffer(ctypes.py_object(view), ctypes.byref(pb), 0)
    try:
        addr = pb.buf
    finally:
        ctypes.pythonapi.PyBuffer_Release(ctypes.byref(pb))
    for r in mem.regions:
        if r.host_address <= addr < r.host_address + r.size:
            assert addr + len(view) <= r.host_address + r.size, "view runs past its RAM region"
            return r.gpa + addr - r.host_address
    raise AssertionError(f"view at host {addr:#x} is not in guest RAM")


def mostly(good, bad):
    """``good`` about seven times in eight, else ``bad`` (rule-breaking values)."""
    return st.sampled_from([good] * 7 + [bad]).flatmap(lambda s: s)


addresses = mostly(st.one_of(st.integers(0x3000, 0x7FFF), st.integers(0x10000, 0x17FFF), st.sampled_from(TABLES)),
                   st.one_of(st.sampled_from([0, 0x7FF0, 0x7FFF, 0x8000, 0x17FF8, 0x18000]),
                             st.integers(0, 2**64 - 1)))
lengths = mostly(st.one_of(st.integers(0, 64), st.sampled_from([16, 32, 48, 64, 160])),
                 st.one_of(st.integers(0, 0x9000), st.sampled_from([0, 8, 24, 0xFFFF_FFFF])))
flag_values = mostly(st.sampled_from([0, NEXT, WRITE, NEXT | WRITE, INDIRECT, INDIRECT | WRITE]),
                     st.integers(0, 0xFFFF))
descriptors = st.tuples(addresses, lengths, flag_values,
                        mostly(st.integers(0, QSIZE - 1), st.integers(QSIZE, QSIZE + 3)))
table_entries = st.tuples(addresses, lengths, flag_values, st.integers(0, 10))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=st.lists(descriptors, min_size=QSIZE + 4, max_size=QSIZE + 4),  # 4 junk entries past the table
       indirect_tables=st.lists(st.lists(table_entries, max_size=10), min_size=4, max_size=4),
       ring=st.lists(mostly(st.integers(0, QSIZE - 1), st.integers(QSIZE, QSIZE + 1)), min_size=QSIZE,
                     max_size=QSIZE),
       avail_idx=mostly(st.integers(1, QSIZE), st.integers(0, 0xFFFF)), event_idx=st.booleans(),
       indirect_desc=st.just(True) | st.booleans())
def test_random_descriptor_tables_never_escape_the_descriptors(table, indirect_tables, ring, avail_idx,
                                                               event_idx, indirect_desc):
    with GuestMemory(REGIONS) as m:
        for base, entries in zip(TABLES, indirect_tables):
            for i, (addr, ln, flags, nxt) in enumerate(entries):
                m.write(base + 16 * i, struct.pack("<QIHH", addr, ln, flags, nxt))
        for i, (addr, ln, flags, nxt) in enumerate(table):
            m.write(DESC + 16 * i, struct.pack("<QIHH", addr, ln, flags, nxt))
        # (addr, len, device_writable) of every descriptor the table names, directly or in the indirect table a
        # descriptor points at (one level: deeper is refused); the junk entries past the table are not named.
        named = []
        for addr, ln, flags, _ in table[:QSIZE]:
            named.append((addr, ln, bool(flags & WRITE)))
            if flags & INDIRECT and ln and ln % 16 == 0 and m.contains(addr, ln):
                for a, n, f, _ in struct.iter_unpack("<QIHH", m.read(addr, ln)):
                    named.append((a, n, bool(f & WRITE)))
        for i, head in enumerate(ring):
            m.write_u16(AVAIL + 4 + 2 * i, head)
        m.write_u16(AVAIL + 2, avail_idx)
        q = Virtqueue(m, QSIZE, DESC, AVAIL, USED, event_idx=event_idx, indirect_desc=indirect_desc)
        before = [m.read(gpa, size) for gpa, size in REGIONS]

        chains = []
        with time_limit(2):
            try:
                for _ in range(QSIZE + 1):
                    chain = q.pop()
                    if chain is None:
                        break
                    chains.append(chain)
            except VirtqueueError:
                event("pop raised VirtqueueError")
        event(f"views returned: {sum(len(c.readable) + len(c.writable) for c in chains) > 0}")

        after_pop = [m.read(gpa, size) for gpa, size in REGIONS]
        avail_event = USED + 4 + 8 * QSIZE
        allowed_pop = [(avail_event, 2)] if event_idx else []
        assert_unchanged_outside(before, after_pop, allowed_pop)

        written = []
        for chain in chains:
            for views, writable in ((chain.readable, False), (chain.writable, True)):
                for v in views:
                    gpa = view_gpa(m, v)
                    assert (gpa, len(v), writable) in named, \
                        f"{'writable' if writable else 'readable'} view {gpa:#x}+{len(v):#x} is no descriptor's buffer"
                    if writable:
                        v[:] = b"\xa5" * len(v)
                        written.append((gpa, len(v)))
            assert chain.read_len == sum(map(len, chain.readable))
            assert chain.write_len == sum(map(len, chain.writable))
        after_write = [m.read(gpa, size) for gpa, size in REGIONS]
        assert_unchanged_outside(after_pop, after_write, written)


def assert_unchanged_outside(before, after, allowed):
    for (base, size), old, new in zip(REGIONS, before, after):
        spans = sorted((max(g - base, 0), min(g + n - base, size))
                       for g, n in allowed if g < base + size and g + n > base)
        pos = 0
        for lo, hi in spans + [(size, size)]:
            if lo > pos:
                assert old[pos:lo] == new[pos:lo], f"memory changed in {base + pos:#x}..{base + lo:#x}"
            pos = max(pos, hi)


# --- host-write log (diff snapshots) ------------------------------------------------------------------------


def test_used_chain_logs_its_writable_buffers_and_the_used_ring_as_host_writes_but_not_readable_ones(mem):
    d = FakeDriver(mem, heap=0x10000)
    q = d.queue()
    head = d.add([b"r" * 5000], [6000, 10])  # a readable buffer over 2 pages, writable ones over 3 pages
    d.kick()
    mem.track_host_writes()  # after the driver's set-up: what follows is the device's doing
    chain = q.pop()
    assert mem.take_host_dirty() == set()  # popping reads only (no EVENT_IDX: no avail_event write)
    chain.write(0, b"w" * 6010)
    q.add_used(chain.head, 6010)
    readable, writable = d.buffers[head]
    want = {p & ~0xFFF for g, n in writable for p in range(g, g + n)}
    want |= {d.used_ring & ~0xFFF, (d.used_ring + 4 + 8 * d.size) & ~0xFFF}
    assert mem.take_host_dirty() == want
    assert readable[0] & ~0xFFF not in want  # the page only the readable buffer covers
    assert mem.take_host_dirty() == set()  # taking starts a new log


def test_without_tracking_nothing_is_logged(mem):
    d = FakeDriver(mem)
    q = d.queue()
    d.add([], [64])
    d.kick()
    q.add_used(q.pop().head, 64)
    assert mem.host_dirty is None and mem.take_host_dirty() == set()
