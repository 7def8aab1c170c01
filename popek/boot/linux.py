"""Linux x86 boot protocol loader: setup header, boot_params (zero page), e820 map, kernel/initrd/cmdline placement."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from popek.boot import layout
from popek.boot.elf import ElfError, ElfImage, is_elf
from popek.boot.payload import PayloadError, decompress_payload
from popek.memory import MMIO_HOLE_START, PAGE_SIZE, GuestMemory

MiB = 1 << 20

# struct setup_header in file order (Documentation/arch/x86/boot.rst, "The Real-Mode Kernel Header";
# arch/x86/include/uapi/asm/bootparam.h). It starts at offset 0x1F1 of both the bzImage and boot_params.
SETUP_HEADER_FIELDS = (
    ("setup_sects", "B"), ("root_flags", "H"), ("syssize", "I"), ("ram_size", "H"), ("vid_mode", "H"),
    ("root_dev", "H"), ("boot_flag", "H"), ("jump", "H"), ("header", "I"), ("version", "H"),
    ("realmode_swtch", "I"), ("start_sys_seg", "H"), ("kernel_version", "H"), ("type_of_loader", "B"),
    ("loadflags", "B"), ("setup_move_size", "H"), ("code32_start", "I"), ("ramdisk_image", "I"),
    ("ramdisk_size", "I"), ("bootsect_kludge", "I"), ("heap_end_ptr", "H"), ("ext_loader_ver", "B"),
    ("ext_loader_type", "B"), ("cmd_line_ptr", "I"), ("initrd_addr_max", "I"), ("kernel_alignment", "I"),
    ("relocatable_kernel", "B"), ("min_alignment", "B"), ("xloadflags", "H"), ("cmdline_size", "I"),
    ("hardware_subarch", "I"), ("hardware_subarch_data", "Q"), ("payload_offset", "I"), ("payload_length", "I"),
    ("setup_data", "Q"), ("pref_address", "Q"), ("init_size", "I"), ("handover_offset", "I"),
    ("kernel_info_offset", "I"),
)
_HDR = struct.Struct("<" + "".join(f for _, f in SETUP_HEADER_FIELDS))
SETUP_HEADER_START = 0x1F1
SETUP_HEADER_SIZE = _HDR.size  # 0x7B: through kernel_info_offset (protocol 2.15)
#: Offset of each setup header field inside boot_params (and inside the bzImage file).
SETUP_HEADER_OFFSETS = {name: SETUP_HEADER_START + struct.calcsize("<" + "".join(f for _, f in SETUP_HEADER_FIELDS[:i]))
                        for i, (name, _) in enumerate(SETUP_HEADER_FIELDS)}
_FORMATS = dict(SETUP_HEADER_FIELDS)

# boot_params fields outside the setup header (Documentation/arch/x86/zero-page.rst).
BOOT_PARAMS_SIZE = 4096
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_SENTINEL = 0x1EF
BP_E820_TABLE = 0x2D0
BP_HEADER_LIMIT = 0x290  # edd_mbr_sig_buffer: a setup header longer than this would overrun it
E820_MAX_ENTRIES_ZEROPAGE = 128
E820_ENTRY = struct.Struct("<QQI")  # struct boot_e820_entry: addr, size, type (20 bytes, packed)
E820_RAM = 1
E820_RESERVED = 2

BOOT_FLAG = 0xAA55
HDRS_MAGIC = 0x53726448  # "HdrS"
MIN_PROTOCOL = 0x0206
#: loadflags and xloadflags bits (boot.rst).
LOADED_HIGH = 1 << 0
KASLR_FLAG = 1 << 1
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7
XLF_KERNEL_64 = 1 << 0
#: type_of_loader 0xFF: "undefined" boot loader id (boot.rst, type_of_loader).
LOADER_UNDEFINED = 0xFF
#: heap_end_ptr as QEMU sets it (0xFE00 past the real-mode code); only the real-mode setup code reads it.
HEAP_END_PTR = 0xFE00
#: The 64-bit entry point of a bzImage's protected-mode code is 0x200 past its load address (boot.rst, "64-bit BOOT
#: PROTOCOL").
BZIMAGE_ENTRY64_OFFSET = 0x200
#: __START_KERNEL_map: x86-64 kernel text is mapped at this virtual base (Documentation/arch/x86/x86_64/mm.rst).
KERNEL_MAP = 0xFFFF_FFFF_8000_0000
#: x86 COMMAND_LINE_SIZE is 2048 including the NUL: the limit for an ELF vmlinux, which has no cmdline_size field.
ELF_CMDLINE_MAX = 2047
#: initrd_addr_max of every x86-64 kernel (arch/x86/boot/header.S); used for an ELF vmlinux.
ELF_INITRD_ADDR_MAX = 0x7FFF_FFFF
#: RAM the kernel needs above its image (early page tables, memblock, struct pages, first allocations) before it can
#: run; a guest with less low RAM is refused rather than left to die out of memory before init.
MIN_FREE_ABOVE_KERNEL = 16 * MiB


class BootError(ValueError):
    """The kernel, initrd or command line cannot be booted as asked; the message says what and why."""


@dataclass(frozen=True)
class SetupHeader:
    """The bzImage setup header (boot.rst "The Real-Mode Kernel Header"), fields named as in ``struct setup_header``.

    ``raw`` holds the header bytes as the image has them, from 0x1F1 to 0x202 + the byte at 0x201 (the protocol's
    rule for how much to copy into boot_params); fields beyond an old image's header read as 0.
    """

    setup_sects: int
    root_flags: int
    syssize: int
    ram_size: int
    vid_mode: int
    root_dev: int
    boot_flag: int
    jump: int
    header: int
    version: int
    realmode_swtch: int
    start_sys_seg: int
    kernel_version: int
    type_of_loader: int
    loadflags: int
    setup_move_size: int
    code32_start: int
    ramdisk_image: int
    ramdisk_size: int
    bootsect_kludge: int
    heap_end_ptr: int
    ext_loader_ver: int
    ext_loader_type: int
    cmd_line_ptr: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable_kernel: int
    min_alignment: int
    xloadflags: int
    cmdline_size: int
    hardware_subarch: int
    hardware_subarch_data: int
    payload_offset: int
    payload_length: int
    setup_data: int
    pref_address: int
    init_size: int
    handover_offset: int
    kernel_info_offset: int
    raw: bytes

    @classmethod
    def from_bytes(cls, raw: bytes) -> "SetupHeader":
        """Parse header bytes starting at offset 0x1F1 (shorter input is zero-padded)."""
        return cls(*_HDR.unpack(bytes(raw[:SETUP_HEADER_SIZE]).ljust(SETUP_HEADER_SIZE, b"\0")), raw=bytes(raw))

    @classmethod
    def from_image(cls, image: bytes | memoryview) -> "SetupHeader":
        """Parse and validate the setup header of a bzImage.

        :raises BootError: no boot flag 0xAA55 at 0x1FE or no "HdrS" at 0x202 (not a bzImage), or protocol < 2.06.
        """
        if len(image) < 0x206 or struct.unpack_from("<H", image, 0x1FE)[0] != BOOT_FLAG \
                or struct.unpack_from("<I", image, 0x202)[0] != HDRS_MAGIC:
            raise BootError("not a Linux kernel: neither an ELF file nor a bzImage (boot flag 0xAA55 at 0x1FE and "
                            "'HdrS' at 0x202)")
        end = 0x202 + image[0x201] if image[0x200] == 0xEB else SETUP_HEADER_START + SETUP_HEADER_SIZE
        hdr = cls.from_bytes(image[SETUP_HEADER_START:min(end, BP_HEADER_LIMIT, len(image))])
        if hdr.version < MIN_PROTOCOL:
            raise BootError(f"bzImage boot protocol {hdr.protocol} is older than 2.06, the oldest Popek supports")
        return hdr

    @property
    def protocol(self) -> str:
        """The protocol version as text, e.g. "2.15"."""
        return f"{self.version >> 8}.{self.version & 0xFF:02}"

    @property
    def setup_size(self) -> int:
        """Bytes of real-mode code before the protected-mode kernel: (setup_sects or 4, +1) * 512."""
        return ((self.setup_sects or 4) + 1) * 512


def minimal_setup_header() -> bytes:
    """Setup header bytes for an ELF vmlinux, which has none: boot flag, "HdrS", protocol 2.15, the jump byte giving
    the header length, cmdline_size, initrd_addr_max, and kernel_alignment 16 MiB (as Firecracker/Cloud Hypervisor do).
    """
    hdr = bytearray(SETUP_HEADER_SIZE)
    jump = 0xEB | (SETUP_HEADER_START + SETUP_HEADER_SIZE - 0x202) << 8  # "jmp short" past the header
    for name, value in (("boot_flag", BOOT_FLAG), ("jump", jump),
                        ("header", HDRS_MAGIC), ("version", 0x020F), ("type_of_loader", LOADER_UNDEFINED),
                        ("initrd_addr_max", ELF_INITRD_ADDR_MAX), ("kernel_alignment", 16 * MiB),
                        ("cmdline_size", ELF_CMDLINE_MAX)):
        _put_hdr(hdr, name, value, base=SETUP_HEADER_START)
    return bytes(hdr)


def _put_hdr(buf: bytearray, name: str, value: int, base: int = 0) -> None:
    struct.pack_into("<" + _FORMATS[name], buf, SETUP_HEADER_OFFSETS[name] - base, value)


def build_boot_params(header_bytes: bytes, *, cmdline_gpa: int, cmdline_size: int, initrd_gpa: int,
                      initrd_size: int, e820: list[tuple[int, int, int]]) -> bytes:
    """Build the 4096-byte boot_params ("zero page") for the 32/64-bit boot protocol (boot.rst, zero-page.rst).

    Starts from zeros, copies ``header_bytes`` (the image's setup header from 0x1F1) to offset 0x1F1, then sets
    type_of_loader 0xFF, loadflags (LOADED_HIGH kept, CAN_USE_HEAP set with heap_end_ptr; KASLR_FLAG, set only by the
    decompressor, cleared; KEEP_SEGMENTS not set: only the 32-bit entry reads it, Popek enters in 64-bit mode),
    cmd_line_ptr/ext_cmd_line_ptr, ramdisk_image/ramdisk_size and their ext_ halves, e820_entries and e820_table.

    :param cmdline_gpa: guest physical address of the NUL-terminated command line.
    :param cmdline_size: its length in bytes without the NUL.
    :param initrd_gpa: guest physical address of the initrd, with ``initrd_size`` in bytes (0, 0 for none).
    :param e820: ``(addr, size, type)`` entries in bytes, at most 128.
    :raises BootError: header bytes of a wrong length or without "HdrS", a command line longer than the header's
        cmdline_size, or more than 128 e820 entries.
    """
    if not 0x206 - SETUP_HEADER_START <= len(header_bytes) <= BP_HEADER_LIMIT - SETUP_HEADER_START:
        raise BootError(f"setup header of {len(header_bytes)} bytes: expected "
                        f"{0x206 - SETUP_HEADER_START}..{BP_HEADER_LIMIT - SETUP_HEADER_START}")
    hdr = SetupHeader.from_bytes(header_bytes)
    if hdr.header != HDRS_MAGIC:
        raise BootError("setup header has no 'HdrS' magic at 0x202")
    limit = hdr.cmdline_size if hdr.version >= 0x0206 else 255
    if cmdline_size > limit:
        raise BootError(f"command line of {cmdline_size} bytes is longer than the {limit} bytes the kernel accepts")
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise BootError(f"{len(e820)} e820 entries: boot_params holds at most {E820_MAX_ENTRIES_ZEROPAGE}")
    bp = bytearray(BOOT_PARAMS_SIZE)
    bp[SETUP_HEADER_START:SETUP_HEADER_START + len(header_bytes)] = header_bytes
    for name, value in (("type_of_loader", LOADER_UNDEFINED),
                        ("loadflags", (hdr.loadflags & LOADED_HIGH) | CAN_USE_HEAP),
                        ("heap_end_ptr", HEAP_END_PTR),
                        ("cmd_line_ptr", cmdline_gpa & 0xFFFF_FFFF),
                        ("ramdisk_image", initrd_gpa & 0xFFFF_FFFF),
                        ("ramdisk_size", initrd_size & 0xFFFF_FFFF)):
        _put_hdr(bp, name, value)
    struct.pack_into("<III", bp, BP_EXT_RAMDISK_IMAGE, initrd_gpa >> 32, initrd_size >> 32, cmdline_gpa >> 32)
    bp[BP_E820_ENTRIES] = len(e820)
    for i, entry in enumerate(e820):
        E820_ENTRY.pack_into(bp, BP_E820_TABLE + i * E820_ENTRY.size, *entry)
    return bytes(bp)


def e820_map(mem: GuestMemory) -> list[tuple[int, int, int]]:
    """The BIOS e820 memory map of ``mem``: ``(addr, size, type)`` in bytes, sorted by address.

    Every RAM region is E820_RAM (1) except the legacy hole layout.LEGACY_HOLE_START..LEGACY_HOLE_END (EBDA with the
    MP table, VGA, option ROMs, BIOS), which is one E820_RESERVED (2) entry — so low RAM ends at 0x9FC00 and RAM
    resumes at 1 MiB, and RAM above 4 GiB follows the MMIO hole (ACPI 6.5 section 15, "System Address Map").
    """
    lo, hi = layout.LEGACY_HOLE_START, layout.LEGACY_HOLE_END
    out = [(lo, hi - lo, E820_RESERVED)]
    for r in mem.regions:
        for start, end in ((r.gpa, min(r.end, lo)), (max(r.gpa, hi), r.end)):
            if start < end:
                out.append((start, end - start, E820_RAM))
    return sorted(out)


@dataclass(frozen=True)
class BootInfo:
    """Where a loaded kernel starts. Every kind is entered in 64-bit long mode at ``entry`` with RSI = ``boot_params``
    (boot.rst "64-bit BOOT PROTOCOL").

    :param entry: guest physical entry address (startup_64).
    :param boot_params: guest physical address of the zero page.
    :param kind: "elf" (vmlinux), "bzimage-payload" (vmlinux decompressed from a bzImage) or "bzimage" (the bzImage's
        own decompressor runs).
    :param kernel_end: first guest physical byte above the kernel (for a bzImage: runtime start + init_size).
    :param initrd: ``(gpa, size)`` of the initrd in bytes, or None.
    """

    entry: int
    boot_params: int
    kind: str
    kernel_end: int
    initrd: tuple[int, int] | None


def _read(path, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BootError(f"cannot read {what} {path}: {e.strerror or e}") from None


def _align_up(v: int, a: int) -> int:
    return -(-v // a) * a


def _elf_layout(image: bytes | memoryview, what: str) -> tuple[list[tuple[int, memoryview, int]], int, int]:
    """PT_LOAD placements ``(paddr, file bytes, memsz)``, the physical entry and the kernel end of a vmlinux."""
    try:
        elf = ElfImage(image)
    except ElfError as e:
        raise BootError(f"{what}: {e}") from None
    segs = [(ph.vaddr - KERNEL_MAP if ph.paddr >= KERNEL_MAP else ph.paddr, ph) for ph in elf.load_segments if ph.memsz]
    if not segs:
        raise BootError(f"{what}: ELF has no PT_LOAD segments")
    # e_entry as a virtual address inside a segment, else as a physical one (Linux links ENTRY(phys_startup_64)).
    entry = next((elf.entry - ph.vaddr + pa for pa, ph in segs if ph.vaddr <= elf.entry < ph.vaddr + ph.memsz),
                 next((elf.entry for pa, ph in segs if pa <= elf.entry < pa + ph.memsz), None))
    if entry is None:
        raise BootError(f"{what}: ELF entry point {elf.entry:#x} is in no PT_LOAD segment")
    return [(pa, elf.segment_data(ph), ph.memsz) for pa, ph in segs], entry, max(pa + ph.memsz for pa, ph in segs)


def _low_ram_end(mem: GuestMemory) -> int:
    r = next((r for r in mem.regions if r.gpa == 0), None)
    if r is None or r.end < layout.LEGACY_HOLE_END:
        have = 0 if r is None else r.size
        raise BootError(f"guest memory has {have // 1024} KiB at address 0; Linux needs RAM from 0 past 1 MiB")
    return r.end


def load_linux(mem: GuestMemory, kernel_path, *, cmdline: str, initrd_path=None,
               extract_payload: bool = True) -> BootInfo:
    """Load a Linux kernel, initrd and command line into ``mem`` and write boot_params at layout.BOOT_PARAMS.

    - vmlinux ELF: PT_LOAD segments at their physical addresses (p_paddr; p_vaddr - __START_KERNEL_map where p_paddr
      is virtual), entry = physical e_entry, a minimal setup header (kind "elf").
    - bzImage with ``extract_payload``: the compressed vmlinux at payload_offset/payload_length (protocol 2.08+) is
      decompressed and loaded as above, with the bzImage's setup header in boot_params (kind "bzimage-payload").
    - bzImage otherwise: the protected-mode code (after (setup_sects+1)*512 bytes) at pref_address aligned to
      kernel_alignment (relocatable) or code32_start, entered at +0x200; needs XLF_KERNEL_64 (kind "bzimage").

    The command line goes to layout.CMDLINE; the initrd to the highest page-aligned address below
    min(initrd_addr_max + 1, end of low RAM, 0xC0000000) that stays above the kernel.

    :param cmdline: kernel command line (UTF-8, no NUL).
    :raises BootError: unreadable file, not a kernel, unsupported protocol, unknown payload compression, command line
        too long, kernel or initrd not fitting, or less low RAM than kernel end + MIN_FREE_ABOVE_KERNEL.
    """
    image = memoryview(_read(kernel_path, "kernel"))
    low_end = _low_ram_end(mem)
    if is_elf(image):
        kind, hdr = "elf", SetupHeader.from_bytes(minimal_setup_header())
        segments, entry, kernel_end = _elf_layout(image, str(kernel_path))
    else:
        hdr = SetupHeader.from_image(image)
        pm = image[hdr.setup_size:]
        if extract_payload:
            if hdr.version < 0x0208 or not hdr.payload_length:
                raise BootError(f"{kernel_path}: boot protocol {hdr.protocol} bzImage has no payload fields (2.08+); "
                                "load it with extract_payload=False")
            payload = pm[hdr.payload_offset:hdr.payload_offset + hdr.payload_length]
            if len(payload) != hdr.payload_length or len(payload) < 8:
                raise BootError(f"{kernel_path}: payload {hdr.payload_offset:#x}+{hdr.payload_length:#x} runs past "
                                "the end of the file")
            try:
                size = struct.unpack_from("<I", payload, len(payload) - 4)[0]  # appended by the kernel build
                vmlinux = decompress_payload(payload, expected_size=size)
            except PayloadError as e:
                raise BootError(f"{kernel_path}: {e}; load it with extract_payload=False") from None
            if not is_elf(vmlinux):
                raise BootError(f"{kernel_path}: the decompressed payload is not an ELF vmlinux")
            kind = "bzimage-payload"
            segments, entry, kernel_end = _elf_layout(vmlinux, f"{kernel_path} payload")
        else:
            if not hdr.xloadflags & XLF_KERNEL_64:
                raise BootError(f"{kernel_path}: bzImage has no 64-bit entry point (XLF_KERNEL_64 unset); "
                                "Popek enters kernels in long mode")
            if hdr.relocatable_kernel:
                load = runtime = _align_up(hdr.pref_address or hdr.code32_start, max(hdr.kernel_alignment, 1))
            else:  # boot.rst: a non-relocatable kernel moves itself to pref_address
                load, runtime = hdr.code32_start or layout.KERNEL_DEFAULT, hdr.pref_address or hdr.code32_start
            kind, entry = "bzimage", load + BZIMAGE_ENTRY64_OFFSET
            segments = [(load, pm, len(pm))]
            kernel_end = max(load + len(pm), runtime + hdr.init_size)

    cmd = cmdline.encode()
    limit = min(hdr.cmdline_size, layout.CMDLINE_MAX - 1)
    if b"\0" in cmd:
        raise BootError("command line contains a NUL byte")
    if len(cmd) > limit:
        raise BootError(f"command line is {len(cmd)} bytes; this kernel accepts at most {limit}")
    for gpa, _, memsz in segments:
        if gpa < layout.LEGACY_HOLE_END:
            raise BootError(f"kernel segment at {gpa:#x} is below 1 MiB, where the boot structures live")
        if not mem.contains(gpa, memsz):
            raise BootError(f"kernel segment {gpa:#x}+{memsz:#x} (up to {_align_up(gpa + memsz, MiB) // MiB} MiB) "
                            f"does not fit in {mem.size // MiB} MiB of guest memory")
    floor = _align_up(kernel_end, PAGE_SIZE)
    if floor + MIN_FREE_ABOVE_KERNEL > low_end:
        need = _align_up(floor + MIN_FREE_ABOVE_KERNEL, MiB) // MiB
        raise BootError(f"guest memory of {mem.size // MiB} MiB is too small for this kernel: it needs at least "
                        f"{need} MiB below 3 GiB (kernel up to {kernel_end:#x} plus "
                        f"{MIN_FREE_ABOVE_KERNEL // MiB} MiB working space)")

    initrd = None
    if initrd_path is not None:
        try:
            f = open(initrd_path, "rb")
        except OSError as e:
            raise BootError(f"cannot read initrd {initrd_path}: {e.strerror or e}") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise BootError(f"initrd {initrd_path} is empty")
            top = min(hdr.initrd_addr_max + 1, low_end, MMIO_HOLE_START)
            gpa = (top - size) // PAGE_SIZE * PAGE_SIZE
            if gpa < floor:
                raise BootError(f"initrd of {size / MiB:.1f} MiB does not fit in {mem.size // MiB} MiB of guest "
                                f"memory: it must lie between the kernel end {floor:#x} and {top:#x}")
            if f.readinto(mem.view(gpa, size)) != size:
                raise BootError(f"cannot read initrd {initrd_path}: it shrank while being read")
        initrd = (gpa, size)

    for gpa, data, memsz in segments:
        mem.view(gpa, len(data))[:] = data
        if memsz > len(data):
            mem.view(gpa + len(data), memsz - len(data))[:] = bytes(memsz - len(data))
    mem.write(layout.CMDLINE, cmd + b"\0")
    mem.write(layout.BOOT_PARAMS, build_boot_params(
        hdr.raw, cmdline_gpa=layout.CMDLINE, cmdline_size=len(cmd), initrd_gpa=initrd[0] if initrd else 0,
        initrd_size=initrd[1] if initrd else 0, e820=e820_map(mem)))
    return BootInfo(entry=entry, boot_params=layout.BOOT_PARAMS, kind=kind, kernel_end=kernel_end, initrd=initrd)


def kernel_version(path) -> str | None:
    """The version string of a kernel image, or None if it has none.

    bzImage: the NUL-terminated string at kernel_version (0x20E) + 0x200 (boot.rst, "kernel_version"), e.g.
    "6.1.0-27-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP ...". ELF vmlinux: the text after the first
    "Linux version " (linux_banner), up to the newline.

    :raises BootError: if the file cannot be read.
    """
    data = _read(path, "kernel")
    if is_elf(data):
        at = data.find(b"Linux version ")
        while at >= 0 and not data[at + 14:at + 15].isdigit():
            at = data.find(b"Linux version ", at + 1)
        if at < 0:
            return None
        text = data[at + 14:at + 14 + 512]
    else:
        try:
            hdr = SetupHeader.from_image(data)
        except BootError:
            return None
        if not hdr.kernel_version:
            return None
        text = data[hdr.kernel_version + 0x200:hdr.kernel_version + 0x200 + 512]
    return text.split(b"\0")[0].split(b"\n")[0].decode("ascii", "replace") or None
