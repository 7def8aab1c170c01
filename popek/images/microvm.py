"""Builds Popek's microVM guest kernel: Debian's linux-source-6.1, `make tinyconfig` + microvm.config fragment."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import deque
from pathlib import Path

from popek.images.cache import ImageError
from popek.images.debian import ensure_packages, installed_version

SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
FRAGMENT = Path(__file__).with_name("microvm.config")
BUILD_PACKAGES = [SOURCE_PACKAGE, "build-essential", "bc", "flex", "bison", "libelf-dev", "libssl-dev", "cpio",
                  "xz-utils"]
_LINE = re.compile(r'^(CONFIG_[A-Za-z0-9_]+)=(y|n|m|-?[0-9]+|0x[0-9a-fA-F]+|"(?:[^"\\]|\\.)*")$')


def parse_fragment(text: str) -> dict[str, str]:
    """Parse a Kconfig fragment: lines `CONFIG_X=y|n|m|<number>|"string"`, blank lines and `#` comments
    (`# CONFIG_X is not set` counts as n). Returns {"CONFIG_X": value}. Raises ImageError naming the first bad
    line (Documentation/kbuild/kconfig.rst: .config syntax)."""
    options: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        unset = re.fullmatch(r"# (CONFIG_[A-Za-z0-9_]+) is not set", line)
        if unset:
            options[unset.group(1)] = "n"
        elif line and not line.startswith("#"):
            match = _LINE.match(line)
            if not match:
                raise ImageError(f"kernel config fragment line {number} is not CONFIG_X=y|n|m|number|\"string\": {raw!r}")
            options[match.group(1)] = match.group(2)
    return options


def parse_dotconfig(text: str) -> dict[str, str]:
    """Options set in a kernel .config: {"CONFIG_X": value}; options absent or `is not set` are omitted (= n)."""
    return {k: v for k, v in parse_fragment(text).items() if v != "n"}


def dropped_options(fragment: dict[str, str], config: dict[str, str]) -> list[str]:
    """Fragment options whose value in the resolved `config` (from parse_dotconfig) differs from what was asked,
    as "CONFIG_X: asked y, got n" strings (Kconfig drops options with unmet dependencies or forced by selects)."""
    return [f"{k}: asked {v}, got {config.get(k, 'n')}" for k, v in fragment.items() if config.get(k, "n") != v]


def source_version() -> str | None:
    """Installed version of linux-source-6.1 (the tarball the build uses), or None when not installed."""
    return installed_version(SOURCE_PACKAGE)


def _make(src: Path, args: list[str], log, progress: bool, label: str) -> None:
    env = dict(os.environ, KBUILD_BUILD_USER="popek", KBUILD_BUILD_HOST="popek", LC_ALL="C")
    cmd = ["make", "ARCH=x86_64", *args]
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, cwd=src, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: deque[str] = deque(maxlen=40)
    if progress:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(label)
            objects = 0
            for line in proc.stdout:
                log.write(line)
                tail.append(line)
                if line.lstrip().startswith(("CC ", "AS ", "LD ")):
                    objects += 1
                    bar.update(task, description=f"{label}: {objects} objects, {line.split()[-1][:50]}")
    else:
        for line in proc.stdout:
            log.write(line)
            tail.append(line)
    log.flush()
    if proc.wait() != 0:
        raise ImageError(f"kernel build step `{' '.join(cmd)}` failed (exit {proc.returncode}); "
                         f"last lines:\n{''.join(tail)}")


def build_kernel(out: Path, *, progress: bool = True) -> list[str]:
    """Build the microVM kernel into directory `out`: installs missing build packages (apt-get), unpacks
    /usr/src/linux-source-6.1.tar.xz into out/src, runs `make tinyconfig`, merges microvm.config with
    `scripts/kconfig/merge_config.sh -m`, `make olddefconfig`, then `make -j$(nproc) vmlinux`. Leaves
    out/vmlinux (ELF, entered at startup_64 or through its PVH note), out/System.map, out/config, out/release
    (`make kernelrelease`) and out/build.log; removes out/src. Returns the fragment options Kconfig did not keep
    (also written to the log and, with `progress`, shown as warnings). Raises ImageError on failure, with the tail
    of the build log."""
    try:
        return _build(out, progress)
    except ImageError as error:
        if (out / "build.log").is_file():
            kept = out.parent / "microvm-build-failed.log"
            shutil.copy2(out / "build.log", kept)
            raise ImageError(f"{error}\n(full build log kept at {kept})") from None
        raise


def _build(out: Path, progress: bool) -> list[str]:
    ensure_packages(BUILD_PACKAGES)
    if not SOURCE_TARBALL.is_file():
        raise ImageError(f"{SOURCE_PACKAGE} is installed but {SOURCE_TARBALL} is missing")
    fragment = parse_fragment(FRAGMENT.read_text())
    workdir = out / "src"
    workdir.mkdir()
    with open(out / "build.log", "w") as log:
        log.write(f"# {SOURCE_PACKAGE} {source_version()}, fragment {FRAGMENT}\n")
        tar = subprocess.run(["tar", "-xf", str(SOURCE_TARBALL), "-C", str(workdir)], capture_output=True, text=True)
        if tar.returncode != 0:
            raise ImageError(f"unpacking {SOURCE_TARBALL} failed: {tar.stderr.strip()[-2000:]}")
        src = next(workdir.iterdir())
        _make(src, ["tinyconfig"], log, False, "tinyconfig")
        merge = subprocess.run([str(src / "scripts/kconfig/merge_config.sh"), "-m", ".config", str(FRAGMENT)],
                               cwd=src, capture_output=True, text=True)
        log.write(merge.stdout + merge.stderr)
        if merge.returncode != 0:
            raise ImageError(f"merge_config.sh failed: {merge.stderr.strip()[-2000:]}")
        _make(src, ["olddefconfig"], log, False, "olddefconfig")
        dropped = dropped_options(fragment, parse_dotconfig((src / ".config").read_text()))
        for item in dropped:
            log.write(f"warning: Kconfig did not keep {item}\n")
            if progress:
                print(f"warning: microvm kernel config: Kconfig did not keep {item}", file=sys.stderr)
        _make(src, [f"-j{os.cpu_count() or 1}", "vmlinux"], log, progress, "building microvm kernel")
        release = subprocess.run(["make", "-s", "ARCH=x86_64", "kernelrelease"], cwd=src, capture_output=True,
                                 text=True).stdout.strip()
    shutil.copy2(src / "vmlinux", out / "vmlinux")
    shutil.copy2(src / "System.map", out / "System.map")
    shutil.copy2(src / ".config", out / "config")
    (out / "release").write_text(release + "\n")
    shutil.rmtree(workdir)
    return dropped
