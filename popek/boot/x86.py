"""x86-64 entry state of a boot vCPU: boot GDT, identity page tables, long-mode registers, MSRs, LAPIC LINTs, CPUID."""

from __future__ import annotations

import struct

from popek.boot import layout
from popek.kvm.abi import kvm_cpuid_entry2, kvm_segment
from popek.kvm.system import VcpuFd
from popek.memory import GuestMemory

# Control register bits (Intel SDM vol. 3A, 2.5 "Control Registers"; 2.2.1 "Extended Feature Enable Register").
X86_CR0_PE, X86_CR0_ET, X86_CR0_NE, X86_CR0_PG = 1 << 0, 1 << 4, 1 << 5, 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10

#: Selectors of the boot GDT (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol": __BOOT_CS, __BOOT_DS).
BOOT_CS, BOOT_DS = 0x10, 0x18

# Page-table entry bits (SDM vol. 3A, 4.5 "4-Level Paging").
_PTE_P, _PTE_RW, _PTE_PS = 1 << 0, 1 << 1, 1 << 7

# MSRs set at boot (SDM vol. 4), as Firecracker's create_boot_msr_entries.
MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP = 0x174, 0x175, 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_IA32_MISC_ENABLE_FAST_STRING = 1 << 0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SYSCALL_MASK = 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102

# Local APIC registers and delivery modes (SDM vol. 3A, 10.5.1 "Local Vector Table").
APIC_LVT0, APIC_LVT1 = 0x350, 0x360
APIC_MODE_NMI, APIC_MODE_EXTINT = 0x4, 0x7


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """Encode a code/data segment descriptor (SDM vol. 3A, 3.4.5): ``flags`` = G/DB/L/AVL nibble << 12 | access byte."""
    return (((base & 0xFF000000) << 32) | ((flags & 0xF0FF) << 40) | ((limit & 0xF0000) << 32)
            | ((base & 0x00FFFFFF) << 16) | (limit & 0xFFFF))


def _segment(selector: int, entry: int) -> kvm_segment:
    """The kvm_segment (hidden descriptor cache) matching GDT descriptor ``entry``."""
    limit = (entry & 0xFFFF) | ((entry >> 32) & 0xF0000)
    g = (entry >> 55) & 1
    return kvm_segment(base=((entry >> 16) & 0xFFFFFF) | ((entry >> 32) & 0xFF000000),
                       limit=(limit << 12) | 0xFFF if g else limit, selector=selector, type=(entry >> 40) & 0xF,
                       present=(entry >> 47) & 1, dpl=(entry >> 45) & 3, db=(entry >> 54) & 1, s=(entry >> 44) & 1,
                       l=(entry >> 53) & 1, g=g, avl=(entry >> 52) & 1, unusable=0)


#: Boot GDT: null, null, __BOOT_CS (64-bit code, DPL 0), __BOOT_DS (flat data).
BOOT_GDT_ENTRIES = (0, 0, gdt_entry(0xA09B, 0, 0xFFFFF), gdt_entry(0xC093, 0, 0xFFFFF))


def write_identity_page_tables(mem: GuestMemory) -> int:
    """Identity-map the first 4 GiB with 2 MiB pages at layout.PML4/PDPT/PD_START (supervisor, writable).

    :returns: the CR3 value (layout.PML4).
    :raises GuestMemoryError: if the tables' pages are not guest RAM.
    """
    mem.write_u64(layout.PML4, layout.PDPT | _PTE_P | _PTE_RW)
    mem.write(layout.PML4 + 8, bytes(4096 - 8))
    mem.write(layout.PDPT, struct.pack(f"<{layout.PD_PAGES}Q", *(
        (layout.PD_START + i * 4096) | _PTE_P | _PTE_RW for i in range(layout.PD_PAGES))))
    mem.write(layout.PDPT + 8 * layout.PD_PAGES, bytes(4096 - 8 * layout.PD_PAGES))
    n = 512 * layout.PD_PAGES
    mem.write(layout.PD_START, struct.pack(f"<{n}Q", *((i << 21) | _PTE_P | _PTE_RW | _PTE_PS for i in range(n))))
    return layout.PML4


