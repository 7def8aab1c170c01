"""virtio-blk (VIRTIO 1.2 §5.2) against a temporary image: config, every request type checked on disk, the error
statuses, read-only and host-error handling, framing errors stopping the queue, worker thread, reset, state."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading

import pytest

from popek.devices.virtio import block
from popek.devices.virtio.block import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE,
                                        MAX_DISCARD_SEG, VIRTIO_BLK_CONFIG, VIRTIO_BLK_CONFIG_FIELDS,
                                        VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
                                        VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
                                        VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
                                        VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
                                        VIRTIO_BLK_T_GET_LIFETIME, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
                                        VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, Block,
                                        fallocate)
from popek.devices.virtio.device import (VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK, VIRTIO_RING_F_EVENT_IDX,
                                         VIRTIO_RING_F_INDIRECT_DESC, VirtioError)
from popek.devices.virtio.queue import VIRTQ_DESC_F_NEXT
from popek.memory import GuestMemory
from test_virtqueue import FakeDriver

SECTORS = 64
PATTERN = bytes((i * 7 + i // 512) & 0xFF for i in range(SECTORS * 512))


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(PATTERN)
    return path


@pytest.fixture
def mem():
    with GuestMemory([(0, 0x100000)]) as m:
        yield m


class Disk:
    """A Block device activated on one FakeDriver queue; ``request`` submits one request and waits for it."""

    def __init__(self, dev: Block, mem: GuestMemory, event_idx: bool = False):
        self.dev, self.mem = dev, mem
        self.driver = FakeDriver(mem, size=16, event_idx=event_idx, heap=0x10000)
        self.notifications: list[tuple[int, str]] = []
        features = dev.features if event_idx else dev.features & ~(1 << VIRTIO_RING_F_EVENT_IDX)
        assert dev.ack_features(features)
        dev.activate(mem, [self.driver.queue()], lambda i: self.notifications.append(
            (i, threading.current_thread().name)))

    def submit(self, type_, sector=0, out=(), in_sizes=(), status_own=True, indirect=False):
        hdr = struct.pack("<IIQ", type_, 0, sector)
        readable = [hdr, *out]
        writable = [*in_sizes, 1] if status_own else [*in_sizes[:-1], in_sizes[-1] + 1]
        head = self.driver.add(readable, writable, indirect=indirect, fill=0xEE)
        self.driver.kick()
        self.dev.queue_notify(0)
        return head

    def request(self, type_, sector=0, out=(), in_sizes=(), status_own=True, indirect=False):
        """Returns (status, bytes the device wrote before the status, used len)."""
        head = self.submit(type_, sector, out, in_sizes, status_own, indirect)
        assert self.dev.wait_idle(5)
        used = self.driver.used()
        assert [u[0] for u in used] == [head]
        data = b"".join(self.driver.written(head))
        return data[-1], data[:-1], used[0][1]


@pytest.fixture
def disk(image, mem):
    dev = Block(image, serial="popek-0001")
    yield Disk(dev, mem)
    dev.close()


def on_disk(image, sector, count):
    return image.read_bytes()[sector * 512:(sector + count) * 512]


def config(dev):
    return dict(zip(VIRTIO_BLK_CONFIG_FIELDS, VIRTIO_BLK_CONFIG.unpack(dev.config_read(0, VIRTIO_BLK_CONFIG.size))))


# --- configuration ------------------------------------------------------------------------------------------


def test_config_reports_capacity_in_sectors_seg_max_and_blk_size(image):
    dev = Block(image, queue_size=128)
    cfg = config(dev)
    assert dev.device_id == VIRTIO_ID_BLOCK == 2
    assert (cfg["capacity"], cfg["seg_max"], cfg["blk_size"], cfg["num_queues"]) == (SECTORS, 126, 512, 1)
    assert (cfg["size_max"], cfg["cylinders"], cfg["writeback"], cfg["unused0"]) == (0, 0, 0, 0)
    for bit in (VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_F_VERSION_1,
                VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC):
        assert dev.features >> bit & 1, bit
    assert not dev.features >> VIRTIO_BLK_F_RO & 1
    assert dev.config_read(VIRTIO_BLK_CONFIG.size - 3, 8) == bytes(8)  # unused1, then past the end: zeros
    dev.close()


def test_trailing_partial_sector_is_not_part_of_the_capacity(tmp_path):
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(3 * 512 + 100))
    dev = Block(path)
    assert config(dev)["capacity"] == 3
    dev.close()


def fallocate_works(directory, mode):
    fd = os.open(directory, os.O_TMPFILE | os.O_RDWR)
    try:
        os.ftruncate(fd, 8192)
        fallocate(fd, mode | FALLOC_FL_KEEP_SIZE, 0, 4096)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@pytest.mark.parametrize("where", ["tmp_path", "/dev/shm"])
def test_discard_and_write_zeroes_offered_exactly_where_fallocate_supports_them(tmp_path, where):
    directory = str(tmp_path) if where == "tmp_path" else where
    if not os.path.isdir(directory):
        pytest.skip(f"{directory} does not exist here")
    path = os.path.join(directory, f"popek-probe-{os.getpid()}.img")
    with open(path, "wb") as f:
        f.write(bytes(8 * 512))
    try:
        dev = Block(path)
        punch = fallocate_works(directory, FALLOC_FL_PUNCH_HOLE)
        zero = fallocate_works(directory, FALLOC_FL_ZERO_RANGE)
        assert bool(dev.features >> VIRTIO_BLK_F_DISCARD & 1) == punch
        assert bool(dev.features >> VIRTIO_BLK_F_WRITE_ZEROES & 1) == zero
        cfg = config(dev)
        assert (cfg["max_discard_seg"] > 0) == punch and (cfg["max_write_zeroes_seg"] > 0) == zero
        assert cfg["write_zeroes_may_unmap"] == int(punch and zero)
        dev.close()
    finally:
        os.unlink(path)


def test_readonly_device_offers_ro_opens_o_rdonly_and_no_discard(image):
    dev = Block(image, readonly=True)
    assert dev.features >> VIRTIO_BLK_F_RO & 1
    assert not dev.features & (1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES)
    assert fcntl.fcntl(dev.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    dev.close()


def test_missing_image_is_a_clear_error(tmp_path):
    with pytest.raises(VirtioError, match="does not exist"):
        Block(tmp_path / "nope.img")


def test_read_only_file_asked_read_write_is_a_clear_error(image):
    os.chmod(image, 0o444)
    with pytest.raises(VirtioError, match="read-only .*readonly=True"):
        Block(image)
    Block(image, readonly=True).close()


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(VirtioError, match="neither a regular file nor a block device"):
        Block(tmp_path)


@pytest.mark.parametrize("serial, rule", [("x" * 21, "longer than 20"), ("disque-\u00e9", "not ASCII")])
def test_bad_serial_is_refused(image, serial, rule):
    with pytest.raises(VirtioError, match=rule):
        Block(image, serial=serial)


# --- requests -----------------------------------------------------------------------------------------------


def test_read_fills_split_buffers_from_the_image(disk):
    status, data, used_len = disk.request(VIRTIO_BLK_T_IN, sector=3, in_sizes=[700, 324])
    assert status == VIRTIO_BLK_S_OK
    assert data == PATTERN[3 * 512:5 * 512]
    assert used_len == 1025


def test_read_with_status_sharing_the_last_data_descriptor(disk):
    status, data, _ = disk.request(VIRTIO_BLK_T_IN, sector=10, in_sizes=[512], status_own=False)
    assert status == VIRTIO_BLK_S_OK and data == PATTERN[10 * 512:11 * 512]


def test_read_through_an_indirect_table(disk):
    status, data, _ = disk.request(VIRTIO_BLK_T_IN, sector=1, in_sizes=[512, 512], indirect=True)
    assert status == VIRTIO_BLK_S_OK and data == PATTERN[512:3 * 512]


def test_write_lands_on_disk_from_split_buffers(disk, image):
    payload = bytes(range(256)) * 6
    status, _, used_len = disk.request(VIRTIO_BLK_T_OUT, sector=7, out=[payload[:100], payload[100:1000],
                                                                         payload[1000:]])
    assert (status, used_len) == (VIRTIO_BLK_S_OK, 1)
    assert on_disk(image, 7, 3) == payload
    assert on_disk(image, 6, 1) == PATTERN[6 * 512:7 * 512] and on_disk(image, 10, 1) == PATTERN[10 * 512:11 * 512]


def test_short_host_transfers_are_resumed(disk, monkeypatch):
    real = os.preadv

    def dribble(fd, views, offset):  # at most 100 bytes per call, like a short read
        first = views[0][:100]
        return real(fd, [first], offset)
    monkeypatch.setattr(block.os, "preadv", dribble)
    status, data, _ = disk.request(VIRTIO_BLK_T_IN, sector=2, in_sizes=[300, 724])
    assert status == VIRTIO_BLK_S_OK and data == PATTERN[1024:2048]


def test_flush_syncs_before_the_status_is_written(disk, monkeypatch):
    seen = []

    def fake_fdatasync(fd):
        head = disk.driver.mem.read_u16(disk.driver.avail + 4)
        status_gpa, _ = disk.driver.buffers[head][1][-1]
        seen.append((fd, disk.driver.mem.read_u8(status_gpa)))
    monkeypatch.setattr(block.os, "fdatasync", fake_fdatasync)
    status, _, _ = disk.request(VIRTIO_BLK_T_FLUSH)
    assert status == VIRTIO_BLK_S_OK
    assert seen == [(disk.dev.fd, 0xEE)]  # synced while the status byte was still the driver's fill


def test_flush_failure_is_ioerr(disk, monkeypatch):
    def broken(fd):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(block.os, "fdatasync", broken)
    assert disk.request(VIRTIO_BLK_T_FLUSH)[0] == VIRTIO_BLK_S_IOERR


def test_get_id_returns_the_serial_nul_padded_to_20_bytes(disk):
    status, data, _ = disk.request(VIRTIO_BLK_T_GET_ID, in_sizes=[20])
    assert status == VIRTIO_BLK_S_OK and data == b"popek-0001" + bytes(10)


def test_get_id_of_a_20_byte_serial_has_no_nul(image, mem):
    dev = Block(image, serial="S" * 20)
    status, data, _ = Disk(dev, mem).request(VIRTIO_BLK_T_GET_ID, in_sizes=[20])
    assert status == VIRTIO_BLK_S_OK and data == b"S" * 20
    dev.close()


def segment(sector, count, flags=0):
    return struct.pack("<QII", sector, count, flags)


def needs(disk, feature):
    if not disk.dev.features >> feature & 1:
        pytest.skip("the filesystem under tmp_path lacks the fallocate mode")


def test_discard_reads_back_zeroes_and_frees_blocks(disk, image):
    needs(disk, VIRTIO_BLK_F_DISCARD)
    blocks = os.stat(image).st_blocks
    status, _, _ = disk.request(VIRTIO_BLK_T_DISCARD, out=[segment(8, 16), segment(40, 8)])
    assert status == VIRTIO_BLK_S_OK
    assert on_disk(image, 8, 16) == bytes(16 * 512) and on_disk(image, 40, 8) == bytes(8 * 512)
    assert on_disk(image, 24, 16) == PATTERN[24 * 512:40 * 512]
    assert os.stat(image).st_blocks < blocks
    assert os.path.getsize(image) == SECTORS * 512


@pytest.mark.parametrize("flags", [0, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP])
def test_write_zeroes_reads_back_zeroes(disk, image, flags):
    needs(disk, VIRTIO_BLK_F_WRITE_ZEROES)
    status, _, _ = disk.request(VIRTIO_BLK_T_WRITE_ZEROES, out=[segment(3, 5, flags)])
    assert status == VIRTIO_BLK_S_OK
    assert on_disk(image, 3, 5) == bytes(5 * 512)
    assert on_disk(image, 2, 1) == PATTERN[1024:1536] and on_disk(image, 8, 1) == PATTERN[8 * 512:9 * 512]
    assert os.path.getsize(image) == SECTORS * 512


@pytest.mark.parametrize("type_, flags", [(VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
                                          (VIRTIO_BLK_T_DISCARD, 2), (VIRTIO_BLK_T_WRITE_ZEROES, 4)])
def test_discard_with_unmap_or_unknown_flags_is_unsupp_and_changes_nothing(disk, image, type_, flags):
    needs(disk, VIRTIO_BLK_F_DISCARD if type_ == VIRTIO_BLK_T_DISCARD else VIRTIO_BLK_F_WRITE_ZEROES)
    status, _, _ = disk.request(type_, out=[segment(0, 8), segment(8, 8, flags)])
    assert status == VIRTIO_BLK_S_UNSUPP
    assert image.read_bytes() == PATTERN


def test_discard_with_too_many_segments_is_ioerr(disk, image):
    needs(disk, VIRTIO_BLK_F_DISCARD)
    status, _, _ = disk.request(VIRTIO_BLK_T_DISCARD, out=[segment(0, 1) * (MAX_DISCARD_SEG + 1)])
    assert status == VIRTIO_BLK_S_IOERR and image.read_bytes() == PATTERN


def test_unsupported_request_types_are_unsupp(disk):
    for type_ in (VIRTIO_BLK_T_GET_LIFETIME, 2, 99):
        assert disk.request(type_, in_sizes=[8])[0] == VIRTIO_BLK_S_UNSUPP


@pytest.mark.parametrize("type_, sector, out, in_sizes", [
    (VIRTIO_BLK_T_IN, SECTORS - 1, (), [1024]),
    (VIRTIO_BLK_T_IN, SECTORS, (), [512]),
    (VIRTIO_BLK_T_IN, 2**64 - 1, (), [512]),
    (VIRTIO_BLK_T_OUT, SECTORS - 1, (bytes(1024),), ()),
    (VIRTIO_BLK_T_IN, 0, (), [100]),  # not a multiple of 512
    (VIRTIO_BLK_T_OUT, 0, (bytes(513),), ()),
])
def test_out_of_range_or_unaligned_transfers_are_ioerr_and_write_nothing(disk, image, type_, sector, out,
                                                                         in_sizes):
    status, data, _ = disk.request(type_, sector=sector, out=out, in_sizes=in_sizes)
    assert status == VIRTIO_BLK_S_IOERR
    assert image.read_bytes() == PATTERN
    assert set(data) <= {0xEE}  # nothing read into the buffers either


def test_discard_beyond_capacity_is_ioerr(disk, image):
    needs(disk, VIRTIO_BLK_F_DISCARD)
    status, _, _ = disk.request(VIRTIO_BLK_T_DISCARD, out=[segment(0, 8), segment(SECTORS - 4, 8)])
    assert status == VIRTIO_BLK_S_IOERR and image.read_bytes() == PATTERN


def test_readonly_device_rejects_writes_with_ioerr(image, mem):
    dev = Block(image, readonly=True)
    d = Disk(dev, mem)
    assert d.request(VIRTIO_BLK_T_OUT, sector=0, out=[bytes(512)])[0] == VIRTIO_BLK_S_IOERR
    assert d.request(VIRTIO_BLK_T_WRITE_ZEROES, out=[segment(0, 1)])[0] == VIRTIO_BLK_S_IOERR
    assert d.request(VIRTIO_BLK_T_DISCARD, out=[segment(0, 1)])[0] == VIRTIO_BLK_S_IOERR
    assert image.read_bytes() == PATTERN
    status, data, _ = d.request(VIRTIO_BLK_T_IN, sector=1, in_sizes=[512])
    assert status == VIRTIO_BLK_S_OK and data == PATTERN[512:1024]
    dev.close()


def test_host_eio_becomes_ioerr_and_the_device_keeps_working(disk, monkeypatch):
    def eio(fd, views, offset):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(block.os, "preadv", eio)
    monkeypatch.setattr(block.os, "pwritev", eio)
    assert disk.request(VIRTIO_BLK_T_IN, sector=0, in_sizes=[512])[0] == VIRTIO_BLK_S_IOERR
    assert disk.request(VIRTIO_BLK_T_OUT, sector=0, out=[bytes(512)])[0] == VIRTIO_BLK_S_IOERR
    assert not disk.dev.needs_reset
    monkeypatch.undo()
    status, data, _ = disk.request(VIRTIO_BLK_T_IN, sector=0, in_sizes=[512])
    assert status == VIRTIO_BLK_S_OK and data == PATTERN[:512]


def test_image_shrunk_under_the_device_gives_ioerr(disk, image):
    os.truncate(image, 512)
    assert disk.request(VIRTIO_BLK_T_IN, sector=4, in_sizes=[512])[0] == VIRTIO_BLK_S_IOERR


# --- framing errors, worker, reset, state ---------------------------------------------------------------------


def test_request_without_a_status_byte_stops_the_queue_and_flags_needs_reset(disk):
    changed = []
    disk.dev._config_changed = lambda: changed.append(True)
    d = disk.driver
    d.add([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)], [])
    d.kick()
    disk.dev.queue_notify(0)
    assert disk.dev.wait_idle(5)
    assert disk.dev.needs_reset and "no device-writable status byte" in disk.dev.reset_reason
    assert changed == [True]
    d.add([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)], [512, 1])  # a good request is no longer served
    d.kick()
    disk.dev.queue_notify(0)
    assert disk.dev.wait_idle(5)
    assert d.used() == []


def test_request_with_a_short_header_stops_the_queue(disk):
    d = disk.driver
    d.add([b"\0" * 8], [1])
    d.kick()
    disk.dev.queue_notify(0)
    assert disk.dev.wait_idle(5)
    assert disk.dev.needs_reset and "header" in disk.dev.reset_reason


def test_hostile_chain_flags_needs_reset_without_raising(disk):
    d = disk.driver
    d.write_desc(d.desc, 0, 0x20000, 16, VIRTQ_DESC_F_NEXT, 0)  # loops on itself
    d.place(0)
    d.kick()
    disk.dev.queue_notify(0)
    assert disk.dev.wait_idle(5)
    assert disk.dev.needs_reset and "loops" in disk.dev.reset_reason
    disk.dev.reset()
    assert not disk.dev.needs_reset and not disk.dev.active


def test_requests_run_on_the_worker_thread_and_notify_from_it(disk):
    disk.request(VIRTIO_BLK_T_IN, sector=0, in_sizes=[512])
    assert disk.notifications == [(0, "virtio-blk-worker")]


def test_event_idx_suppresses_notifications_until_used_event(image, mem):
    dev = Block(image)
    d = Disk(dev, mem, event_idx=True)
    d.driver.set_used_event(1)
    d.request(VIRTIO_BLK_T_IN, sector=0, in_sizes=[512])
    assert d.notifications == []
    d.request(VIRTIO_BLK_T_IN, sector=0, in_sizes=[512])
    assert len(d.notifications) == 1
    dev.close()


def test_after_reset_kicks_are_ignored_and_guest_memory_untouched(disk, image):
    disk.dev.reset()
    d = disk.driver
    d.add([struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 0), bytes(512)], [1])
    d.kick()
    disk.dev.queue_notify(0)
    assert disk.dev.wait_idle(5)
    assert d.mem.read_u16(d.used_ring + 2) == 0
    assert image.read_bytes() == PATTERN


def test_state_restored_into_a_new_device_serves_requests_made_before_the_snapshot(disk, image, mem):
    disk.request(VIRTIO_BLK_T_IN, sector=0, in_sizes=[512])
    state = disk.dev.state()
    disk.dev.reset()
    head = disk.driver.add([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 5)], [512, 1])
    disk.driver.kick()  # made available, never notified
    dev2 = Block(image)
    notes = []
    dev2.restore(state, mem, notes.append)
    assert dev2.wait_idle(5)
    assert disk.driver.used() == [(head, 513)]
    assert b"".join(disk.driver.written(head)) == PATTERN[5 * 512:6 * 512] + b"\0"
    assert notes == [0]
    dev2.close()


def test_restore_refuses_a_disk_of_another_size(disk, tmp_path, mem):
    state = disk.dev.state()
    other = tmp_path / "small.img"
    other.write_bytes(bytes(512))
    dev2 = Block(other)
    with pytest.raises(VirtioError, match="64-sector"):
        dev2.restore(state, mem, lambda i: None)
    dev2.close()
