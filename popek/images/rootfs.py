"""Debian root file system images: debootstrap minbase of the host's suite, trimmed, with popek-init, as ext4."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from popek.images import agent, cache
from popek.images.cache import ImageError

__all__ = ["ROOTFS_KINDS", "INIT_PATH", "AGENT_PATH", "RootfsImage", "apt_mirror", "host_suite", "rootfs_key",
           "build_rootfs", "find_rootfs", "image_size", "trim_tree"]

#: Root file system images Popek builds (``popek image build --rootfs NAME``).
ROOTFS_KINDS = ("debian",)
#: Where the guest init (popek/images/init, the initramfs's /init) goes in the root file system.
INIT_PATH = "sbin/popek-init"
#: Where the guest agent (``popek.images.agent.build_agent``) goes; popek-init starts it when /dev/vsock exists.
AGENT_PATH = "usr/sbin/popek-agent"
#: The ext4 volume label (``mkfs.ext4 -L``).
LABEL = "popek-root"
#: Host tools the build runs, and the Debian packages that have them.
BUILD_PACKAGES = {"debootstrap": "debootstrap", "mkfs.ext4": "e2fsprogs"}
#: What a VM does not need (removed after debootstrap, paths relative to the root): apt's caches and lists,
#: documentation, manual pages, translations and locales other than C; a machine-id a VM would share with its copies.
TRIM = ("var/cache/apt/*", "var/lib/apt/lists/*", "var/cache/debconf/*-old", "var/log/*", "usr/share/doc/*",
        "usr/share/man/*", "usr/share/info/*", "usr/share/locale/*", "usr/share/lintian/*",
        "usr/share/common-licenses/*",
        "var/lib/dpkg/*-old", "etc/machine-id", "var/lib/dbus/machine-id", "dev/*", "tmp/*")
#: Packages added to minbase (debootstrap --include): ip(8), with which popek-init configures --net interfaces.
INCLUDE = ("iproute2",)
#: Free space added to the content's size when no size is asked (ext4 metadata, journal, the user's files).
DEFAULT_HEADROOM = 256 << 20
#: Part of the cache key: a change to how the tree is made or trimmed rebuilds the image.
_LAYOUT = f"v1 minbase include {' '.join(INCLUDE)} trim {' '.join(TRIM)} label {LABEL}"


@dataclass(frozen=True)
class RootfsImage:
    """A built root file system: ``path`` (a sparse raw ext4 image, label popek-root), ``name`` (the cache entry),
    ``suite`` (Debian's codename, e.g. bookworm), ``size`` (the image's apparent size in bytes)."""

    name: str
    path: Path
    suite: str
    size: int


def host_suite(os_release: Path = Path("/etc/os-release")) -> str:
    """The host's Debian codename, ``VERSION_CODENAME`` of os-release(5) (e.g. "bookworm").

    :raises ImageError: when the file is missing or names no codename (not a Debian-based host).
    """
    try:
        text = os_release.read_text()
    except OSError as e:
        raise ImageError(f"cannot read {os_release} to find the host's Debian suite: {e.strerror}") from None
    m = re.search(r"^VERSION_CODENAME=\"?([A-Za-z0-9.-]+)\"?\s*$", text, re.M)
    if not m:
        raise ImageError(f"{os_release} has no VERSION_CODENAME: cannot tell which Debian suite to build")
    return m.group(1)


def _one_line_sources(text: str):
    """(types, uris, suites, components) of each ``deb [options] URI SUITE COMPONENT...`` line
    (sources.list(5), one-line style)."""
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        line = re.sub(r"\[[^\]]*\]", " ", line)  # [arch=amd64 signed-by=...]
        words = line.split()
        if len(words) >= 3:
            yield [words[0]], [words[1]], [words[2]], words[3:]


def _deb822_sources(text: str):
    """(types, uris, suites, components) of each stanza of a ``.sources`` file (sources.list(5), deb822 style);
    stanzas with ``Enabled: no`` are skipped."""
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line.startswith("#"):
                continue
            if line[:1] in (" ", "\t") and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        yield (fields.get("types", "").split(), fields.get("uris", "").split(), fields.get("suites", "").split(),
               fields.get("components", "").split())


def apt_mirror(suite: str, etc_apt: Path = Path("/etc/apt")) -> str:
    """The URI of the first ``deb`` source in apt's configuration (sources.list and sources.list.d/*.list,
    *.sources; sources.list(5)) that serves suite ``suite`` with component main: the mirror debootstrap uses.

    :raises ImageError: when no source serves that suite.
    """
    files = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*.list")),
             *sorted((etc_apt / "sources.list.d").glob("*.sources"))]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        entries = _deb822_sources(text) if path.suffix == ".sources" else _one_line_sources(text)
        for types, uris, suites, components in entries:
            if "deb" in types and suite in suites and "main" in components and uris:
                return uris[0]
    raise ImageError(f"apt has no 'deb' source for suite {suite} with component main (looked in "
                     f"{etc_apt}/sources.list and sources.list.d): cannot tell debootstrap where to fetch from")


def _size_tag(size: int | None) -> str:
    return "auto" if size is None else f"{size >> 20}M"


def rootfs_key(kind: str = "debian", size: int | None = None) -> str:
    """Cache entry name of root file system ``kind``:
    rootfs-debian-<suite>-<size: auto or N M>-<sha256(mirror, debootstrap version, init, agent.c, layout)[:12]>.
    Needs no network.

    :raises ImageError: for an unknown kind, a host that is not Debian-based, or no apt source for its suite.
    """
    if kind not in ROOTFS_KINDS:
        raise ImageError(f"unknown root file system {kind!r}; choose one of {', '.join(ROOTFS_KINDS)} or give a path")
    from popek.images.build import INIT
    from popek.images.debian import installed_version

    suite = host_suite()
    parts = [apt_mirror(suite).encode(), (installed_version("debootstrap") or "none").encode(),
             INIT.read_bytes(), agent.SOURCE.read_bytes(), _LAYOUT.encode()]
    digest = hashlib.sha256(b"\0".join(parts)).hexdigest()[:12]
    return cache.entry_name("rootfs", kind, suite, _size_tag(size), digest)


def image_size(content: int, requested: int | None = None) -> int:
    """The image size in bytes for ``content`` bytes of files: ``requested`` if given, else content + 10% (ext4
    metadata) + DEFAULT_HEADROOM; rounded up to whole MiB.

    :raises ImageError: if ``requested`` cannot hold the content plus 10%.
    """
    needed = content + content // 10
    if requested is not None and requested < needed:
        raise ImageError(f"a {requested >> 20} MiB root file system cannot hold {content >> 20} MiB of files "
                         f"(needs at least {(needed >> 20) + 1} MiB); give a larger --rootfs-size")
    size = requested if requested is not None else needed + DEFAULT_HEADROOM
    return -(-size // (1 << 20)) << 20


def trim_tree(root: Path, patterns: tuple[str, ...] = TRIM) -> int:
    """Remove what ``patterns`` (globs relative to ``root``) match, without following symlinks out of the tree.
    Returns the number of entries removed."""
    removed = 0
    for pattern in patterns:
        for path in root.glob(pattern):
            if path.name in (".", ".."):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed += 1
    return removed


def _tree_bytes(root: Path) -> int:
    """Bytes the files under ``root`` occupy (``du -sb`` style apparent sizes; each directory counted 4 KiB)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        total += 4096
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (from /proc/self/mounts), deepest first."""
    prefix = os.path.realpath(path)
    found = []
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                point = line.split()[1].replace("\\040", " ")
                if point == prefix or point.startswith(prefix + "/"):
                    found.append(point)
    except OSError:
        return []
    return sorted(found, key=len, reverse=True)


def _unmount_under(path: Path) -> None:
    """Unmount everything debootstrap may have left mounted inside the tree (proc, sys, dev/pts)."""
    for point in _mounts_under(path):
        subprocess.run(["umount", "-l", point], capture_output=True)


def _say(progress: bool, message: str) -> None:
    if progress:
        from rich.console import Console

        Console(stderr=True).print(f"[bold]popek images[/bold]: {message}")


def _run_logged(cmd: list[str], log, label: str, progress: bool) -> None:
    """Run ``cmd``, appending its output to ``log``; with ``progress``, a rich spinner shows its last "I:" line.

    :raises ImageError: if it exits non-zero, with the last lines of its output.
    """
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    env = dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive")
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    except FileNotFoundError:
        raise ImageError(f"{label}: {cmd[0]} not found") from None
    tail: deque[str] = deque(maxlen=25)
    bar = task = None
    if progress:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                       console=Console(stderr=True), transient=True)
        bar.start()
        task = bar.add_task(label)
    try:
        for line in proc.stdout:
            log.write(line)
            tail.append(line)
            if bar is not None and line.startswith("I: "):
                bar.update(task, description=f"{label}: {line[3:].strip()[:60]}")
    except BaseException:  # Ctrl-C: do not leave it running (debootstrap's own exit trap unmounts what it mounted)
        proc.terminate()
        proc.wait()
        raise
    finally:
        if bar is not None:
            bar.stop()
    proc.wait()
    log.flush()
    if proc.returncode != 0:
        raise ImageError(f"{label}: `{' '.join(cmd)}` exited {proc.returncode}; last lines:\n{''.join(tail).rstrip()}")


def _require_tools() -> None:
    """Root (debootstrap chroots and makes device nodes), then debootstrap and mkfs.ext4, installed if missing."""
    if os.geteuid() != 0:
        raise ImageError("building a Debian root file system needs root: debootstrap chroots into the new tree "
                         "and creates device nodes (run `popek image build --rootfs debian` as root)")
    missing = [pkg for tool, pkg in BUILD_PACKAGES.items()
               if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None]
    if missing:
        from popek.images.debian import ensure_packages

        ensure_packages(missing)


def _install_init_and_agent(root: Path, work: Path) -> None:
    """Put popek-init at INIT_PATH and the guest agent (``popek.images.agent.build_agent``) at AGENT_PATH."""
    from popek.images.build import INIT

    init = root / INIT_PATH
    init.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(INIT, init)
    init.chmod(0o755)
    built = agent.build_agent(work / "popek-agent")
    dest = root / AGENT_PATH
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(built, dest)
    dest.chmod(0o755)


def _configure(root: Path) -> None:
    """What a Popek guest expects of /etc: a hostname, an fstab naming the root, an empty machine-id (systemd's
    'uninitialized') and an empty /dev (devtmpfs is mounted there at boot)."""
    (root / "etc/hostname").write_text("popek\n")
    (root / "etc/fstab").write_text(f"LABEL={LABEL} / ext4 rw,errors=remount-ro 0 1\n")
    (root / "etc/machine-id").write_text("")
    (root / "dev").mkdir(exist_ok=True)


def _build(entry: Path, kind: str, size: int | None, progress: bool) -> None:
    suite = host_suite()
    mirror = apt_mirror(suite)
    started = time.monotonic()
    # The tree is made outside the cache: debootstrap mounts proc and sys inside it while it configures.
    work = Path(tempfile.mkdtemp(prefix="popek-rootfs-", dir=os.environ.get("TMPDIR") or "/var/tmp"))
    log_path = entry / "build.log"
    try:
        root = work / "root"
        with open(log_path, "w") as log:
            _say(progress, f"debootstrap --variant=minbase {suite} (from apt's source for {suite})")
            debootstrap = shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin:/sbin")
            _run_logged([debootstrap, "--variant=minbase", f"--include={','.join(INCLUDE)}", suite, str(root),
                         mirror], log, "debootstrap", progress)
            _unmount_under(root)
            removed = trim_tree(root)
            _configure(root)
            _install_init_and_agent(root, work)
            content = _tree_bytes(root)
            total = image_size(content, size)
            log.write(f"# trimmed {removed} entries; {content} bytes of files\n")
            _say(progress, f"mkfs.ext4 -d: {content >> 20} MiB of files in a {total >> 20} MiB image")
            image = entry / "rootfs.ext4"
            with open(image, "wb") as f:
                f.truncate(total)
            mkfs = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/usr/sbin:/sbin")
            _run_logged([mkfs, "-q", "-F", "-L", LABEL, "-d", str(root), str(image)], log, "mkfs.ext4", progress)
        manifest = {"rootfs": image.name, "suite": suite, "kind": kind, "size": total, "content": content,
                    "build_seconds": round(time.monotonic() - started, 1)}
        (entry / "image.json").write_text(json.dumps(manifest, indent=1) + "\n")
    except ImageError as e:
        raise ImageError(f"building the {kind} root file system failed: {e}") from None
    finally:
        _unmount_under(work)
        if not _mounts_under(work):  # never rmtree through a mount that is still there
            shutil.rmtree(work, ignore_errors=True)


def _from_entry(entry: Path) -> RootfsImage:
    data = json.loads((entry / "image.json").read_text())
    return RootfsImage(name=entry.name, path=entry / data["rootfs"], suite=data["suite"], size=data["size"])


def build_rootfs(kind: str = "debian", *, size: int | None = None, progress: bool = True,
                 force: bool = False) -> RootfsImage:
    """Return root file system ``kind`` from the cache, building it first if absent (or if ``force``).

    Build: debootstrap --variant=minbase (plus INCLUDE) of the host's suite from apt's configured mirror into a
    temporary directory, TRIM removed, popek-init (popek/images/init) at /sbin/popek-init, the guest agent at
    /usr/sbin/popek-agent (``popek.images.agent``), then ``mkfs.ext4 -d TREE -L popek-root`` into a sparse
    image of ``size`` bytes (None: content + 10% + 256 MiB, see ``image_size``). ~2-4 min with a warm network.
    The entry appears atomically (``popek.images.cache.get_or_build``); a failure leaves no entry and no mount.

    :raises ImageError: not root, no debootstrap/mkfs.ext4 and apt cannot install them, no apt source for the
        suite, debootstrap failed (no network: its last lines are in the message), size too small.
    """
    name = rootfs_key(kind, size)
    entry = None if force else cache.lookup(name)
    if entry is None:
        _require_tools()  # before anything is written to the cache
        entry = cache.get_or_build(name, lambda tmp: _build(tmp, kind, size, progress), force=force)
    return _from_entry(entry)


def find_rootfs(kind: str = "debian", size: int | None = None) -> RootfsImage | None:
    """The cached root file system ``kind`` for the current inputs, or None; never builds.

    :raises ImageError: as ``rootfs_key``.
    """
    entry = cache.lookup(rootfs_key(kind, size))
    return _from_entry(entry) if entry else None
