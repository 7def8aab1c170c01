"""Tests for popek.boot.linux: setup header, boot_params layout (checked against the kernel's C header), e820,
ELF/bzImage loading with payload extraction, initrd placement and the loader's errors."""

import glob
import os
import re
import shutil
import struct
import subprocess

import pytest

from popek.boot import layout
from popek.boot.linux import (BOOT_PARAMS_SIZE, SETUP_HEADER_FIELDS, SETUP_HEADER_OFFSETS, BootError, SetupHeader,
                              build_boot_params, e820_map, kernel_version, load_linux, minimal_setup_header)
from popek.memory import GuestMemory

MiB, GiB = 1 << 20, 1 << 30
KMAP = 0xFFFF_FFFF_8000_0000
TEXT = bytes(range(256)) * 64  # 16 KiB of "kernel text"


def make_elf(segments, entry) -> bytes:
    """ELF64 x86-64 EXEC from ``(vaddr, paddr, data, memsz)`` PT_LOAD segments."""
    off = 64 + 56 * len(segments)
    phdrs, body = b"", b""
    for v, p, d, m in segments:
        phdrs += struct.pack("<IIQQQQQQ", 1, 7, off + len(body), v, p, len(d), m, 0x1000)
        body += d + bytes(-len(d) % 16)
    ident = b"\x7fELF\x02\x01\x01" + bytes(9)
    return struct.pack("<16sHHIQQQIHHHHHH", ident, 2, 62, 1, entry, 64, 0, 0, 64, 56, len(segments), 64, 0, 0) + \
        phdrs + body


#: A vmlinux laid out like Linux's: text at __START_KERNEL_map + 16 MiB, physical 16 MiB, ENTRY(phys_startup_64),
#: with 1 MiB of bss after a data segment.
VMLINUX = make_elf([(KMAP + 0x1000000, 0x1000000, TEXT, len(TEXT)),
                    (KMAP + 0x1200000, 0x1200000, b"DATA" * 4, 1 * MiB)], entry=0x1000000)


def make_bzimage(pm=b"", *, payload=None, version=0x020F, setup_sects=2, xloadflags=1, relocatable=1,
                 pref=0x1000000, code32=0x100000, align=0x200000, init_size=0x800000, cmdline_size=2047,
                 initrd_max=0x7FFFFFFF, version_str=b"6.1.0-test (popek@test) #1 SMP", header_end=0x26C) -> bytes:
    """A bzImage with its setup header written at the offsets boot.rst documents (independent of the loader)."""
    setup = bytearray((setup_sects + 1) * 512)
    payload_at = 0x100
    if payload is not None:
        pm = bytes(payload_at) + payload + bytes(64)
    for off, fmt, value in ((0x1F1, "B", setup_sects), (0x1FE, "H", 0xAA55), (0x200, "B", 0xEB),
                            (0x201, "B", header_end - 0x202), (0x202, "4s", b"HdrS"), (0x206, "H", version),
                            (0x20E, "H", 0x300 - 0x200), (0x211, "B", 1), (0x214, "I", code32),
                            (0x22C, "I", initrd_max), (0x230, "I", align), (0x234, "B", relocatable),
                            (0x236, "H", xloadflags), (0x238, "I", cmdline_size),
                            (0x248, "I", payload_at if payload is not None else 0),
                            (0x24C, "I", len(payload) if payload is not None else 0),
                            (0x258, "Q", pref), (0x260, "I", init_size), (0x264, "I", 0x1234)):
        struct.pack_into("<" + fmt, setup, off, value)
    setup[0x300:0x300 + len(version_str) + 1] = version_str + b"\0"
    return bytes(setup) + pm


def lz4_legacy(data: bytes) -> bytes:
    import lz4.block
    out = [struct.pack("<I", 0x184C2102)]
    for i in range(0, len(data), 8 * MiB):
        block = lz4.block.compress(data[i:i + 8 * MiB], store_size=False)
        out += [struct.pack("<I", len(block)), block]
    return b"".join(out)


