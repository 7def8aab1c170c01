"""Host memory of a VMM process per mapping (/proc/PID/smaps): guest RAM apart from the VMM's own memory."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

#: memfd name prefix of Popek's guest RAM regions (popek.memory.GuestRegion): smaps shows "/memfd:popek-ram-<gpa>".
POPEK_RAM_PREFIX = "/memfd:popek-ram-"

# "start-end perms offset dev inode [pathname]" (proc(5), /proc/pid/maps); the pathname may hold spaces.
_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) [0-9a-f]+ \S+ \d+ ?(.*)$")
_FIELD = re.compile(r"^(\w+):\s+(\d+) kB$")


@dataclass(frozen=True)
class Mapping:
    """One mapping of /proc/PID/smaps (proc(5)): address range, ``perms`` ("rw-s", ...), ``path`` ("" for
    anonymous memory, "[heap]", "/memfd:NAME (deleted)", a file), and its ``kB`` fields (Rss, Pss,
    Private_Clean, ...) converted to bytes in ``sizes``."""

    start: int
    end: int
    perms: str
    path: str
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Virtual size, bytes."""
        return self.end - self.start

    def get(self, key: str) -> int:
        """Field ``key`` (e.g. "Rss") in bytes; 0 if the kernel did not report it."""
        return self.sizes.get(key, 0)

    @property
    def uss(self) -> int:
        """Unique set size, bytes: Private_Clean + Private_Dirty (pages only this process maps; freed with it)."""
        return self.get("Private_Clean") + self.get("Private_Dirty")


def parse_smaps(text: str) -> list[Mapping]:
    """The mappings of a /proc/PID/smaps text, in address order.

    :raises ValueError: if the text does not start with a mapping header line.
    """
    out: list[Mapping] = []
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m:
            out.append(Mapping(int(m.group(1), 16), int(m.group(2), 16), m.group(3), m.group(4).strip()))
            continue
        f = _FIELD.match(line)
        if f:
            if not out:
                raise ValueError(f"smaps field before any mapping header: {line!r}")
            out[-1].sizes[f.group(1)] = int(f.group(2)) << 10
        elif not out and line.strip():
            raise ValueError(f"not an smaps text: {line!r}")
    return out


def read_smaps(pid: int) -> list[Mapping]:
    """Parse /proc/``pid``/smaps. :raises OSError: if the process is gone or not readable (ptrace access mode)."""
    return parse_smaps(Path(f"/proc/{pid}/smaps").read_text())


def is_popek_ram(m: Mapping) -> bool:
    """True for a Popek guest RAM mapping (a ``popek-ram-*`` memfd, popek.memory)."""
    return m.path.startswith(POPEK_RAM_PREFIX)


def anonymous_of_size(size: int) -> Callable[[Mapping], bool]:
    """A predicate for an anonymous read-write mapping of exactly ``size`` bytes: how QEMU's guest RAM (a RAM block
    allocated with mmap, no memory backend file) appears in smaps."""
    return lambda m: m.path == "" and m.size == size and m.perms.startswith("rw")


@dataclass(frozen=True)
class MemorySplit:
    """A VMM process's memory split by :func:`split`, all in bytes.

    ``guest_size``/``guest_rss``: virtual size and resident pages of the guest RAM mappings (host memory the
    guest's RAM uses now); ``vmm_uss``/``vmm_pss``/``vmm_rss``: the VMM's own memory, every other mapping
    (``uss`` = Private_Clean + Private_Dirty, what ending the process frees; ``pss`` shares pages among the
    processes mapping them); ``guest_mappings``: how many mappings were taken for guest RAM.
    """

    guest_size: int
    guest_rss: int
    vmm_uss: int
    vmm_pss: int
    vmm_rss: int
    guest_mappings: int


def split(mappings: Iterable[Mapping], is_guest_ram: Callable[[Mapping], bool]) -> MemorySplit:
    """Split ``mappings`` into guest RAM (``is_guest_ram``) and the rest (the VMM itself)."""
    mappings = list(mappings)
    guest = [m for m in mappings if is_guest_ram(m)]
    own = [m for m in mappings if not is_guest_ram(m)]
    return MemorySplit(guest_size=sum(m.size for m in guest), guest_rss=sum(m.get("Rss") for m in guest),
                       vmm_uss=sum(m.uss for m in own), vmm_pss=sum(m.get("Pss") for m in own),
                       vmm_rss=sum(m.get("Rss") for m in own), guest_mappings=len(guest))
