"""virtio-balloon (VIRTIO 1.2 §5.5): features and config, inflate releasing host memory (memfd and private file
mappings), hostile PFNs, deflate, the held statistics buffer, free page reporting, and state/restore."""

from __future__ import annotations

import os
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popek.devices.virtio import balloon as balloon_mod
from popek.devices.virtio.balloon import (DEFLATEQ, INFLATEQ, REPORTING_VQ, STATSQ, VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
                                          VIRTIO_BALLOON_F_PAGE_REPORTING, VIRTIO_BALLOON_F_STATS_VQ, Balloon)
from popek.devices.virtio.device import VIRTIO_F_VERSION_1, VIRTIO_ID_BALLOON, VirtioError
from popek.memory import GuestMemory, GuestMemoryError
from test_virtio_pci import DRIVER_OK, NEEDS_RESET, env  # noqa: F401  (env: the transport fixture)
from test_virtqueue import WRITE, FakeDriver

PAGE = 4096
#: Guest RAM of the tests: two regions with a hole between them, like the PC layout around 3-4 GiB.
LOW, HIGH = (0, 0x100000), (0x400000, 0x100000)
#: Pages the tests inflate: above the rings and buffer heaps the fake drivers use (all below 0x80000).
FREE = 0x80000


def pfns_request(pfns) -> bytes:
    return struct.pack(f"<{len(pfns)}I", *pfns)


class Guest:
    """A balloon driven by one FakeDriver per queue in two-region guest memory."""

    def __init__(self, mem: GuestMemory, dev: Balloon):
        self.mem, self.dev = mem, dev
        n = len(dev.queue_max_sizes)
        self.drivers = [FakeDriver(mem, base=0x1000 + 0x1000 * i, heap=0x10000 + 0x10000 * i) for i in range(n)]
        self.notes: list[int] = []
        self.config_changes = 0
        assert dev.ack_features(dev.features)
        dev.activate(mem, [d.queue() for d in self.drivers], self.notes.append, self._changed)

    def _changed(self) -> None:
        self.config_changes += 1

    def send(self, index: int, readable=(), writable=()) -> int:
        head = self.drivers[index].add(list(readable), list(writable))
        self.kick(index)
        return head

    def kick(self, index: int) -> None:
        self.drivers[index].kick()
        self.dev.queue_notify(index)
        assert self.dev.wait_idle(5)

    def used(self, index: int):
        return self.drivers[index].used()


@pytest.fixture
def mem():
    with GuestMemory([LOW, HIGH]) as m:
        yield m


@pytest.fixture
def guest(mem):
    dev = Balloon(free_page_reporting=True, deflate_on_oom=True)
    g = Guest(mem, dev)
    yield g
    dev.reset()


def allocated(mem: GuestMemory) -> int:
    """Bytes the memfds hold (st_blocks is in 512-byte units, stat(2))."""
    return sum(os.fstat(r.fd).st_blocks * 512 for r in mem.regions)


def test_balloon_is_device_5_offering_stats_and_the_asked_features_with_a_queue_each():
    plain = Balloon()
    assert plain.device_id == VIRTIO_ID_BALLOON == 5
    assert plain.features & 0xFFFFFF == 1 << VIRTIO_BALLOON_F_STATS_VQ
    assert len(plain.queue_max_sizes) == 3  # inflateq, deflateq, statsq
    full = Balloon(deflate_on_oom=True, free_page_reporting=True)
    assert full.features & 0xFFFFFF == (1 << VIRTIO_BALLOON_F_STATS_VQ | 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM
                                        | 1 << VIRTIO_BALLOON_F_PAGE_REPORTING)
    assert len(full.queue_max_sizes) == 4 and REPORTING_VQ == 3


