"""Minimal ELF64 (x86-64, little endian) reader: file header, program headers and notes (incl. the PVH entry note)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
#: Xen ELF note with the 32-bit physical PVH entry point (xen/include/public/elfnote.h; Linux arch/x86/platform/pvh).
XEN_ELFNOTE_PHYS32_ENTRY = 18

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr, 64 bytes (ELF-64 Object File Format, section 3)
_PHDR = struct.Struct("<IIQQQQQQ")  # Elf64_Phdr, 56 bytes (section 6)
_NHDR = struct.Struct("<III")  # namesz, descsz, type (section 7)


class ElfError(ValueError):
    """Data that is not a loadable ELF64 x86-64 image, or whose headers point outside the file."""


@dataclass(frozen=True)
class ProgramHeader:
    """One Elf64_Phdr: addresses and sizes in bytes, ``type`` PT_*, ``flags`` PF_X=1/PF_W=2/PF_R=4."""

    type: int
    flags: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int


@dataclass(frozen=True)
class Note:
    """One ELF note: owner ``name`` (without the NUL), ``type``, and descriptor bytes ``desc``."""

    name: str
    type: int
    desc: bytes


def is_elf(data: bytes | memoryview) -> bool:
    """True if ``data`` starts with the ELF magic ``\\x7fELF`` (any class or machine)."""
    return bytes(data[:4]) == ELF_MAGIC


class ElfImage:
    """A parsed ELF64 x86-64 image over ``data`` (kept as a memoryview; segment contents are not copied).

    Attributes: ``entry`` (e_entry), ``type`` (e_type: 2 EXEC, 3 DYN), ``phdrs`` (all program headers).

    :raises ElfError: on a bad magic, ELF32, big endian, a machine other than x86-64, or headers past the end.
    """

    def __init__(self, data: bytes | memoryview):
        self.data = memoryview(data).cast("B")
        if len(self.data) < _EHDR.size or not is_elf(self.data):
            raise ElfError("not an ELF file (no \\x7fELF magic)")
        ident, self.type, machine, _, self.entry, phoff, _, _, _, phentsize, phnum, *_ = _EHDR.unpack_from(self.data)
        if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB:
            raise ElfError(f"unsupported ELF class {ident[4]} / data encoding {ident[5]}: only ELF64 little endian")
        if machine != EM_X86_64:
            raise ElfError(f"ELF machine {machine} is not x86-64 ({EM_X86_64})")
        if phnum and phentsize < _PHDR.size:
            raise ElfError(f"program header entry size {phentsize} is below {_PHDR.size}")
        if phoff + phnum * phentsize > len(self.data):
            raise ElfError(f"program headers ({phnum} at {phoff:#x}) run past the end of the "
                           f"{len(self.data)}-byte file")
        self.phdrs = [ProgramHeader(*_PHDR.unpack_from(self.data, phoff + i * phentsize)) for i in range(phnum)]
        for ph in self.phdrs:
            if ph.type in (PT_LOAD, PT_NOTE) and ph.offset + ph.filesz > len(self.data):
                raise ElfError(f"segment at file offset {ph.offset:#x}+{ph.filesz:#x} runs past the end of the file")
            if ph.type == PT_LOAD and ph.filesz > ph.memsz:
                raise ElfError(f"PT_LOAD at {ph.vaddr:#x} has p_filesz {ph.filesz:#x} > p_memsz {ph.memsz:#x}")

    @property
    def load_segments(self) -> list[ProgramHeader]:
        """The PT_LOAD program headers, in file order."""
        return [ph for ph in self.phdrs if ph.type == PT_LOAD]

    def segment_data(self, ph: ProgramHeader) -> memoryview:
        """The ``p_filesz`` bytes of a segment in the file (a view, not a copy)."""
        return self.data[ph.offset:ph.offset + ph.filesz]

    def notes(self) -> list[Note]:
        """All notes in PT_NOTE segments (4-byte padding, or 8 where the segment's p_align is 8).

        :raises ElfError: on a note that runs past its segment.
        """
        out = []
        for ph in self.phdrs:
            if ph.type != PT_NOTE:
                continue
            seg, pos, pad = self.segment_data(ph), 0, 8 if ph.align == 8 else 4
            while pos + _NHDR.size <= len(seg):
                namesz, descsz, ntype = _NHDR.unpack_from(seg, pos)
                name_at = pos + _NHDR.size
                desc_at = name_at + -(-namesz // pad) * pad
                pos = desc_at + -(-descsz // pad) * pad
                if desc_at + descsz > len(seg):
                    raise ElfError(f"note at {ph.offset + name_at - _NHDR.size:#x} runs past its PT_NOTE segment")
                name = bytes(seg[name_at:name_at + namesz]).rstrip(b"\0").decode("ascii", "replace")
                out.append(Note(name, ntype, bytes(seg[desc_at:desc_at + descsz])))
        return out

    @property
    def pvh_entry(self) -> int | None:
        """The PVH 32-bit physical entry point from the "Xen" note XEN_ELFNOTE_PHYS32_ENTRY, or None if absent.

        Linux stores it as a pointer-sized value (8 bytes on x86-64); 4-byte descriptors are accepted too.
        """
        for n in self.notes():
            if n.name == "Xen" and n.type == XEN_ELFNOTE_PHYS32_ENTRY and len(n.desc) in (4, 8):
                return int.from_bytes(n.desc, "little")
        return None
