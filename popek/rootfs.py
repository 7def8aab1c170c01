"""Booting from a root file system image: which disk a VM gets as /dev/vda, its kernel arguments, private copies."""

from __future__ import annotations

import fcntl
import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

from popek.vm import DriveConfig, VmError

#: Kernel arguments for a root file system on the first virtio-blk disk, with Popek's init
#: (Documentation/admin-guide/kernel-parameters.txt: root=, rw, rootfstype=, init=).
ROOT_ARGS = ("root=/dev/vda", "rw", "rootfstype=ext4", "init=/sbin/popek-init")

#: ext4's superblock starts 1024 bytes into the device; s_magic (0xEF53, little-endian) is 56 bytes into it
#: (Linux fs/ext4/ext4.h, struct ext4_super_block).
EXT4_MAGIC_OFFSET, EXT4_MAGIC = 1024 + 56, b"\x53\xef"

#: Where private copies of named images live while their VM runs (the image cache's file system, so a reflink
#: copy is possible): <cache>/rootfs-run/<pid>-<random>.ext4.
RUN_DIR = "rootfs-run"


def is_image_name(rootfs: str | os.PathLike) -> bool:
    """True if ``rootfs`` names a root file system Popek builds ("debian") rather than a path."""
    from popek.images.rootfs import ROOTFS_KINDS

    return isinstance(rootfs, str) and rootfs in ROOTFS_KINDS


def check_image_path(path: str | os.PathLike) -> Path:
    """Refuse a root file system PATH the guest could not boot from: missing, not a regular file or block device,
    not readable and writable, or without ext4's superblock magic.

    :raises VmError: naming the path and why.
    """
    from popek.devices.virtio.block import open_image
    from popek.devices.virtio.device import VirtioError

    path = Path(path)
    what = f"root file system {os.fspath(path)!r}"
    try:
        fd = open_image(path, False, readonly_hint="a writable copy of it")
    except VirtioError as e:
        raise VmError(f"root file system: {e} (give an ext4 image, or 'debian' for Popek's)") from None
    try:
        magic = os.pread(fd, 2, EXT4_MAGIC_OFFSET)
    finally:
        os.close(fd)
    if magic != EXT4_MAGIC:
        raise VmError(f"{what} is not an ext4 file system image (no ext4 superblock magic)")
    return path


@dataclass
class RootDisk:
    """The disk a VM boots from: ``path`` is attached read-write as /dev/vda; ``private`` means it is a copy of
    ``source`` that ``close`` removes. While open, ``path`` holds an exclusive flock, so two VMs never share one
    writable root."""

    path: Path
    source: Path
    private: bool
    _lock_fd: int | None = None

    @property
    def drive(self) -> DriveConfig:
        return DriveConfig(self.path)

    def close(self) -> None:
        """Release the lock and remove a private copy (idempotent)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self.private:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self.private = False

    def __enter__(self) -> "RootDisk":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _lock(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise VmError(f"root file system {os.fspath(path)!r} is in use by another VM") from None
    return fd


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_copies(run_dir: Path) -> list[Path]:
    """Remove private copies whose VMM process is gone (a run killed before it could clean up): files named
    <pid>-*.ext4 in ``run_dir`` whose pid does not exist and that no one holds locked. Returns what was removed."""
    removed = []
    for path in run_dir.glob("*-*.ext4"):
        pid = path.name.split("-", 1)[0]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        try:
            os.close(_lock(path))
        except (VmError, OSError):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def private_copy(source: Path, run_dir: Path) -> Path:
    """A sparse copy of ``source`` in ``run_dir`` (a reflink where the file system can; ``cp --reflink=auto
    --sparse=always``), named <our pid>-<random>.ext4. A failed copy leaves nothing.

    :raises VmError: if the copy fails (e.g. no space), with cp's message.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_copies(run_dir)
    dest = run_dir / f"{os.getpid()}-{secrets.token_hex(4)}.ext4"
    proc = subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(source), str(dest)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        dest.unlink(missing_ok=True)
        raise VmError(f"cannot copy root file system {source} for this run: {proc.stderr.strip()}")
    return dest