def test_a_driver_without_statsq_has_reporting_vq_as_its_queue_2(mem):
    dev = Balloon(free_page_reporting=True)
    assert dev.ack_features(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BALLOON_F_PAGE_REPORTING)
    assert dev.queues_in_use() == 3
    drivers = [FakeDriver(mem, base=0x1000 + 0x1000 * i, heap=0x10000 + 0x10000 * i) for i in range(3)]
    with pytest.raises(VirtioError, match="has 3 queues, activated with 4"):
        dev.activate(mem, [d.queue() for d in drivers] + [FakeDriver(mem, base=0x5000).queue()], print)
    dev.activate(mem, [d.queue() for d in drivers], print)
    try:
        mem.write(FREE, b"\x44" * PAGE)
        drivers[2].write_desc(drivers[2].desc, 0, FREE, PAGE, WRITE, 0)
        drivers[2].place(0)
        drivers[2].kick()
        dev.queue_notify(2)
        assert dev.wait_idle(5) and drivers[2].used() == [(0, 0)]
        assert mem.read(FREE, PAGE) == bytes(PAGE) and dev.counters["reported_pages"] == 1
        assert not dev.request_stats()  # no statsq
    finally:
        dev.reset()


def test_config_is_num_pages_then_actual_and_only_actual_is_driver_writable():
    dev = Balloon(target_pages=1234)
    assert dev.config_read(0, 8) == struct.pack("<II", 1234, 0)
    dev.config_write(0, struct.pack("<II", 7, 99))
    assert (dev.target_pages, dev.actual_pages) == (1234, 99)
    dev.config_write(6, b"\x01")  # a partial write merges into actual
    assert dev.actual_pages == 99 | 1 << 16


def test_a_new_target_sends_a_configuration_change_once_the_driver_runs(guest):
    before = guest.config_changes
    guest.dev.set_target(256)
    assert guest.dev.target_pages == 256 and guest.config_changes == before + 1
    with pytest.raises(VirtioError, match="not a le32"):
        guest.dev.set_target(1 << 32)


