"""Fixed guest-physical addresses of the x86 boot structures Popek writes (one place, so loaders never collide)."""

#: Boot GDT (entries: null, null, __BOOT_CS=0x10, __BOOT_DS=0x18, ...), per the 64-bit boot protocol.
BOOT_GDT = 0x500
#: An empty IDT for the boot vCPU state.
BOOT_IDT = 0x520
#: Identity-mapping page tables for long-mode entry: PML4, then PDPT, then page directories (one 4 KiB page each).
PML4 = 0x9000
PDPT = 0xA000
PD_START = 0xB000
#: Number of page-directory pages: 4 x 1 GiB of 2 MiB pages identity-maps the first 4 GiB.
PD_PAGES = 4
#: ``boot_params`` ("zero page"), Documentation/arch/x86/boot.rst.
BOOT_PARAMS = 0x7000
#: Kernel command line (boot protocol: below the kernel, above the zero page).
CMDLINE = 0x20000
CMDLINE_MAX = 0x10000
#: Extended BIOS data area where the MP floating pointer and MP table go (Intel MP spec 1.4, section 4).
EBDA_START = 0x9FC00
#: The MP configuration table (its floating pointer stays in the EBDA): the BIOS area, room for 254 CPUs' entries.
MP_TABLE = 0xF0000
MP_TABLE_END = 0x100000
#: Legacy hole that the e820 map reports as reserved (EBDA, VGA, option ROMs, BIOS).
LEGACY_HOLE_START = 0x9FC00
LEGACY_HOLE_END = 0x100000
#: Where a kernel without a fixed load address goes: 1 MiB (boot protocol "code32_start" default).
KERNEL_DEFAULT = 0x100000
#: KVM_SET_TSS_ADDR / KVM_SET_IDENTITY_MAP_ADDR: three pages and one page just below the 4 GiB BIOS area.
KVM_TSS_ADDR = 0xFFFBD000
KVM_IDENTITY_MAP_ADDR = 0xFFFBC000
#: IOAPIC and local APIC MMIO bases (fixed by the platform).
IOAPIC_BASE = 0xFEC00000
LAPIC_BASE = 0xFEE00000
