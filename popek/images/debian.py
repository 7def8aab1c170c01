"""Debian packages for guest images: apt queries and installs, .deb download and unpack, busybox, kernel, modules."""

from __future__ import annotations

import gzip
import io
import lzma
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import zstandard
from elftools.elf.elffile import ELFFile

from popek.images.cache import ImageError

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
# Modules the guest init loads (by module name) when a virtio PCI device exists; their dependencies come along.
GUEST_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "virtio_rng", "virtio_balloon",
                 "vmw_vsock_virtio_transport", "vsock")

_apt_updated = False


def _run(args: list[str], *, cwd: Path | None = None, what: str) -> str:
    """Run a system tool, returning stdout; ImageError naming `what` with its stderr when it fails or is missing."""
    try:
        proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise ImageError(f"{what}: {args[0]} not found (guest images are built from Debian packages with apt/dpkg)")
    if proc.returncode != 0:
        raise ImageError(f"{what}: `{' '.join(args)}` exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def _require_apt() -> None:
    for tool in ("apt-get", "apt-cache", "dpkg-deb", "dpkg-query"):
        if shutil.which(tool) is None:
            raise ImageError(f"{tool} not found: building guest images needs a Debian-based host with apt and dpkg")


def _apt_update_once() -> None:
    global _apt_updated
    if not _apt_updated:
        _run(["apt-get", "update"], what="refreshing the apt package lists")
        _apt_updated = True


def installed_version(package: str) -> str | None:
    """Version string of `package` if dpkg has it installed, else None (dpkg-query -W)."""
    if shutil.which("dpkg-query") is None:
        return None
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}\t${Version}", package], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    status, _, version = proc.stdout.partition("\t")
    return version if status.endswith(" installed") else None


def candidate_version(package: str, *, update: bool = True) -> str:
    """The version apt would install for `package` (`apt-cache policy` "Candidate:"). If apt knows no candidate
    and `update` is true, runs `apt-get update` once and asks again. Raises ImageError if there is none."""
    _require_apt()
    for attempt in range(2):
        out = _run(["apt-cache", "policy", package], what=f"looking up {package}")
        match = re.search(r"^\s*Candidate:\s*(\S+)", out, re.M)
        if match and match.group(1) != "(none)":
            return match.group(1)
        if attempt or not update:
            break
        _apt_update_once()
    raise ImageError(f"Debian package {package} not found: apt has no installable version (is it in the sources?)")


def ensure_packages(packages: list[str]) -> None:
    """`apt-get install -y` those of `packages` not installed yet (after `apt-get update` if apt lacks one).
    Raises ImageError when apt is missing or a package cannot be installed."""
    _require_apt()
    missing = [p for p in packages if installed_version(p) is None]
    if not missing:
        return
    for package in missing:
        candidate_version(package)
    _run(["apt-get", "install", "-y", "--no-install-recommends", *missing],
         what=f"installing {' '.join(missing)}")


def resolve_kernel_package(metapackage: str = KERNEL_METAPACKAGE, *, update: bool = True) -> str:
    """Concrete kernel package behind a metapackage, e.g. linux-image-cloud-amd64 -> linux-image-6.1.0-57-cloud-amd64
    (the candidate's first `linux-image-*` Depends, from `apt-cache show --no-all-versions`); `update` as for
    candidate_version."""
    candidate_version(metapackage, update=update)
    out = _run(["apt-cache", "show", "--no-all-versions", metapackage], what=f"reading {metapackage}")
    depends = re.search(r"^Depends:\s*(.*)$", out, re.M)
    names = re.findall(r"(linux-image-[0-9][\w.+-]*)", depends.group(1) if depends else "")
    if not names:
        raise ImageError(f"{metapackage} names no linux-image-<version> dependency; cannot pick its kernel")
    return names[0]


def kernel_release(package: str) -> str:
    """Kernel release (`uname -r`) of a Debian kernel package: linux-image-6.1.0-57-cloud-amd64 -> 6.1.0-57-cloud-amd64."""
    if not package.startswith("linux-image-"):
        raise ImageError(f"{package!r} is not a linux-image-<release> package")
    return package.removeprefix("linux-image-")