def compress(kind: str, data: bytes) -> bytes:
    """A payload as the kernel build makes it (compressed data, then the le32 size except for gzip)."""
    import bz2, gzip, lzma  # noqa: E401
    import zstandard
    packed = {"gzip": lambda: gzip.compress(data), "xz": lambda: lzma.compress(data),
              "lz4": lambda: lz4_legacy(data), "bzip2": lambda: bz2.compress(data),
              "zstd": lambda: zstandard.ZstdCompressor(write_content_size=False).compress(data),
              "lzma": lambda: lzma.compress(data, format=lzma.FORMAT_ALONE)}[kind]()
    return packed if kind == "gzip" else packed + struct.pack("<I", len(data))


@pytest.fixture
def mem():
    with GuestMemory.x86(256 * MiB) as m:
        yield m


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def u32(b, off):
    return struct.unpack_from("<I", b, off)[0]


# --- boot_params layout against the kernel's own header -----------------------------------------------------------

C_SOURCE = r"""
#include <stdio.h>
#include <stddef.h>
#include <asm/bootparam.h>
int main(int argc, char **argv) {
    if (argc > 1) {
        static struct boot_params bp;
        if (fread(&bp, 1, sizeof bp, stdin) != sizeof bp) return 1;
        printf("%u %u %u %u %u %x %x %x %u %u %u %u\n", bp.hdr.boot_flag, bp.hdr.type_of_loader, bp.hdr.loadflags,
               bp.hdr.cmd_line_ptr, bp.ext_cmd_line_ptr, bp.hdr.ramdisk_image, bp.ext_ramdisk_image,
               bp.hdr.ramdisk_size, bp.ext_ramdisk_size, bp.hdr.version, bp.hdr.heap_end_ptr, bp.e820_entries);
        for (int i = 0; i < bp.e820_entries; i++)
            printf("%llx %llx %u\n", (unsigned long long)bp.e820_table[i].addr,
                   (unsigned long long)bp.e820_table[i].size, bp.e820_table[i].type);
        return 0;
    }
    FIELDS
    printf("ext_ramdisk_image %zu\n", offsetof(struct boot_params, ext_ramdisk_image));
    printf("ext_ramdisk_size %zu\n", offsetof(struct boot_params, ext_ramdisk_size));
    printf("ext_cmd_line_ptr %zu\n", offsetof(struct boot_params, ext_cmd_line_ptr));
    printf("e820_entries %zu\n", offsetof(struct boot_params, e820_entries));
    printf("sentinel %zu\n", offsetof(struct boot_params, sentinel));
    printf("e820_table %zu\n", offsetof(struct boot_params, e820_table));
    printf("sizeof_boot_params %zu\n", sizeof(struct boot_params));
    printf("sizeof_setup_header %zu\n", sizeof(struct setup_header));
    printf("sizeof_boot_e820_entry %zu\n", sizeof(struct boot_e820_entry));
    return 0;
}
"""


@pytest.fixture(scope="module")
def c_boot_params(tmp_path_factory):
    """A program compiled against <asm/bootparam.h>: no argument prints offsets, "read" decodes stdin."""
    if not shutil.which("gcc"):
        pytest.skip("gcc is not installed")
    d = tmp_path_factory.mktemp("bootparam")
    fields = "\n".join(f'printf("{n} %zu\\n", offsetof(struct boot_params, hdr.{n}));' for n, _ in SETUP_HEADER_FIELDS)
    (d / "bp.c").write_text(C_SOURCE.replace("FIELDS", fields))
    r = subprocess.run(["gcc", "-o", d / "bp", d / "bp.c"], capture_output=True, text=True)
    if r.returncode and "bootparam.h" in r.stderr and "No such file" in r.stderr:
        pytest.skip("kernel headers (linux-libc-dev) are not installed")
    assert r.returncode == 0, r.stderr
    return d / "bp"


def test_setup_header_and_boot_params_offsets_match_kernel_uapi_header(c_boot_params):
    out = dict(line.split() for line in subprocess.run([c_boot_params], capture_output=True, text=True,
                                                      check=True).stdout.splitlines())
    c = {k: int(v) for k, v in out.items()}
    assert {n: c[n] for n in SETUP_HEADER_OFFSETS} == SETUP_HEADER_OFFSETS
    assert (c["ext_ramdisk_image"], c["ext_ramdisk_size"], c["ext_cmd_line_ptr"]) == (0xC0, 0xC4, 0xC8)
    assert (c["e820_entries"], c["sentinel"], c["e820_table"]) == (0x1E8, 0x1EF, 0x2D0)
    assert (c["sizeof_boot_params"], c["sizeof_setup_header"], c["sizeof_boot_e820_entry"]) == (4096, 0x7B, 20)