def open_root_disk(rootfs: str | os.PathLike, *, persist: bool = False, size: int | None = None,
                   progress: bool = False) -> RootDisk:
    """The disk to boot for ``rootfs``: a name ("debian") is built on first use (``popek.images.rootfs``) and, unless
    ``persist``, booted as a private copy removed by ``RootDisk.close`` (the cached image is never modified); a path
    is checked (``check_image_path``) and used in place, so the guest's writes persist. ``size`` (bytes) selects
    the named image built with that size.

    :raises VmError: bad path, image in use by another VM, copy failed; ``popek.images.cache.ImageError`` when the
        named image cannot be built.
    """
    if is_image_name(rootfs):
        from popek.images.cache import cache_root
        from popek.images.rootfs import build_rootfs

        source = build_rootfs(str(rootfs), size=size, progress=progress).path
        if not persist:
            path = private_copy(source, cache_root() / RUN_DIR)
            disk = RootDisk(path, source, private=True)
            try:
                disk._lock_fd = _lock(path)
            except BaseException:
                disk.close()
                raise
            return disk
    else:
        source = check_image_path(rootfs)
    return RootDisk(source, source, private=False, _lock_fd=_lock(source))


def check_boot_inputs(rootfs: str | os.PathLike, kernel: str | os.PathLike | None,
                      initrd: str | os.PathLike | None) -> None:
    """Refuse, before any slow work, what cannot boot from ``rootfs``: an initrd (the kernel mounts the disk as
    root itself), the "debian" kernel (its virtio-blk driver is a module that only an initramfs could load), a
    PATH ``check_image_path`` refuses, or a named image this host cannot build (``popek.images.rootfs.rootfs_key``).

    :raises VmError, popek.images.cache.ImageError: saying which and why.
    """
    if initrd is not None:
        raise VmError("a root file system boots without an initramfs: give --rootfs or --initrd, not both")
    if kernel is not None and str(kernel) == "debian":
        raise VmError("the debian kernel has virtio-blk as a module and cannot mount a root disk without an "
                      "initramfs; boot --rootfs with the microvm kernel (the default) or a kernel PATH")
    if is_image_name(rootfs):
        from popek.images.rootfs import rootfs_key

        rootfs_key(str(rootfs))
    else:
        check_image_path(rootfs)


def root_append(append: str) -> str:
    """``append`` with ROOT_ARGS in front (the user's arguments stay last, so they can override ours)."""
    return " ".join(a for a in (" ".join(ROOT_ARGS), append) if a)


def detached_copy_path(name: str) -> Path:
    """Where detached VM ``name``'s private copy of a named image lives until ``popek rm`` (``remove_detached_copy``):
    <cache>/rootfs-run/vm-<name>.ext4 (not <pid>-..., so ``remove_stale_copies`` leaves it alone)."""
    from popek.images.cache import cache_root

    return cache_root() / RUN_DIR / f"vm-{name}.ext4"


def detached_root(rootfs: str | os.PathLike, name: str, *, persist: bool = False, size: int | None = None,
                  progress: bool = False) -> tuple[Path, Path | None]:
    """(the root disk detached VM ``name`` boots, the image to copy there first or None). A named image is built
    on first use and, unless ``persist``, booted as a copy at ``detached_copy_path(name)`` (made by
    ``copy_detached``, as late as possible); a PATH is used in place.

    :raises VmError, popek.images.cache.ImageError: as ``open_root_disk``.
    """
    if not is_image_name(rootfs):
        return check_image_path(rootfs).resolve(), None
    from popek.images.rootfs import build_rootfs

    source = build_rootfs(str(rootfs), size=size, progress=progress).path
    return (source, None) if persist else (detached_copy_path(name), source)


def copy_detached(source: Path, name: str) -> Path:
    """Copy ``source`` to ``detached_copy_path(name)`` (sparse or reflink; appears whole or not at all).

    :raises VmError: if the copy fails.
    """
    dest = detached_copy_path(name)
    os.replace(private_copy(source, dest.parent), dest)
    return dest


def remove_detached_copy(name: str) -> None:
    """Remove detached VM ``name``'s private root disk copy, if it has one."""
    detached_copy_path(name).unlink(missing_ok=True)


def root_drive_spec(path: Path) -> dict:
    """The Firecracker Drive object (PUT /drives/rootfs) of a root disk: read-write, ``is_root_device``."""
    return {"drive_id": "rootfs", "path_on_host": os.path.abspath(path), "is_root_device": True,
            "is_read_only": False}
