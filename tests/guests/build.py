"""Builds Popek's tiny KVM test guests (tests/guests/*.S) into flat binaries with the GNU toolchain (cpp, as, ld)."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

GUEST_DIR = Path(__file__).resolve().parent
#: Guest-physical (and linked) address of every guest image; guest.h's LOAD_ADDRESS must match.
LOAD_ADDRESS = 0x100000
TOOLS = ("gcc", "ld", "objcopy", "nm")


class GuestBuildError(RuntimeError):
    """A guest source failed to assemble or link; the message holds the tool's output."""


@dataclass(frozen=True)
class GuestImage:
    """A built guest: flat binary ``data`` to load at ``load_address`` (= entry point), ELF ``symbols`` (name -> address)."""
    name: str
    path: Path
    data: bytes
    load_address: int
    symbols: dict[str, int]


def ports() -> dict[str, int]:
    """The ``#define NAME value`` constants of ports.h (PORT_IN, PORT_OUT, ..., FAULT_PORT)."""
    text = (GUEST_DIR / "ports.h").read_text()
    return {m[1]: int(m[2], 0) for m in re.finditer(r"^#define\s+(\w+)\s+(0x[0-9A-Fa-f]+|\d+)", text, re.M)}


def missing_tools() -> list[str]:
    """The toolchain programs that are not on PATH."""
    return [t for t in TOOLS if shutil.which(t) is None]


def _run(cmd: list[str]) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise GuestBuildError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr}{p.stdout}")
    return p.stdout


def build_guest(name: str, out_dir: Path) -> GuestImage:
    """Assemble ``tests/guests/<name>.S`` (through cpp), link it at LOAD_ADDRESS and keep its .text as a flat binary.

    :raises GuestBuildError: with the assembler/linker output; FileNotFoundError if the source is missing.
    """
    src = GUEST_DIR / f"{name}.S"
    if not src.exists():
        raise FileNotFoundError(f"no guest source {src}")
    out_dir.mkdir(parents=True, exist_ok=True)
    obj, elf, bin_ = (out_dir / f"{name}{ext}" for ext in (".o", ".elf", ".bin"))
    _run(["gcc", "-c", "-nostdlib", "-ffreestanding", "-I", str(GUEST_DIR), "-o", str(obj), str(src)])
    _run(["ld", "-nostdlib", "-static", "-Ttext", hex(LOAD_ADDRESS), "-e", "_start", "-o", str(elf), str(obj)])
    _run(["objcopy", "-O", "binary", "-j", ".text", str(elf), str(bin_)])
    symbols = {}
    for line in _run(["nm", str(elf)]).splitlines():
        parts = line.split()
        if len(parts) == 3:
            symbols[parts[2]] = int(parts[0], 16)
    if symbols.get("_start") != LOAD_ADDRESS:
        raise GuestBuildError(f"{src}: _start is at {symbols.get('_start')}, expected {LOAD_ADDRESS:#x} (code before _start?)")
    return GuestImage(name, bin_, bin_.read_bytes(), LOAD_ADDRESS, symbols)
