"""Guest image builds: the "microvm" and "debian" kernels with a busybox initramfs, found in or added to the cache."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from popek.images import agent, cache, debian, microvm
from popek.images.cache import ImageError
from popek.images.cpio import CpioWriter

__all__ = ["GuestImage", "ImageError", "KINDS", "build_image", "find_image", "image_key", "make_initramfs"]

KINDS = ("microvm", "debian")
INIT = Path(__file__).with_name("init")
# Applets linked into /bin (the init's and a user's needs); /sbin, /usr/bin and /usr/sbin are symlinks to /bin.
# A short list rather than `busybox --list-full`: the kernel unpacks every cpio entry at emulated speed.
APPLETS = (
    "sh ash mount umount cat echo ls uname dd base64 printf reboot poweroff halt sync setsid cttyhack modprobe insmod "
    "rmmod lsmod hostname sleep mkdir rmdir ps head tail grep sed sha256sum md5sum wc env true false id date dmesg "
    "ip nc wget mdev cp mv rm ln chmod touch cut tr sort uniq tee find xargs awk kill free df du stat test [ vi "
    "ifconfig route ping udhcpc stty tty seq expr od hexdump time timeout"
).split()


# Part of every cache key: a change to the initramfs contents below rebuilds the images.
_INITRAMFS_LAYOUT = f"v2 applets {' '.join(APPLETS)}"


@dataclass(frozen=True)
class GuestImage:
    """A built guest image: `kernel` (microvm: ELF vmlinux; debian: bzImage vmlinuz), `initrd` (uncompressed newc
    cpio), `system_map` (None when the kernel package ships none), `version` (the kernel release, `uname -r` in the
    guest) and `name` (the cache entry's directory name)."""

    name: str
    kernel: Path
    initrd: Path
    system_map: Path | None
    version: str


def _digest(*parts: bytes) -> str:
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:12]


def _microvm_kernel_key() -> str:
    version = microvm.source_version() or debian.candidate_version(microvm.SOURCE_PACKAGE, update=False)
    return cache.entry_name("microvm-kernel", version, _digest(microvm.FRAGMENT.read_bytes()))


def image_key(kind: str, *, update: bool = False) -> str:
    """Cache entry name of image `kind`, from its inputs' versions as apt sees them (no network unless `update`):
    microvm-<linux-source-6.1 version>-<sha256(fragment, init, busybox version, initramfs layout, agent.c)[:12]>,
    debian-<kernel release>-<kernel package version>-<busybox version>-<sha256(init, modules, layout,
    agent.c)[:12]>. (The microvm kernel has its own key: an agent change rebuilds only the initramfs.)
    Raises ImageError for an unknown kind or when apt cannot name a version."""
    busybox = debian.candidate_version(debian.BUSYBOX_PACKAGE, update=update)  # what `apt-get download` fetches
    init, layout = INIT.read_bytes(), _INITRAMFS_LAYOUT.encode() + b"\0" + agent.SOURCE.read_bytes()
    if kind == "microvm":
        source = microvm.source_version() or debian.candidate_version(microvm.SOURCE_PACKAGE, update=update)
        return cache.entry_name("microvm", source, _digest(microvm.FRAGMENT.read_bytes(), init, busybox.encode(),
                                                           layout))
    if kind == "debian":
        package = debian.resolve_kernel_package(update=update)
        version = debian.candidate_version(package, update=update)
        modules = " ".join(debian.GUEST_MODULES).encode()
        return cache.entry_name("debian", debian.kernel_release(package), version, busybox,
                                _digest(init, modules, layout))
    raise ImageError(f"unknown guest image kind {kind!r}; choose one of {', '.join(KINDS)}")


def _busybox_applets(busybox: Path) -> set[str] | None:
    """Applet names the binary reports (`busybox --list`), or None if it cannot run on this host."""
    try:
        proc = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(proc.stdout.split()) if proc.returncode == 0 else None


def _add_tree(writer: CpioWriter, root: Path, prefix: str) -> None:
    """Add directory `root`'s contents under archive path `prefix` (whose parents are already in the archive)."""
    for path in sorted(root.rglob("*")):
        name = f"{prefix}/{path.relative_to(root).as_posix()}"
        if path.is_symlink():
            writer.add_symlink(name, os.readlink(path))
        elif path.is_dir():
            writer.add_dir(name)
        else:
            writer.add_file(name, path.read_bytes(), stat.S_IMODE(path.stat().st_mode))