def test_boot_params_decode_through_the_c_struct(c_boot_params):
    e820 = [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x100000, 0xBFF00000, 1), (0x1_0000_0000, 0x8000_0000, 1)]
    bp = build_boot_params(minimal_setup_header(), cmdline_gpa=0x3_2345_6000, cmdline_size=10,
                           initrd_gpa=0x2_0000_1000, initrd_size=0x1_0000_2000, e820=e820)
    out = subprocess.run([c_boot_params, "read"], input=bp, capture_output=True, check=True).stdout.decode().split("\n")
    assert out[0].split() == ["43605", "255", "128", str(0x23456000), "3", "1000", "2", "2000", "1", str(0x20F),
                              str(0xFE00), "4"]
    assert [tuple(int(x, 16) if i < 2 else int(x) for i, x in enumerate(line.split())) for line in out[1:5]] == e820


# --- setup header and boot_params ---------------------------------------------------------------------------------

def test_boot_params_fields_at_zero_page_offsets():
    image = make_bzimage(b"\x90" * 4096)
    hdr = SetupHeader.from_image(image)
    e820 = [(0, 0x9FC00, 1), (0x100000, 0x7F00000, 1)]
    bp = build_boot_params(hdr.raw, cmdline_gpa=0x20000, cmdline_size=5, initrd_gpa=0x7000000, initrd_size=0x123456,
                           e820=e820)
    assert len(bp) == BOOT_PARAMS_SIZE
    assert bp[0x210] == 0xFF and bp[0x211] == 0x81  # type_of_loader; loadflags LOADED_HIGH | CAN_USE_HEAP
    assert (u32(bp, 0x228), u32(bp, 0x218), u32(bp, 0x21C)) == (0x20000, 0x7000000, 0x123456)
    assert (u32(bp, 0xC0), u32(bp, 0xC4), u32(bp, 0xC8)) == (0, 0, 0)
    assert struct.unpack_from("<H", bp, 0x224)[0] == 0xFE00
    assert bp[0x1E8] == 2 and struct.unpack_from("<QQIQQI", bp, 0x2D0) == (0, 0x9FC00, 1, 0x100000, 0x7F00000, 1)
    untouched = set(range(0x1F1, 0x26C)) - {0x210, 0x211} - set(range(0x218, 0x220)) - set(range(0x224, 0x22C))
    assert all(bp[i] == image[i] for i in untouched), "the rest of the setup header is copied from the image"
    assert not any(bp[:0x1E8]) and not any(bp[0x26C:0x2D0])


def test_parse_setup_header_fields_from_a_synthetic_bzimage():
    hdr = SetupHeader.from_image(make_bzimage(b"", pref=0x2000000, init_size=0x456000, cmdline_size=511,
                                              align=0x400000, xloadflags=0x7F))
    assert (hdr.setup_sects, hdr.version, hdr.protocol, hdr.boot_flag, hdr.header) == (2, 0x20F, "2.15", 0xAA55,
                                                                                       0x53726448)
    assert (hdr.pref_address, hdr.init_size, hdr.cmdline_size, hdr.kernel_alignment) == (0x2000000, 0x456000, 511,
                                                                                       0x400000)
    assert (hdr.xloadflags, hdr.relocatable_kernel, hdr.code32_start, hdr.loadflags) == (0x7F, 1, 0x100000, 1)
    assert hdr.setup_size == 3 * 512 and len(hdr.raw) == 0x7B and hdr.handover_offset == 0x1234


def test_setup_header_length_follows_the_jump_byte_at_0x201():
    hdr = SetupHeader.from_image(make_bzimage(b"", header_end=0x264))  # a 2.10-era header ends after init_size
    assert len(hdr.raw) == 0x264 - 0x1F1 and hdr.init_size == 0x800000 and hdr.handover_offset == 0


def test_setup_sects_zero_means_four():
    image = bytearray(make_bzimage(b"", setup_sects=4))
    image[0x1F1] = 0
    assert SetupHeader.from_image(bytes(image)).setup_size == 5 * 512


def test_protocol_older_than_2_06_is_rejected(tmp_path, mem):
    path = write(tmp_path, "old", make_bzimage(b"\x90" * 512, version=0x0205))
    with pytest.raises(BootError, match="boot protocol 2.05 is older than 2.06"):
        load_linux(mem, path, cmdline="")


