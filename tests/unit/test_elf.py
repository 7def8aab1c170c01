"""Tests for popek.boot.elf: ELF64 headers, PT_LOAD segments and notes (incl. the PVH entry note)."""

import shutil
import struct
import subprocess

import pytest

from popek.boot.elf import PT_LOAD, PT_NOTE, XEN_ELFNOTE_PHYS32_ENTRY, ElfError, ElfImage, is_elf


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name) + 1, len(desc), ntype) + pad(name + b"\0") + pad(desc)


def make_elf(segments, entry, notes=b"", machine=62, cls=2) -> bytes:
    """ELF64 EXEC from ``(vaddr, paddr, data, memsz)`` segments, with an optional PT_NOTE holding ``notes`` bytes."""
    phdrs = [(PT_LOAD, 7, v, p, d, m) for v, p, d, m in segments]
    phdrs += [(PT_NOTE, 4, 0, 0, notes, len(notes))] if notes else []
    off = 64 + 56 * len(phdrs)
    ph_bytes, body = b"", b""
    for ptype, flags, v, p, d, m in phdrs:
        align = 4 if ptype == PT_NOTE else 16
        ph_bytes += struct.pack("<IIQQQQQQ", ptype, flags, off + len(body), v, p, len(d), m, align)
        body += d + bytes(-len(d) % 16)
    ident = b"\x7fELF" + bytes([cls, 1, 1]) + bytes(9)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, 2, machine, 1, entry, 64, 0, 0, 64, 56, len(phdrs), 64, 0, 0)
    return ehdr + ph_bytes + body


def test_parse_reads_entry_and_load_segments_in_file_order():
    img = make_elf([(0x400000, 0x100000, b"abc", 0x1000), (0x401000, 0x101000, b"defg", 4)], entry=0x400010)
    elf = ElfImage(img)
    assert elf.entry == 0x400010 and elf.type == 2
    assert [(s.vaddr, s.paddr, s.filesz, s.memsz) for s in elf.load_segments] == \
        [(0x400000, 0x100000, 3, 0x1000), (0x401000, 0x101000, 4, 4)]
    assert bytes(elf.segment_data(elf.load_segments[1])) == b"defg"


def test_notes_and_pvh_entry_from_an_8_byte_xen_note():
    notes = note(b"GNU", 3, b"\x01" * 20) + note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<Q", 0x1000850))
    elf = ElfImage(make_elf([(0x1000000, 0x1000000, b"\x90", 1)], 0x1000000, notes))
    assert [(n.name, n.type, len(n.desc)) for n in elf.notes()] == [("GNU", 3, 20), ("Xen", 18, 8)]
    assert elf.pvh_entry == 0x1000850


def test_pvh_entry_accepts_a_4_byte_note_and_is_none_without_one():
    with_note = make_elf([(0x100000, 0x100000, b"\x90", 1)], 0x100000, note(b"Xen", 18, struct.pack("<I", 0x100123)))
    assert ElfImage(with_note).pvh_entry == 0x100123
    assert ElfImage(make_elf([(0x100000, 0x100000, b"\x90", 1)], 0x100000)).pvh_entry is None


def test_is_elf_checks_only_the_magic():
    assert is_elf(b"\x7fELF\x01") and not is_elf(b"MZ\x90\x00")


@pytest.mark.parametrize("data, message", [
    (b"MZ" + bytes(100), "not an ELF"),
    (make_elf([(0, 0, b"x", 1)], 0, cls=1), "only ELF64"),
    (make_elf([(0, 0, b"x", 1)], 0, machine=3), "not x86-64"),
    (make_elf([(0, 0, b"x" * 64, 64)], 0)[:150], "past the end"),
])
def test_rejects_non_elf64_x86_or_truncated_images(data, message):
    with pytest.raises(ElfError, match=message):
        ElfImage(data)


def test_rejects_a_segment_with_filesz_above_memsz():
    with pytest.raises(ElfError, match="p_filesz"):
        ElfImage(make_elf([(0x1000, 0x1000, b"abcd", 2)], 0x1000))


def test_note_running_past_its_segment_is_an_error():
    bad = struct.pack("<III", 4, 64, 18) + b"Xen\0" + bytes(8)
    with pytest.raises(ElfError, match="runs past"):
        ElfImage(make_elf([(0x1000, 0x1000, b"x", 1)], 0x1000, bad)).notes()


@pytest.mark.skipif(not (shutil.which("as") and shutil.which("ld")), reason="binutils (as, ld) not installed")
def test_linker_built_kernel_like_elf_has_physical_load_address_and_pvh_note(tmp_path):
    # Laid out like a Linux vmlinux: text at __START_KERNEL_map + 16 MiB, loaded at 16 MiB, ENTRY physical.
    (tmp_path / "k.S").write_text("""
        .text
        .globl startup_64
    startup_64: hlt
    pvh_start: hlt
        .pushsection .note.Xen, "a", @note
        .long 4, 8, 18
        .asciz "Xen"
        .quad pvh_start - 0xffffffff80000000
        .popsection
    """)
    (tmp_path / "k.ld").write_text("""
        ENTRY(phys_startup_64)
        SECTIONS {
            . = 0xffffffff81000000;
            .text : AT(ADDR(.text) - 0xffffffff80000000) { *(.text) }
            .notes : AT(ADDR(.notes) - 0xffffffff80000000) { *(.note.*) }
        }
        phys_startup_64 = startup_64 - 0xffffffff80000000;
    """)
    subprocess.run(["as", "--64", "-o", tmp_path / "k.o", tmp_path / "k.S"], check=True)
    subprocess.run(["ld", "-z", "noexecstack", "-T", tmp_path / "k.ld", "-o", tmp_path / "k", tmp_path / "k.o"],
                   check=True, capture_output=True)
    elf = ElfImage((tmp_path / "k").read_bytes())
    text = next(s for s in elf.load_segments if s.vaddr == 0xffffffff81000000)
    assert text.paddr == 0x1000000 and elf.entry == 0x1000000
    assert bytes(elf.segment_data(text))[:2] == b"\xf4\xf4"
    assert elf.pvh_entry == 0x1000001
