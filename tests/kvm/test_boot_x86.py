"""popek.boot.x86: boot GDT, identity page tables and the long-mode register state of a boot vCPU."""

from __future__ import annotations

import struct

import pytest

from popek.boot import layout
from popek.boot import x86
from popek.memory import GuestMemory

# --- no KVM needed ---------------------------------------------------------------------------------------------


def test_gdt_entry_encodes_the_standard_flat_64_bit_code_and_data_descriptors():
    assert x86.gdt_entry(0xA09B, 0, 0xFFFFF) == 0x00AF9B000000FFFF
    assert x86.gdt_entry(0xC093, 0, 0xFFFFF) == 0x00CF93000000FFFF
    assert x86.gdt_entry(0x808B, 0x12345678, 0x67) == 0x12808B3456780067  # G, base split 8+24 bits


def test_identity_page_tables_map_4_gib_with_2_mib_pages():
    with GuestMemory.x86(1 << 20) as mem:
        assert x86.write_identity_page_tables(mem) == layout.PML4
        assert mem.read_u64(layout.PML4) == layout.PDPT | 3
        for i in range(4):
            assert mem.read_u64(layout.PDPT + 8 * i) == (layout.PD_START + 4096 * i) | 3
        assert mem.read_u64(layout.PDPT + 8 * 4) == 0
        # guest physical address a -> PD entry a >> 21 (PD pages are contiguous), maps a's 2 MiB frame, P|RW|PS
        for a in (0, 0x200000, 0x4000_0000, 0xFEE0_0000, 0xFFFF_FFFF):
            assert mem.read_u64(layout.PD_START + 8 * (a >> 21)) == (a & ~0x1FFFFF) | 0x83


# --- on /dev/kvm -----------------------------------------------------------------------------------------------


@pytest.fixture
def boot_vcpu(kvm):
    vm = kvm.create_vm()
    vm.create_irqchip()
    mem = GuestMemory.x86(2 << 20)
    vm.set_user_memory_region(0, 0, mem.size, mem.regions[0].host_address)
    fds = [vm.create_vcpu(0), vm.create_vcpu(1)]
    yield mem, fds
    for fd in fds:
        fd.close()
    vm.close()
    mem.close()


@pytest.mark.kvm
def test_setup_long_mode_sets_64_bit_boot_protocol_state(boot_vcpu):
    mem, (fd, _) = boot_vcpu
    x86.setup_long_mode(mem, fd, rip=0x1000000, rsi=layout.BOOT_PARAMS, rsp=0x8FF0)
    s = fd.get_sregs()
    assert s.efer & (x86.EFER_LME | x86.EFER_LMA) == x86.EFER_LME | x86.EFER_LMA
    assert s.cr0 & (x86.X86_CR0_PE | x86.X86_CR0_PG) == x86.X86_CR0_PE | x86.X86_CR0_PG
    assert s.cr4 & x86.X86_CR4_PAE and s.cr3 == layout.PML4
    assert (s.cs.selector, s.cs.l, s.cs.db, s.cs.dpl, s.cs.type & 8) == (0x10, 1, 0, 0, 8)
    for seg in (s.ds, s.es, s.ss):
        assert (seg.selector, seg.type & 8, seg.present, seg.base) == (0x18, 0, 1, 0)
    assert (s.gdt.base, s.gdt.limit, s.idt.base) == (layout.BOOT_GDT, 31, layout.BOOT_IDT)
    assert struct.unpack("<4Q", mem.read(layout.BOOT_GDT, 32)) == (0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)
    r = fd.get_regs()
    assert (r.rip, r.rsi, r.rsp, r.rflags, r.rax) == (0x1000000, layout.BOOT_PARAMS, 0x8FF0, 2, 0)
    assert fd.get_fpu().fcw == 0x37F


@pytest.mark.kvm
def test_setup_msrs_sets_fast_strings_and_write_back_mtrr_default(boot_vcpu):
    _, (fd, _) = boot_vcpu
    x86.setup_msrs(fd)
    got = fd.get_msrs([x86.MSR_IA32_MISC_ENABLE, x86.MSR_MTRR_DEF_TYPE, x86.MSR_LSTAR])
    assert got[x86.MSR_IA32_MISC_ENABLE] & x86.MSR_IA32_MISC_ENABLE_FAST_STRING
    assert got[x86.MSR_MTRR_DEF_TYPE] == (1 << 11) | 6
    assert got[x86.MSR_LSTAR] == 0


@pytest.mark.kvm
def test_setup_lapic_makes_lint0_extint_and_lint1_nmi(boot_vcpu):
    _, (fd, _) = boot_vcpu
    x86.setup_lapic(fd)
    regs = bytes(fd.get_lapic().regs)
    lvt0, lvt1 = (struct.unpack_from("<I", regs, off)[0] for off in (x86.APIC_LVT0, x86.APIC_LVT1))
    assert (lvt0 >> 8) & 7 == x86.APIC_MODE_EXTINT
    assert (lvt1 >> 8) & 7 == x86.APIC_MODE_NMI


@pytest.mark.kvm
def test_setup_cpuid_puts_each_vcpus_apic_id_in_leaves_1_and_0xb(kvm, boot_vcpu):
    _, fds = boot_vcpu
    supported = kvm.supported_cpuid()
    original = [bytes(e) for e in supported]
    for fd in fds:
        entries = x86.setup_cpuid(fd, supported, cpu_count=2)
        leaf1 = next(e for e in entries if e.function == 1)
        assert (leaf1.ebx >> 24, (leaf1.ebx >> 16) & 0xFF) == (fd.index, 2)
        assert leaf1.ecx >> 31 == 1 and leaf1.edx >> 28 & 1
        assert all(e.edx == fd.index for e in entries if e.function == 0xB)
    assert [bytes(e) for e in supported] == original, "the supported list was modified"