def make_initramfs(busybox: Path, modules_root: Path | None = None, init: Path = INIT,
                   agent_binary: Path | None = None) -> bytes:
    """The guest initramfs as uncompressed newc cpio bytes: /init (`init`, mode 0755), /bin/busybox with symlinks
    for APPLETS, /sbin, /usr/bin, /usr/sbin -> bin, /dev/console (c 5:1, the console before devtmpfs), empty /proc
    /sys /dev /tmp /root /run, /etc/passwd and /etc/group for root, and, if `modules_root` is given, its lib/ tree
    (lib/modules/<release>/...), and, if `agent_binary` is given, the guest agent as /bin/popek-agent (mode 0755;
    popek.images.agent). Raises ImageError if the busybox binary lacks a listed applet."""
    have = _busybox_applets(busybox)
    if have is not None and (missing := [a for a in APPLETS if a not in have]):
        raise ImageError(f"{busybox} lacks applets the guest needs: {', '.join(missing)}")
    w = CpioWriter()
    for d, mode in (("bin", 0o755), ("dev", 0o755), ("etc", 0o755), ("proc", 0o555), ("sys", 0o555),
                    ("tmp", 0o1777), ("root", 0o700), ("run", 0o755), ("usr", 0o755)):
        w.add_dir(d, mode)
    w.add_device("dev/console", "c", 5, 1, 0o600)
    w.add_file("init", init.read_bytes(), 0o755)
    w.add_file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in APPLETS:
        w.add_symlink(f"bin/{applet}", "busybox")
    w.add_symlink("sbin", "bin")
    w.add_symlink("usr/bin", "../bin")
    w.add_symlink("usr/sbin", "../bin")
    w.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    w.add_file("etc/group", b"root:x:0:\n")
    if agent_binary is not None:
        w.add_file(agent.GUEST_PATH, agent_binary.read_bytes(), 0o755)
    if modules_root is not None and (modules_root / "lib").is_dir():
        w.add_dir("lib")
        _add_tree(w, modules_root / "lib", "lib")
    return w.finish()


def _say(progress: bool, message: str) -> None:
    if progress:
        from rich.console import Console

        Console(stderr=True).print(f"[bold]popek images[/bold]: {message}")


def _write_manifest(entry: Path, image: dict) -> None:
    (entry / "image.json").write_text(json.dumps(image, indent=1) + "\n")


def _from_entry(entry: Path) -> GuestImage:
    data = json.loads((entry / "image.json").read_text())
    return GuestImage(name=entry.name, kernel=entry / data["kernel"], initrd=entry / data["initrd"],
                      system_map=entry / data["system_map"] if data["system_map"] else None, version=data["version"])


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _build_microvm(entry: Path, kernel_dir: Path, progress: bool) -> None:
    _say(progress, "fetching busybox-static")
    busybox = debian.fetch_busybox(entry / "work")
    (entry / "initrd.cpio").write_bytes(make_initramfs(busybox, agent_binary=agent.build_agent(entry / "work" /
                                                                                             "popek-agent")))
    for name in ("vmlinux", "System.map", "config", "build.log"):
        _link_or_copy(kernel_dir / name, entry / name)
    shutil.rmtree(entry / "work")
    _write_manifest(entry, {"kernel": "vmlinux", "initrd": "initrd.cpio", "system_map": "System.map",
                            "version": (kernel_dir / "release").read_text().strip()})


def _build_debian(entry: Path, progress: bool) -> None:
    package = debian.resolve_kernel_package()
    _say(progress, f"fetching {package} and busybox-static")
    work = entry / "work"
    kernel = debian.fetch_kernel(package, work)
    busybox = debian.fetch_busybox(work)
    debian.copy_modules(kernel, work / "modroot")
    (entry / "initrd.cpio").write_bytes(make_initramfs(busybox, work / "modroot",
                                                       agent_binary=agent.build_agent(work / "popek-agent")))
    shutil.copy2(kernel.vmlinuz, entry / "vmlinuz")
    if kernel.system_map:
        shutil.copy2(kernel.system_map, entry / "System.map")
    shutil.rmtree(work)
    _write_manifest(entry, {"kernel": "vmlinuz", "initrd": "initrd.cpio",
                            "system_map": "System.map" if kernel.system_map else None, "version": kernel.release})


def build_image(kind: str, *, progress: bool = True, force: bool = False) -> GuestImage:
    """Return guest image `kind` ("microvm" or "debian") from the cache, building it first if it is not there (or
    if `force`). microvm compiles the kernel (~6-7 min on a 2-core machine; the kernel is cached on its own, keyed by
    source version and config fragment, so an init change only rebuilds the initramfs); debian downloads
    linux-image-cloud-amd64's kernel and modules. `progress` shows rich progress on stderr. Raises ImageError
    (unknown kind, no apt, package not found, build failure with the log's tail)."""
    name = image_key(kind, update=True)
    if kind == "microvm":
        kernel_dir = cache.get_or_build(_microvm_kernel_key(),
                                        lambda tmp: microvm.build_kernel(tmp, progress=progress), force=force)
        entry = cache.get_or_build(name, lambda tmp: _build_microvm(tmp, kernel_dir, progress), force=force)
    else:
        entry = cache.get_or_build(name, lambda tmp: _build_debian(tmp, progress), force=force)
    return _from_entry(entry)


def find_image(kind: str) -> GuestImage | None:
    """The cached image `kind` for the current inputs, or None if it is not built; never builds or downloads.
    Raises ImageError for an unknown kind or when apt cannot name the inputs' versions."""
    entry = cache.lookup(image_key(kind, update=False))
    return _from_entry(entry) if entry else None
