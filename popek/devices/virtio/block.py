"""virtio-blk (OASIS VIRTIO 1.2 §5.2) over a raw image: configuration space and request execution."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import struct
import tempfile

from popek.devices.virtio.device import VIRTIO_ID_BLOCK, VirtioDevice, VirtioError
from popek.devices.virtio.queue import DescriptorChain, VirtqueueError

log = logging.getLogger(__name__)

# §5.2.3 feature bits (bit numbers, as Linux's virtio_blk.h).
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# §5.2.6 request types and status values.
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

#: §5.2.6: struct virtio_blk_discard_write_zeroes flags.unmap.
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
#: §5.2.6: the device ID string is up to 20 bytes, NUL padded.
VIRTIO_BLK_ID_BYTES = 20
#: The protocol's sector unit (§5.2.4), whatever the backing block size.
SECTOR_SIZE = 512
#: Limits advertised for discard / write zeroes: sectors per segment and segments per request.
MAX_DISCARD_SECTORS = 1 << 22
MAX_DISCARD_SEG = 32

#: §5.2.4 struct virtio_blk_config up to unused1 (secure erase and zoned fields are not offered).
VIRTIO_BLK_CONFIG = struct.Struct("<QII HBB I BBHI BBH IIIII B3x")
VIRTIO_BLK_CONFIG_FIELDS = (
    "capacity", "size_max", "seg_max", "cylinders", "heads", "sectors", "blk_size",
    "physical_block_exp", "alignment_offset", "min_io_size", "opt_io_size", "writeback", "unused0", "num_queues",
    "max_discard_sectors", "max_discard_seg", "discard_sector_alignment", "max_write_zeroes_sectors",
    "max_write_zeroes_seg", "write_zeroes_may_unmap")
#: §5.2.6 struct virtio_blk_req header: type, reserved, sector.
VIRTIO_BLK_REQ_HDR = struct.Struct("<IIQ")
#: §5.2.6 struct virtio_blk_discard_write_zeroes: sector, num_sectors, flags.
VIRTIO_BLK_DISCARD_WRITE_ZEROES = struct.Struct("<QII")

# fallocate(2) modes, linux/falloc.h.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_IOV_MAX = os.sysconf("SC_IOV_MAX")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a ``mode`` (Python's os.posix_fallocate has none); offset and length in bytes.

    :raises OSError: with the errno fallocate set (EOPNOTSUPP where the filesystem lacks the mode).
    """
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(mode={mode:#x}): {os.strerror(err)}")


def _probe_fallocate(directory: str) -> tuple[bool, bool]:
    """(punch-hole, zero-range) support of the filesystem of ``directory``, tried on a scratch file there."""
    try:
        with tempfile.TemporaryFile(dir=directory) as f:
            os.ftruncate(f.fileno(), 2 * 4096)
            result = []
            for mode in (FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE):
                try:
                    fallocate(f.fileno(), mode | FALLOC_FL_KEEP_SIZE, 0, 4096)
                    result.append(True)
                except OSError:
                    result.append(False)
            return result[0], result[1]
    except OSError as e:
        log.info("virtio-blk: cannot probe fallocate support in %s (%s); no discard/write zeroes", directory, e)
        return False, False


class Block(VirtioDevice):
    """A virtio block device (§5.2, device ID 2) backed by a raw image file or a host block device.

    Capacity is the image size in 512-byte sectors (a trailing partial sector is not visible). Offered:
    VIRTIO_BLK_F_FLUSH, F_SEG_MAX (``queue_size`` - 2), F_BLK_SIZE (512), F_RO when ``readonly``, and - for a
    writable regular file on a filesystem where fallocate(2) supports them (probed on a scratch file next to the
    image) - F_DISCARD (FALLOC_FL_PUNCH_HOLE) and F_WRITE_ZEROES (FALLOC_FL_ZERO_RANGE; a request with ``unmap``
    punches a hole instead when punching works). Host block devices get neither.

    Requests (§5.2.6): T_IN/T_OUT with ``os.preadv``/``os.pwritev`` straight between the image and the chain's
    guest-memory views; T_FLUSH returns only after fdatasync(2); T_GET_ID writes the serial (NUL padded to 20
    bytes); T_DISCARD/T_WRITE_ZEROES take up to MAX_DISCARD_SEG segments. Other types get VIRTIO_BLK_S_UNSUPP.
    Out-of-range sectors, data not a multiple of 512 bytes, writes to a read-only device and host I/O errors
    (OSError) get VIRTIO_BLK_S_IOERR; no request raises out of the device. The status is the last byte of the
    device-writable buffers; the used length reported is all writable bytes (as QEMU does). A request without a
    16-byte header or without a status byte breaks the framing and stops the queue (VirtqueueError).

    :param path: the image file or block device.
    :param readonly: open O_RDONLY and offer VIRTIO_BLK_F_RO.
    :param serial: the device ID string (ASCII, at most 20 bytes); default empty.
    :param queue_size: the request queue's maximum size (a power of 2, 4..32768).
    :raises VirtioError: if the image is missing, not a file or block device, cannot be opened as asked
        (a file with no write permission bits is refused read-write even for root), or the serial is invalid.
    """

    device_id = VIRTIO_ID_BLOCK
    name = "virtio-blk"

    def __init__(self, path: str | os.PathLike, readonly: bool = False, serial: str | None = None,
                 queue_size: int = 256):
        self.path, self.readonly = os.fspath(path), bool(readonly)
        if queue_size < 4 or queue_size > 32768 or queue_size & (queue_size - 1):
            raise VirtioError(f"virtio-blk: queue size {queue_size} is not a power of 2 in 4..32768")
        try:
            self.serial = (serial or "").encode("ascii")
        except UnicodeEncodeError:
            raise VirtioError(f"virtio-blk: serial {serial!r} is not ASCII") from None
        if len(self.serial) > VIRTIO_BLK_ID_BYTES:
            raise VirtioError(f"virtio-blk: serial {serial!r} is longer than {VIRTIO_BLK_ID_BYTES} bytes")
        self.fd = open_image(self.path, self.readonly)
        try:
            st = os.fstat(self.fd)
            size = os.lseek(self.fd, 0, os.SEEK_END)
            if stat.S_ISREG(st.st_mode) and not readonly:
                punch, zero = _probe_fallocate(os.path.dirname(os.path.abspath(self.path)))
            else:
                punch = zero = False
        except OSError as e:
            os.close(self.fd)
            raise VirtioError(f"virtio-blk: cannot inspect image {self.path!r}: {e.strerror}") from e
        if size % SECTOR_SIZE:
            log.warning("virtio-blk: %s is %d bytes, not a multiple of %d; the last %d bytes are not visible",
                        self.path, size, SECTOR_SIZE, size % SECTOR_SIZE)
        self.capacity = size // SECTOR_SIZE
        self.can_punch_hole, self.can_zero_range = punch, zero
        features = 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_BLK_F_BLK_SIZE
        if readonly:
            features |= 1 << VIRTIO_BLK_F_RO
        if punch:
            features |= 1 << VIRTIO_BLK_F_DISCARD
        if zero:
            features |= 1 << VIRTIO_BLK_F_WRITE_ZEROES
        alignment = max(st.st_blksize // SECTOR_SIZE, 1) if stat.S_ISREG(st.st_mode) else 1
        config = VIRTIO_BLK_CONFIG.pack(
            self.capacity, 0, queue_size - 2, 0, 0, 0, SECTOR_SIZE,  # capacity, size_max, seg_max, geometry
            0, 0, 0, 0, 0, 0, 1,  # topology, writeback, unused0, num_queues
            MAX_DISCARD_SECTORS if punch else 0, MAX_DISCARD_SEG if punch else 0, alignment if punch else 0,
            MAX_DISCARD_SECTORS if zero else 0, MAX_DISCARD_SEG if zero else 0, 1 if zero and punch else 0)
        super().__init__(features, config, [queue_size])

    def close(self) -> None:
        """Reset the device and close the image."""
        self.reset()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # --- requests -------------------------------------------------------------------------------------------

    def handle_chain(self, index: int, chain: DescriptorChain) -> int:
        if chain.read_len < VIRTIO_BLK_REQ_HDR.size:
            raise VirtqueueError(f"virtio-blk request {chain.head} has {chain.read_len} readable bytes, less than "
                                 f"the {VIRTIO_BLK_REQ_HDR.size}-byte header (§5.2.6)")
        if chain.write_len < 1:
            raise VirtqueueError(f"virtio-blk request {chain.head} has no device-writable status byte (§5.2.6)")
        type_, _reserved, sector = VIRTIO_BLK_REQ_HDR.unpack(chain.read(0, VIRTIO_BLK_REQ_HDR.size))
        try:
            status = self._execute(type_, sector, chain)
        except OSError as e:
            log.warning("virtio-blk %s: request type %d at sector %d failed: %s", self.path, type_, sector, e)
            status = VIRTIO_BLK_S_IOERR
        chain.writable_range(chain.write_len - 1, chain.write_len)[0][0] = status
        return chain.write_len

    def _in_range(self, sector: int, nbytes: int) -> bool:
        return nbytes % SECTOR_SIZE == 0 and sector * SECTOR_SIZE + nbytes <= self.capacity * SECTOR_SIZE

    def _execute(self, type_: int, sector: int, chain: DescriptorChain) -> int:
        hdr = VIRTIO_BLK_REQ_HDR.size
        if type_ == VIRTIO_BLK_T_IN:
            n = chain.write_len - 1
            if not self._in_range(sector, n):
                return VIRTIO_BLK_S_IOERR
            self._transfer(os.preadv, chain.writable_range(0, n), sector * SECTOR_SIZE)
            return VIRTIO_BLK_S_OK
        if type_ == VIRTIO_BLK_T_OUT:
            n = chain.read_len - hdr
            if self.readonly or not self._in_range(sector, n):
                return VIRTIO_BLK_S_IOERR
            self._transfer(os.pwritev, chain.readable_range(hdr, chain.read_len), sector * SECTOR_SIZE)
            return VIRTIO_BLK_S_OK
        if type_ == VIRTIO_BLK_T_FLUSH:
            os.fdatasync(self.fd)
            return VIRTIO_BLK_S_OK
        if type_ == VIRTIO_BLK_T_GET_ID:
            chain.write(0, self.serial.ljust(VIRTIO_BLK_ID_BYTES, b"\0")[:chain.write_len - 1])
            return VIRTIO_BLK_S_OK
        if type_ in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            return self._discard_write_zeroes(type_, chain)
        return VIRTIO_BLK_S_UNSUPP

    def _discard_write_zeroes(self, type_: int, chain: DescriptorChain) -> int:
        if self.readonly:
            return VIRTIO_BLK_S_IOERR
        discard = type_ == VIRTIO_BLK_T_DISCARD
        if not self.features >> (VIRTIO_BLK_F_DISCARD if discard else VIRTIO_BLK_F_WRITE_ZEROES) & 1:
            return VIRTIO_BLK_S_UNSUPP
        seg, hdr = VIRTIO_BLK_DISCARD_WRITE_ZEROES.size, VIRTIO_BLK_REQ_HDR.size
        n = chain.read_len - hdr
        if n == 0 or n % seg or n // seg > MAX_DISCARD_SEG:
            return VIRTIO_BLK_S_IOERR
        segments = [VIRTIO_BLK_DISCARD_WRITE_ZEROES.unpack(chain.read(hdr + i, seg)) for i in range(0, n, seg)]
        for sector, count, flags in segments:
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (discard and flags):
                return VIRTIO_BLK_S_UNSUPP  # unknown flags; unmap on a discard (§5.2.6.2)
            if count > MAX_DISCARD_SECTORS or not self._in_range(sector, count * SECTOR_SIZE):
                return VIRTIO_BLK_S_IOERR
        for sector, count, flags in segments:
            if count == 0:
                continue
            if discard or (flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP and self.can_punch_hole):
                mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            else:
                mode = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
            fallocate(self.fd, mode, sector * SECTOR_SIZE, count * SECTOR_SIZE)
        return VIRTIO_BLK_S_OK

    def _transfer(self, fn, views: list[memoryview], offset: int) -> None:
        """Run ``os.preadv``/``os.pwritev`` over all ``views`` from ``offset``, resuming after short transfers."""
        views = list(views)
        i = 0
        while i < len(views):
            done = fn(self.fd, views[i:i + _IOV_MAX], offset)
            if done <= 0:
                raise OSError(errno.EIO, f"image ended at byte {offset}")
            offset += done
            while done and i < len(views):
                if done >= len(views[i]):
                    done -= len(views[i])
                    i += 1
                else:
                    views[i], done = views[i][done:], 0

    # --- snapshot -------------------------------------------------------------------------------------------

    def state(self) -> dict:
        return {**super().state(), "capacity": self.capacity, "readonly": self.readonly}

    def restore(self, state: dict, *args, **kwargs) -> None:
        """As ``VirtioDevice.restore``; the image must have the same capacity and read-only mode.

        :raises VirtioError: if they differ.
        """
        if (state["capacity"], state["readonly"]) != (self.capacity, self.readonly):
            raise VirtioError(f"virtio-blk: state is for a {state['capacity']}-sector "
                              f"{'read-only ' if state['readonly'] else ''}disk, {self.path!r} has "
                              f"{self.capacity} sectors{' (read-only)' if self.readonly else ''}")
        super().restore(state, *args, **kwargs)


def open_image(path, readonly: bool, *, readonly_hint: str = "readonly=True") -> int:
    """Open a raw disk image (regular file or block device) for a virtio-blk device; returns the fd.

    An image asked read-write that has no write permission bits is refused even for root, who could open it anyway.
    :param readonly_hint: how the caller's user asks for read-only (named in the error).
    :raises VirtioError: missing, not a file or block device, or not openable as asked.
    """
    what = f"image {os.fspath(path)!r}"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise VirtioError(f"{what} does not exist") from None
    except OSError as e:
        raise VirtioError(f"{what} cannot be accessed: {e.strerror}") from e
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise VirtioError(f"{what} is neither a regular file nor a block device")
    if not readonly and not st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        raise VirtioError(f"{what} is read-only (no write permission bits); attach it with {readonly_hint}")
    try:
        return os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as e:
        if not readonly and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ETXTBSY):
            raise VirtioError(f"{what} cannot be opened read-write ({e.strerror}); "
                              f"attach it with {readonly_hint}") from e
        raise VirtioError(f"{what} cannot be opened: {e.strerror}") from e