def setup_long_mode(mem: GuestMemory, vcpu: VcpuFd, rip: int, rsi: int = 0, rsp: int = 0) -> None:
    """Put ``vcpu`` in 64-bit long mode at CPL 0, as the Linux 64-bit boot protocol requires for ``startup_64``.

    Writes the boot GDT at layout.BOOT_GDT, an empty IDT at layout.BOOT_IDT and identity page tables; sets CR0
    (PE|ET|NE|PG), CR4 (PAE), EFER (LME|LMA), CR3, CS=__BOOT_CS, DS/ES/FS/GS/SS=__BOOT_DS; RIP, RSI (boot_params
    pointer), RSP, RFLAGS=2; FPU fcw=0x37f, mxcsr=0x1f80. TR and LDT keep KVM's reset state (a usable busy TSS and
    an LDT), which VM entry accepts in long mode. Source: Documentation/arch/x86/boot.rst "64-bit Boot Protocol";
    Firecracker arch/x86_64/regs.rs.

    :raises GuestMemoryError: if the boot structures' addresses are not guest RAM; KvmError on an ioctl failure.
    """
    mem.write(layout.BOOT_GDT, struct.pack(f"<{len(BOOT_GDT_ENTRIES)}Q", *BOOT_GDT_ENTRIES))
    mem.write_u64(layout.BOOT_IDT, 0)
    cr3 = write_identity_page_tables(mem)

    sregs = vcpu.get_sregs()
    code = _segment(BOOT_CS, BOOT_GDT_ENTRIES[BOOT_CS >> 3])
    data = _segment(BOOT_DS, BOOT_GDT_ENTRIES[BOOT_DS >> 3])
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    sregs.gdt.base, sregs.gdt.limit = layout.BOOT_GDT, 8 * len(BOOT_GDT_ENTRIES) - 1
    sregs.idt.base, sregs.idt.limit = layout.BOOT_IDT, 7
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG
    sregs.cr3 = cr3
    sregs.cr4 = X86_CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)

    regs = vcpu.get_regs()
    for name, _ in regs._fields_:
        setattr(regs, name, 0)
    regs.rip, regs.rsi, regs.rsp, regs.rflags = rip, rsi, rsp, 2
    vcpu.set_regs(regs)

    fpu = vcpu.get_fpu()
    fpu.fcw, fpu.mxcsr = 0x37F, 0x1F80
    vcpu.set_fpu(fpu)


#: MSR values of a boot vCPU (Firecracker arch/x86_64/msr.rs create_boot_msr_entries).
BOOT_MSRS = {MSR_IA32_SYSENTER_CS: 0, MSR_IA32_SYSENTER_ESP: 0, MSR_IA32_SYSENTER_EIP: 0, MSR_STAR: 0,
             MSR_CSTAR: 0, MSR_KERNEL_GS_BASE: 0, MSR_SYSCALL_MASK: 0, MSR_LSTAR: 0, MSR_IA32_TSC: 0,
             MSR_IA32_MISC_ENABLE: MSR_IA32_MISC_ENABLE_FAST_STRING, MSR_MTRR_DEF_TYPE: (1 << 11) | 6}


def setup_msrs(vcpu: VcpuFd) -> None:
    """Set the boot MSRs (BOOT_MSRS: SYSENTER/SYSCALL MSRs 0, TSC 0, fast strings, MTRRs on with write-back default).

    :raises KvmError: naming the MSR KVM refused.
    """
    vcpu.set_msrs(BOOT_MSRS)


def setup_lapic(vcpu: VcpuFd) -> None:
    """Program LINT0 as ExtINT (the 8259 PIC's output) and LINT1 as NMI, as Firecracker's ``set_lint``.

    Intel MP spec 1.4, 3.6.2.1 (virtual wire mode). Needs the in-kernel irqchip (KVM_GET_LAPIC fails without).
    """
    lapic = vcpu.get_lapic()
    raw = memoryview(lapic.regs).cast("B")
    for reg, mode in ((APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)):
        v = struct.unpack_from("<I", raw, reg)[0]
        struct.pack_into("<I", raw, reg, (v & ~0x700) | (mode << 8))
    vcpu.set_lapic(lapic)


def setup_cpuid(vcpu: VcpuFd, supported: list[kvm_cpuid_entry2], cpu_count: int) -> list[kvm_cpuid_entry2]:
    """KVM_SET_CPUID2 with ``supported`` (from ``Kvm.supported_cpuid()``) adjusted for vCPU ``vcpu.index``.

    Leaf 1: EBX[31:24] = initial APIC id, EBX[23:16] = logical processors (HTT set when > 1), ECX[31] hypervisor.
    Leaves 0xB/0x1F: EDX = x2APIC id (SDM vol. 2A, CPUID). kvm_pvm accepts and ignores the table (environment.md).

    :returns: the entries set (copies; ``supported`` is not modified).
    """
    out = []
    for e in supported:
        e = kvm_cpuid_entry2.from_buffer_copy(e)
        if e.function == 1:
            e.ebx = (e.ebx & 0x0000FFFF) | (vcpu.index << 24) | (min(cpu_count, 255) << 16)
            e.ecx |= 1 << 31
            if cpu_count > 1:
                e.edx |= 1 << 28
        elif e.function in (0xB, 0x1F):
            e.edx = vcpu.index
        out.append(e)
    vcpu.set_cpuid2(out)
    return out