def test_inflate_gives_the_pages_back_to_the_host_and_they_read_as_zero(guest, mem):
    pages = [FREE // PAGE + i for i in range(64)] + [HIGH[0] // PAGE + 3]
    for p in pages:
        mem.write(p * PAGE, b"\xab" * PAGE)
    mem.write(guest.drivers[INFLATEQ].heap, b"\0")  # the page the request itself goes into, allocated up front
    held = allocated(mem)
    head = guest.send(INFLATEQ, readable=[pfns_request(pages)])
    assert guest.used(INFLATEQ) == [(head, 0)]
    assert held - allocated(mem) == len(pages) * PAGE
    assert all(mem.read(p * PAGE, PAGE) == bytes(PAGE) for p in pages)
    assert guest.dev.counters["inflated_pages"] == len(pages) and guest.dev.counters["bad_pfns"] == 0


def test_inflate_leaves_pages_next_to_the_balloon_alone(guest, mem):
    mem.write(FREE, b"\x11" * PAGE * 3)
    guest.send(INFLATEQ, readable=[pfns_request([FREE // PAGE + 1])])
    assert mem.read(FREE, PAGE) == b"\x11" * PAGE and mem.read(FREE + 2 * PAGE, PAGE) == b"\x11" * PAGE
    assert mem.read(FREE + PAGE, PAGE) == bytes(PAGE)


def test_deflate_is_counted_and_releases_nothing(guest, mem):
    mem.write(FREE, b"\x22" * PAGE)
    head = guest.send(DEFLATEQ, readable=[pfns_request([FREE // PAGE, 0xFFFFFFFF])])
    assert guest.used(DEFLATEQ) == [(head, 0)]
    assert mem.read(FREE, PAGE) == b"\x22" * PAGE
    assert guest.dev.counters["deflated_pages"] == 1 and guest.dev.counters["bad_pfns"] == 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pfns=st.lists(st.one_of(st.integers(0, 0xFFFFFFFF), st.integers(0, 0x600),
                               st.integers(FREE // PAGE, 0x500)), max_size=300),
       tail=st.binary(max_size=3))
def test_hostile_pfns_release_only_whole_pages_inside_guest_ram(mem, monkeypatch, pfns, tail):
    released = []
    monkeypatch.setattr(mem, "release", lambda gpa, size: released.append((gpa, size)))
    dev = Balloon()
    g = Guest(mem, dev)
    try:
        head = g.send(INFLATEQ, readable=[pfns_request(pfns) + tail])
        assert g.used(INFLATEQ) == [(head, 0)] and not dev.needs_reset
    finally:
        dev.reset()
    pages = set()
    for gpa, size in released:
        assert gpa % PAGE == 0 and size % PAGE == 0 and size > 0
        assert any(r.gpa <= gpa and gpa + size <= r.end for r in mem.regions)  # one region, never outside
        pages.update(range(gpa, gpa + size, PAGE))
    in_ram = {p * PAGE for p in pfns if mem.contains(p * PAGE, PAGE)}
    assert pages == in_ram and sum(s for _, s in released) == len(in_ram) * PAGE  # each page once
    assert dev.counters["bad_pfns"] == len(set(pfns)) - len(in_ram)


def test_stats_buffer_is_read_and_held_until_the_device_asks_again(guest):
    stats = struct.pack("<HQ", 4, 100 << 20) + struct.pack("<HQ", 5, 256 << 20) + struct.pack("<HQ", 77, 1)
    head = guest.send(STATSQ, readable=[stats])
    assert guest.used(STATSQ) == []  # held (§5.5.6.3)
    s = guest.dev.stats()
    assert s["free_memory"] == 100 << 20 and s["total_memory"] == 256 << 20 and "77" not in str(s)
    assert s["updates"] == 1 and s["age_s"] is not None
    assert guest.dev.request_stats()
    assert guest.dev.wait_idle(5)
    assert guest.used(STATSQ) == [(head, 0)]
    assert not guest.dev.request_stats()  # nothing held until the driver refills
    guest.send(STATSQ, readable=[struct.pack("<HQ", 4, 50 << 20)])
    assert guest.dev.stats()["free_memory"] == 50 << 20 and guest.dev.stats()["updates"] == 2


def test_a_stats_buffer_made_available_before_driver_ok_is_read_at_activation(mem):
    dev = Balloon()
    drivers = [FakeDriver(mem, base=0x1000 + 0x1000 * i, heap=0x10000 + 0x10000 * i) for i in range(3)]
    drivers[STATSQ].add([struct.pack("<HQ", 5, 42)])
    drivers[STATSQ].kick()
    dev.queue_notify(STATSQ)  # dropped: not active yet
    assert dev.ack_features(dev.features)
    dev.activate(mem, [d.queue() for d in drivers], print)
    try:
        assert dev.wait_stats(0, 5) and dev.stats()["total_memory"] == 42
    finally:
        dev.reset()


def test_a_polling_interval_returns_the_stats_buffer_by_itself(mem):
    dev = Balloon(stats_interval_s=1)
    g = Guest(mem, dev)
    try:
        head = g.send(STATSQ, readable=[struct.pack("<HQ", 4, 1)])
        deadline = time.monotonic() + 5
        used = []
        while not used and time.monotonic() < deadline:
            time.sleep(0.1)
            used = g.used(STATSQ)
        assert used == [(head, 0)]
        dev.set_stats_interval(0)
        assert dev.stats_interval_s == 0
    finally:
        dev.reset()
    assert dev._poller is None


def test_reported_free_pages_are_released_whole_pages_only(guest, mem):
    mem.write(FREE, b"\x33" * PAGE * 4)
    drv = guest.drivers[REPORTING_VQ]
    # one report of two ranges: 2 whole pages, and a range covering only part of a page (kept)
    drv.write_desc(drv.desc, 0, FREE, 2 * PAGE, WRITE | 1, 1)
    drv.write_desc(drv.desc, 1, FREE + 3 * PAGE + 16, PAGE - 16, WRITE, 0)
    drv.place(0)
    guest.kick(REPORTING_VQ)
    assert guest.used(REPORTING_VQ) == [(0, 0)]
    assert mem.read(FREE, 2 * PAGE) == bytes(2 * PAGE)
    assert mem.read(FREE + 3 * PAGE, PAGE) == b"\x33" * PAGE
    assert guest.dev.counters["reported_pages"] == 2


def test_state_restore_keeps_config_stats_and_the_held_buffer(guest, mem):
    guest.dev.set_target(300)
    guest.dev.config_write(4, struct.pack("<I", 200))
    head = guest.send(STATSQ, readable=[struct.pack("<HQ", 6, 123)])
    saved = guest.dev.state()
    other = Balloon(free_page_reporting=True, deflate_on_oom=True)
    other.restore(saved, mem, guest.notes.append)
    try:
        assert (other.target_pages, other.actual_pages) == (300, 200)
        assert other.stats()["available_memory"] == 123
        assert other.request_stats() and other.wait_idle(5)
        assert guest.used(STATSQ) == [(head, 0)]
    finally:
        other.reset()


def test_restore_refuses_features_the_device_does_not_offer(guest, mem):
    saved = guest.dev.state()
    with pytest.raises(VirtioError, match="does not offer"):
        Balloon().restore(saved, mem, print)


def test_reset_empties_actual_keeps_the_target_and_stops_the_poller(guest):
    guest.dev.set_target(10)
    guest.dev.config_write(4, struct.pack("<I", 10))
    guest.dev.reset()
    assert (guest.dev.target_pages, guest.dev.actual_pages) == (10, 0) and guest.dev._poller is None
    assert guest.dev.ack_features(1 << VIRTIO_F_VERSION_1)


# --- GuestMemory.release ------------------------------------------------------------------------------------------

def test_release_punches_the_memfd_and_rss_drops(mem):
    mem.write(0, b"\x5a" * 0x80000)
    before = allocated(mem)
    mem.release(0x40000, 0x20000)
    assert before - allocated(mem) == 0x20000
    assert mem.read(0x40000, 0x20000) == bytes(0x20000) and mem.read(0x3F000, 1) == b"\x5a"


def test_release_refuses_unaligned_or_outside_ranges(mem):
    for gpa, size in ((1, PAGE), (0, 100), (0, 0), (LOW[1] - PAGE, 2 * PAGE), (0x200000, PAGE)):
        with pytest.raises(GuestMemoryError):
            mem.release(gpa, size)


def test_release_of_a_private_file_mapping_reads_the_file_back(tmp_path):
    path = tmp_path / "mem"
    path.write_bytes(b"\x01" * 2 * PAGE)
    with GuestMemory.from_file(path, [(0, 2 * PAGE)]) as m:
        m.write(0, b"\x02" * 2 * PAGE)
        m.release(PAGE, PAGE)
        assert m.read(0, 1) == b"\x02" and m.read(PAGE, PAGE) == b"\x01" * PAGE
    assert path.read_bytes() == b"\x01" * 2 * PAGE


def test_release_marks_pages_dirty_for_diff_snapshots(mem):
    mem.track_host_writes()
    mem.release(FREE, 2 * PAGE)
    assert mem.take_host_dirty() == {FREE, FREE + PAGE}


def test_pfn_chunks_cover_a_request_longer_than_one_chunk(guest, mem, monkeypatch):
    monkeypatch.setattr(balloon_mod, "PFN_CHUNK_BYTES", 8)
    pages = [FREE // PAGE + i for i in range(5)]
    guest.send(INFLATEQ, readable=[pfns_request(pages)])
    assert guest.dev.counters["inflated_pages"] == 5


def test_over_pci_the_driver_enables_only_the_queues_its_features_give_it(env):  # noqa: F811
    dev, drv, _, _ = env(Balloon(free_page_reporting=True))
    assert drv.rd("num_queues") == 4
    assert drv.negotiate(1 << VIRTIO_F_VERSION_1)  # no statsq, no reporting_vq: inflateq and deflateq only
    for index in (0, 1):
        drv.setup_queue(index)
        drv.wr("queue_enable", 1)
    drv.add_status(DRIVER_OK)
    assert not drv.status() & NEEDS_RESET and dev.failure is None
    assert dev.device.active and len(dev.device.queues) == 2
