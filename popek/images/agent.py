"""Compiles the guest agent (popek/images/agent.c) into a static binary for an initramfs or a root filesystem."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from popek.images.cache import ImageError

#: The agent's C source; its bytes are part of the image cache key (popek.images.build.image_key).
SOURCE = Path(__file__).with_name("agent.c")
#: Where images put the binary.
GUEST_PATH = "bin/popek-agent"
#: Static (the guest has no libc), small (the kernel unpacks the initramfs at emulated speed), stripped.
CFLAGS = ("-static", "-Os", "-s", "-ffunction-sections", "-fdata-sections", "-Wl,--gc-sections", "-Wall")


def build_agent(dest: Path, *, cc: str = "gcc", source: Path = SOURCE) -> Path:
    """Compile ``source`` with ``cc`` and CFLAGS into the file ``dest`` (mode 0755, written atomically: a failed
    build leaves no file there) and return ``dest``. Needs gcc and glibc's static libc.a (Debian: libc6-dev).

    :raises ImageError: if the compiler is missing or fails (with its message).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    try:
        try:
            proc = subprocess.run([cc, *CFLAGS, "-o", tmp, str(source)], capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ImageError(f"cannot compile the guest agent with {cc}: {e} (install gcc and libc6-dev)") from None
        if proc.returncode != 0:
            raise ImageError(f"compiling the guest agent {source} failed (exit {proc.returncode}):\n"
                             f"{proc.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest
