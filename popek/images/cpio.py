"""newc ("070701") cpio archive writer, the format of a Linux initramfs."""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import Iterable

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


class CpioError(ValueError):
    """An entry cannot be written: bad name, missing parent directory, duplicate, or a field too large."""


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. `name` is relative ("bin/sh"; a leading "/" is dropped), `mode` holds the file type bits
    (stat.S_IFREG/S_IFDIR/S_IFLNK/S_IFCHR/S_IFBLK) and permissions, `data` is the file content or, for a symlink,
    the target path. `rdevmajor`/`rdevminor` are the device number of a device node; `mtime` is in seconds."""

    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    rdevmajor: int = 0
    rdevminor: int = 0


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


class CpioWriter:
    """Builds a newc archive in memory, as Documentation/driver-api/early-userspace/buffer-format.rst describes:
    a 110-byte header ("070701" + 13 eight-digit hex fields), the NUL-terminated name padded so header+name is a
    multiple of 4 bytes, the data padded to a multiple of 4, and a closing "TRAILER!!!" entry.

    The kernel's unpacker creates no missing parents, so every entry's parent directory must have been added
    before it (CpioError otherwise). Each entry gets its own inode number and nlink 1 (2 for directories): hard
    links are not written. Raises CpioError for empty, absolute-after-strip, ".."-containing or duplicate names."""

    def __init__(self) -> None:
        self._out = bytearray()
        self._names: set[str] = set()
        self._dirs: set[str] = {""}
        self._ino = 0
        self._closed = False

    def add(self, entry: CpioEntry) -> None:
        """Append one entry (see CpioEntry); raises CpioError as described in the class docstring."""
        if self._closed:
            raise CpioError("cpio archive already finished; no entries can follow the trailer")
        name = entry.name.lstrip("/").rstrip("/")
        parts = name.split("/")
        if not name or "\0" in name or any(p in ("", ".", "..") for p in parts):
            raise CpioError(f"invalid cpio entry name {entry.name!r}: need a relative path without '.', '..' or '//'")
        if name in self._names:
            raise CpioError(f"duplicate cpio entry {name!r}")
        parent = "/".join(parts[:-1])
        if parent not in self._dirs:
            raise CpioError(f"cpio entry {name!r} comes before its parent directory {parent!r}")
        if stat.S_IFMT(entry.mode) == 0:
            raise CpioError(f"cpio entry {name!r}: mode {entry.mode:#o} has no file type bits")
        is_dir = stat.S_ISDIR(entry.mode)
        if is_dir and entry.data:
            raise CpioError(f"cpio directory entry {name!r} cannot carry data")
        self._ino += 1
        self._emit(name, entry, self._ino, 2 if is_dir else 1)
        self._names.add(name)
        if is_dir:
            self._dirs.add(name)

    def add_dir(self, name: str, mode: int = 0o755, mtime: int = 0) -> None:
        """Add a directory `name` with permission bits `mode`."""
        self.add(CpioEntry(name, stat.S_IFDIR | mode, mtime=mtime))

    def add_file(self, name: str, data: bytes, mode: int = 0o644, mtime: int = 0) -> None:
        """Add a regular file `name` holding `data` (at most 4 GiB - 1), permission bits `mode`."""
        self.add(CpioEntry(name, stat.S_IFREG | mode, bytes(data), mtime=mtime))

    def add_symlink(self, name: str, target: str, mtime: int = 0) -> None:
        """Add a symbolic link `name` -> `target` (the target is stored as the entry's data)."""
        self.add(CpioEntry(name, stat.S_IFLNK | 0o777, target.encode(), mtime=mtime))

    def add_device(self, name: str, kind: str, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a device node: `kind` "c" (S_IFCHR) or "b" (S_IFBLK), device number major:minor
        (e.g. /dev/console is "c" 5:1, Documentation/admin-guide/devices.txt)."""
        if kind not in ("c", "b"):
            raise CpioError(f"device kind must be 'c' or 'b', not {kind!r}")
        ftype = stat.S_IFCHR if kind == "c" else stat.S_IFBLK
        self.add(CpioEntry(name, ftype | mode, rdevmajor=major, rdevminor=minor))

    def finish(self) -> bytes:
        """Append the "TRAILER!!!" entry and return the archive bytes (a multiple of 4 bytes long)."""
        if not self._closed:
            self._emit(TRAILER, CpioEntry(TRAILER, 0), 0, 1)
            self._closed = True
        return bytes(self._out)

    def _emit(self, name: str, e: CpioEntry, ino: int, nlink: int) -> None:
        encoded = name.encode() + b"\0"
        fields = (ino, e.mode, e.uid, e.gid, nlink, e.mtime, len(e.data), 0, 0, e.rdevmajor, e.rdevminor,
                  len(encoded), 0)
        for value in fields:
            if not 0 <= value <= 0xFFFFFFFF:
                raise CpioError(f"cpio entry {name!r}: field value {value} does not fit 32 bits")
        header = NEWC_MAGIC + b"".join(b"%08X" % v for v in fields)
        self._out += header + encoded + _pad4(len(header) + len(encoded))
        self._out += e.data + _pad4(len(e.data))


def write_newc(entries: Iterable[CpioEntry]) -> bytes:
    """Return a complete newc archive (with trailer) of `entries`, in order; see CpioWriter for the rules."""
    writer = CpioWriter()
    for entry in entries:
        writer.add(entry)
    return writer.finish()