def download_and_extract(package: str, workdir: Path) -> Path:
    """`apt-get download` the candidate .deb of `package` into `workdir` and unpack it with `dpkg-deb -x` into
    workdir/<package>; returns that root. Raises ImageError if apt cannot fetch it."""
    _require_apt()
    candidate_version(package)
    debs = workdir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    _run(["apt-get", "download", package], cwd=debs, what=f"downloading {package}")
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        raise ImageError(f"apt-get download {package} produced no {package}_*.deb in {debs}")
    root = workdir / package
    _run(["dpkg-deb", "-x", str(found[-1]), str(root)], what=f"unpacking {found[-1].name}")
    return root


def fetch_busybox(workdir: Path) -> Path:
    """Debian's busybox-static /bin/busybox, unpacked under `workdir`; returns its path."""
    busybox = download_and_extract(BUSYBOX_PACKAGE, workdir) / "bin" / "busybox"
    if not busybox.is_file():
        raise ImageError(f"{BUSYBOX_PACKAGE} has no /bin/busybox (found nothing at {busybox})")
    return busybox


@dataclass(frozen=True)
class DebianKernel:
    """An unpacked Debian kernel package: `vmlinuz` (bzImage), `system_map` (None when the package ships only the
    placeholder pointing at the -dbg package), `release` (uname -r) and `modules` (its lib/modules/<release>)."""

    vmlinuz: Path
    system_map: Path | None
    release: str
    modules: Path


def fetch_kernel(package: str, workdir: Path) -> DebianKernel:
    """Download and unpack the kernel package `package` (e.g. linux-image-6.1.0-57-cloud-amd64) under `workdir`."""
    release = kernel_release(package)
    root = download_and_extract(package, workdir)
    vmlinuz, system_map = root / "boot" / f"vmlinuz-{release}", root / "boot" / f"System.map-{release}"
    modules = root / "lib" / "modules" / release
    if not vmlinuz.is_file() or not modules.is_dir():
        raise ImageError(f"{package} lacks boot/vmlinuz-{release} or lib/modules/{release}")
    real_map = system_map.is_file() and system_map.stat().st_size > 4096
    return DebianKernel(vmlinuz, system_map if real_map else None, release, modules)


def _module_name(path: Path) -> str:
    return re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", path.name).replace("-", "_")


def _ko_dependencies(ko: bytes) -> list[str]:
    """Module names in the `depends=` entry of a .ko's ELF .modinfo section (NUL-separated key=value strings)."""
    section = ELFFile(io.BytesIO(ko)).get_section_by_name(".modinfo")
    for item in (section.data() if section else b"").split(b"\0"):
        if item.startswith(b"depends="):
            return [d.decode().replace("-", "_") for d in item[len(b"depends="):].split(b",") if d]
    return []


def _decompress(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    return data


def copy_modules(kernel: DebianKernel, dest_root: Path, wanted: tuple[str, ...] = GUEST_MODULES) -> list[str]:
    """Copy the modules `wanted` (module names) and everything they depend on (per each .ko's modinfo `depends=`)
    from `kernel` into dest_root/lib/modules/<release>/ with the package's paths, decompressed to plain .ko (the
    guest's modprobe may lack xz/zstd), then write modules.dep etc. with `depmod -b dest_root <release>` (kmod is
    installed if missing). Returns the module names copied, sorted. Raises ImageError for a wanted module the
    package lacks."""
    by_name = {_module_name(p): p for p in kernel.modules.rglob("*.ko*") if re.search(r"\.ko(\.\w+)?$", p.name)}
    out = dest_root / "lib" / "modules" / kernel.release
    todo, done = list(wanted), set()
    while todo:
        name = todo.pop()
        if name in done:
            continue
        if name not in by_name:
            raise ImageError(f"kernel {kernel.release} has no module {name!r} (wanted {', '.join(wanted)})")
        src = by_name[name]
        data = _decompress(src)
        rel = src.relative_to(kernel.modules)
        target = out / rel.parent / re.sub(r"\.ko\.\w+$", ".ko", rel.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        done.add(name)
        todo.extend(_ko_dependencies(data))
    for extra in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (kernel.modules / extra).is_file():
            shutil.copy2(kernel.modules / extra, out / extra)
    if shutil.which("depmod") is None and shutil.which("depmod", path="/sbin:/usr/sbin") is None:
        ensure_packages(["kmod"])
    depmod = shutil.which("depmod") or shutil.which("depmod", path="/sbin:/usr/sbin")
    _run([depmod, "-b", str(dest_root), kernel.release], what=f"depmod for {kernel.release}")
    if not (out / "modules.dep").is_file():
        raise ImageError(f"depmod wrote no modules.dep under {out}")
    return sorted(done)