def test_more_than_128_e820_entries_is_an_error():
    with pytest.raises(BootError, match="at most 128"):
        build_boot_params(minimal_setup_header(), cmdline_gpa=0, cmdline_size=0, initrd_gpa=0, initrd_size=0,
                          e820=[(i * 0x2000, 0x1000, 1) for i in range(129)])


# --- e820 ---------------------------------------------------------------------------------------------------------

def test_e820_for_256_mib_reserves_the_legacy_hole(mem):
    assert e820_map(mem) == [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x100000, 255 * MiB, 1)]


def test_e820_for_5_gib_puts_2_gib_above_4_gib():
    with GuestMemory.x86(5 * GiB) as m:
        assert e820_map(m) == [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x100000, 3 * GiB - MiB, 1),
                               (4 * GiB, 2 * GiB, 1)]


# --- loading ------------------------------------------------------------------------------------------------------

def test_elf_vmlinux_loads_at_physical_addresses_with_minimal_boot_params(tmp_path, mem):
    mem.write(0x1200000 + 16, b"\xAA" * 64)  # stale bytes where the bss goes
    info = load_linux(mem, write(tmp_path, "vmlinux", VMLINUX), cmdline="console=ttyS0 quiet")
    assert (info.kind, info.entry, info.boot_params, info.kernel_end, info.initrd) == \
        ("elf", 0x1000000, layout.BOOT_PARAMS, 0x1300000, None)
    assert mem.read(0x1000000, len(TEXT)) == TEXT
    assert mem.read(0x1200000, 80) == b"DATA" * 4 + bytes(64)
    bp = mem.read(layout.BOOT_PARAMS, 4096)
    assert struct.unpack_from("<H4sH", bp, 0x1FE)[0] == 0xAA55 and bp[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<H", bp, 0x206)[0] == 0x020F and bp[0x210] == 0xFF
    assert u32(bp, 0x228) == layout.CMDLINE and mem.read(layout.CMDLINE, 21) == b"console=ttyS0 quiet\0\0"
    assert bp[0x1E8] == 3


def test_elf_whose_paddr_is_virtual_loads_at_vaddr_minus_kernel_map(tmp_path, mem):
    image = make_elf([(KMAP + 0x1000000, KMAP + 0x1000000, TEXT, len(TEXT))], entry=KMAP + 0x1000040)
    info = load_linux(mem, write(tmp_path, "k", image), cmdline="")
    assert info.entry == 0x1000040 and mem.read(0x1000000, len(TEXT)) == TEXT


def test_elf_virtual_entry_is_converted_with_its_segments_offset(tmp_path, mem):
    image = make_elf([(KMAP + 0x1000000, 0x2000000, TEXT, len(TEXT))], entry=KMAP + 0x1000100)
    assert load_linux(mem, write(tmp_path, "k", image), cmdline="").entry == 0x2000100


def test_elf_entry_outside_every_segment_is_an_error(tmp_path, mem):
    image = make_elf([(KMAP + 0x1000000, 0x1000000, TEXT, len(TEXT))], entry=0x5000000)
    with pytest.raises(BootError, match="entry point 0x5000000 is in no PT_LOAD"):
        load_linux(mem, write(tmp_path, "k", image), cmdline="")


@pytest.mark.parametrize("kind", ["gzip", "xz", "lz4", "zstd", "bzip2", "lzma"])
def test_bzimage_payload_is_decompressed_and_loaded_as_elf(tmp_path, mem, kind):
    image = make_bzimage(payload=compress(kind, VMLINUX), cmdline_size=1000)
    info = load_linux(mem, write(tmp_path, "bzImage", image), cmdline="root=/dev/vda")
    assert (info.kind, info.entry, info.kernel_end) == ("bzimage-payload", 0x1000000, 0x1300000)
    assert mem.read(0x1000000, len(TEXT)) == TEXT
    bp = mem.read(layout.BOOT_PARAMS, 4096)
    assert u32(bp, 0x238) == 1000 and u32(bp, 0x248) == 0x100, "setup header comes from the bzImage"


def test_bzimage_with_unknown_payload_compression_is_an_error(tmp_path, mem):
    path = write(tmp_path, "bzImage", make_bzimage(payload=b"\x00\x11\x22\x33" + bytes(60)))
    with pytest.raises(BootError, match="unknown payload compression"):
        load_linux(mem, path, cmdline="")


def test_bzimage_payload_that_is_not_elf_is_an_error(tmp_path, mem):
    path = write(tmp_path, "bzImage", make_bzimage(payload=compress("gzip", b"not an elf" * 100)))
    with pytest.raises(BootError, match="not an ELF vmlinux"):
        load_linux(mem, path, cmdline="")


def test_bzimage_without_extraction_loads_protected_mode_code_at_aligned_pref_address(tmp_path, mem):
    pm = b"\xE9" + bytes(0x1FF) + b"\x48\x31\xC0" + bytes(1021)
    path = write(tmp_path, "bzImage", make_bzimage(pm, pref=0x1100000, align=0x200000, init_size=0x3000000))
    info = load_linux(mem, path, cmdline="", extract_payload=False)
    assert (info.kind, info.entry, info.kernel_end) == ("bzimage", 0x1200200, 0x4200000)
    assert mem.read(0x1200000, len(pm)) == pm


def test_non_relocatable_bzimage_loads_at_code32_start(tmp_path, mem):
    path = write(tmp_path, "bzImage", make_bzimage(b"\x90" * 1024, relocatable=0, code32=0x100000, pref=0x1000000,
                                                   init_size=0x2000000))
    info = load_linux(mem, path, cmdline="", extract_payload=False)
    assert (info.entry, info.kernel_end) == (0x100200, 0x3000000) and mem.read(0x100000, 1024) == b"\x90" * 1024


def test_bzimage_without_64bit_entry_is_rejected(tmp_path, mem):
    path = write(tmp_path, "bzImage", make_bzimage(b"\x90" * 1024, xloadflags=0))
    with pytest.raises(BootError, match="XLF_KERNEL_64"):
        load_linux(mem, path, cmdline="", extract_payload=False)


# --- initrd -------------------------------------------------------------------------------------------------------

def test_initrd_goes_at_the_highest_page_below_the_end_of_ram(tmp_path, mem):
    data = os.urandom(3 * MiB + 123)
    info = load_linux(mem, write(tmp_path, "vmlinux", VMLINUX), cmdline="",
                      initrd_path=write(tmp_path, "initrd", data))
    gpa = (256 * MiB - len(data)) & ~0xFFF
    assert info.initrd == (gpa, len(data)) and mem.read(gpa, len(data)) == data
    bp = mem.read(layout.BOOT_PARAMS, 4096)
    assert (u32(bp, 0x218), u32(bp, 0x21C)) == (gpa, len(data))


def test_initrd_stays_below_initrd_addr_max(tmp_path):
    path = write(tmp_path, "bzImage", make_bzimage(payload=compress("gzip", VMLINUX), initrd_max=0x37FFFFFF))
    initrd = write(tmp_path, "initrd", b"\x01" * 5000)
    with GuestMemory.x86(2 * GiB) as m:
        info = load_linux(m, path, cmdline="", initrd_path=initrd)
    assert info.initrd == (0x38000000 - 0x2000, 5000)


def test_initrd_stays_below_3_gib_with_memory_above_4_gib(tmp_path):
    path = write(tmp_path, "bzImage", make_bzimage(payload=compress("gzip", VMLINUX), initrd_max=0xFFFFFFFF))
    initrd = write(tmp_path, "initrd", b"\x02" * 8192)
    with GuestMemory.x86(5 * GiB) as m:
        info = load_linux(m, path, cmdline="", initrd_path=initrd)
        assert info.initrd == (0xC0000000 - 8192, 8192) and m.read(0xC0000000 - 8192, 8192) == b"\x02" * 8192


def test_initrd_too_big_for_guest_memory_is_an_error(tmp_path):
    initrd = tmp_path / "initrd"
    with open(initrd, "wb") as f:
        f.truncate(60 * MiB)
    with GuestMemory.x86(64 * MiB) as m, pytest.raises(BootError, match="initrd of 60.0 MiB does not fit in 64 MiB"):
        load_linux(m, write(tmp_path, "vmlinux", VMLINUX), cmdline="", initrd_path=initrd)


def test_missing_initrd_is_an_error(tmp_path, mem):
    with pytest.raises(BootError, match="cannot read initrd .*nope"):
        load_linux(mem, write(tmp_path, "vmlinux", VMLINUX), cmdline="", initrd_path=tmp_path / "nope")


# --- other errors -------------------------------------------------------------------------------------------------

def test_memory_below_kernel_end_plus_working_space_is_refused(tmp_path):
    with GuestMemory.x86(32 * MiB) as m, pytest.raises(BootError, match="32 MiB is too small .* at least 35 MiB"):
        load_linux(m, write(tmp_path, "vmlinux", VMLINUX), cmdline="")


def test_kernel_segment_beyond_guest_memory_is_an_error(tmp_path):
    with GuestMemory.x86(16 * MiB) as m, pytest.raises(BootError, match="does not fit in 16 MiB of guest memory"):
        load_linux(m, write(tmp_path, "vmlinux", VMLINUX), cmdline="")


def test_command_line_longer_than_cmdline_size_is_rejected(tmp_path, mem):
    path = write(tmp_path, "bzImage", make_bzimage(payload=compress("gzip", VMLINUX), cmdline_size=255))
    load_linux(mem, path, cmdline="x" * 255)
    assert mem.read(layout.CMDLINE, 256) == b"x" * 255 + b"\0"
    with pytest.raises(BootError, match="command line is 256 bytes; this kernel accepts at most 255"):
        load_linux(mem, path, cmdline="x" * 256)


def test_elf_command_line_is_limited_to_command_line_size(tmp_path, mem):
    path = write(tmp_path, "vmlinux", VMLINUX)
    with pytest.raises(BootError, match="at most 2047"):
        load_linux(mem, path, cmdline="y" * 2048)
    with pytest.raises(BootError, match="NUL"):
        load_linux(mem, path, cmdline="a\0b")


def test_not_a_kernel_and_missing_file_are_clear_errors(tmp_path, mem):
    with pytest.raises(BootError, match="not a Linux kernel: neither an ELF file nor a bzImage"):
        load_linux(mem, write(tmp_path, "junk", os.urandom(4096)), cmdline="")
    with pytest.raises(BootError, match="cannot read kernel .*missing.*No such file"):
        load_linux(mem, tmp_path / "missing", cmdline="")


def test_errors_leave_guest_memory_untouched(tmp_path, mem):
    with pytest.raises(BootError):
        load_linux(mem, write(tmp_path, "vmlinux", VMLINUX), cmdline="z" * 5000)
    assert not any(mem.read(0x1000000, len(TEXT))) and not any(mem.read(layout.BOOT_PARAMS, 4096))


# --- kernel_version -----------------------------------------------------------------------------------------------

def test_kernel_version_of_bzimage_elf_and_other_files(tmp_path):
    assert kernel_version(write(tmp_path, "bz", make_bzimage(b""))) == "6.1.0-test (popek@test) #1 SMP"
    elf = make_elf([(0x1000000, 0x1000000, b"%s version\0Linux version 6.1.99 (gcc 12) #2\n\0", 64)], 0x1000000)
    assert kernel_version(write(tmp_path, "vmlinux", elf)) == "6.1.99 (gcc 12) #2"
    assert kernel_version(write(tmp_path, "plain", make_elf([(0, 0, b"x", 1)], 0))) is None
    assert kernel_version(write(tmp_path, "junk", b"hello" * 200)) is None


# --- a real distribution kernel, where one is present -------------------------------------------------------------

REAL_KERNELS = sorted(glob.glob("/boot/vmlinuz-*") + ([os.environ["POPEK_TEST_BZIMAGE"]]
                                                      if os.environ.get("POPEK_TEST_BZIMAGE") else []))


@pytest.mark.skipif(not REAL_KERNELS, reason="no /boot/vmlinuz-* and POPEK_TEST_BZIMAGE unset")
def test_real_bzimage_payload_extracts_to_an_entry_inside_the_kernel(tmp_path):
    path = REAL_KERNELS[-1]
    with GuestMemory.x86(512 * MiB) as m:
        info = load_linux(m, path, cmdline="console=ttyS0")
        assert info.kind == "bzimage-payload" and layout.KERNEL_DEFAULT <= info.entry < info.kernel_end
        assert m.read(info.entry, 16) != bytes(16)
    release = re.sub(r"^vmlinuz-", "", os.path.basename(path))
    if release != os.path.basename(path):
        assert kernel_version(path).split()[0] == release
