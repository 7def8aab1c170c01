"""VMM-side instruction emulation (popek.emulate) on a fake vCPU over real guest memory and page tables."""

import threading

import pytest

from popek.emulate import RFLAGS_AC, RFLAGS_CF, RFLAGS_OF, RFLAGS_PF, RFLAGS_SF, RFLAGS_ZF, EmulationFailure, Emulator
from popek.kvm.abi import kvm_xsave
from popek.kvm.system import InternalError
from popek.memory import GuestMemory
from fakevcpu import FakeRegsVcpu

KERNEL = 0xFFFF_FFFF_8000_0000  # 1 GiB page -> guest physical 0
CODE = 0x10_0000  # physical address of the code page; RIP = KERNEL + CODE
DATA = 0x20_0000  # physical address of a data page, also mapped at KERNEL + DATA
EDGE = 0x4000_0000  # one 4 KiB page -> guest physical EDGE_PHYS; the page after it is not present
EDGE_PHYS = 0x30_0000
UNMAPPED = EDGE + 0x1000
RIP = KERNEL + CODE


class FakeVcpu(FakeRegsVcpu):
    """The VcpuFd subset the emulator uses, holding kvm_regs/kvm_sregs/kvm_xsave and recording injections."""

    def __init__(self, index=0):
        super().__init__(index)
        self.xsave = kvm_xsave()
        self.xsave.region[6], self.xsave.region[7] = 0x1F80, 0xFFFF  # MXCSR, MXCSR_MASK as KVM_GET_XSAVE gave them
        self.injected = []

    def get_xsave(self):
        return kvm_xsave.from_buffer_copy(self.xsave)

    def set_xsave(self, xsave):
        self.xsave = kvm_xsave.from_buffer_copy(xsave)

    @property
    def mxcsr(self):
        return self.xsave.region[6]

    def inject_exception(self, nr, error_code=None):
        self.injected.append((nr, error_code))


def internal_error(insn_bytes, suberror=1):
    return InternalError(suberror, (), insn_bytes)


@pytest.fixture
def mem():
    with GuestMemory([(0, 0x100_0000)]) as m:
        pml4, pdpt_lo, pdpt_hi = 0x1000, 0x2000, 0x3000
        m.write_u64(pml4, pdpt_lo | 3)
        m.write_u64(pml4 + 511 * 8, pdpt_hi | 3)
        m.write_u64(pdpt_lo, 0 | 0x83)  # identity 1 GiB, supervisor RW
        m.write_u64(pdpt_hi + 510 * 8, 0 | 0x83)  # KERNEL -> 0
        m.write_u64(pdpt_lo + 8, 0x4000 | 3)  # EDGE: PD at 0x4000 -> PT at 0x5000 -> one page
        m.write_u64(0x4000, 0x5000 | 3)
        m.write_u64(0x5000, EDGE_PHYS | 3)
        yield m


def long_mode_vcpu(index=0):
    v = FakeVcpu(index)
    s = v.sregs
    s.cr0, s.cr3, s.cr4, s.efer = 0x8001_0033, 0x1000, 0x220, 0xD01  # PG|WP|NE|ET|MP|PE; PAE|OSFXSR; LMA|LME|NXE|SCE
    s.cs.l, s.cs.dpl, s.ss.dpl = 1, 0, 0
    v.regs.rip, v.regs.rflags = RIP, 0x2
    return v


@pytest.fixture
def vcpu():
    return long_mode_vcpu()


def test_other_internal_error_suberrors_are_left_to_the_caller(mem, vcpu):
    assert Emulator(mem).handle(vcpu, internal_error(b"\xcc", suberror=3)) is False
    assert vcpu.regs.rip == RIP and vcpu.injected == []


def test_int3_advances_rip_then_injects_bp(mem, vcpu):
    emu = Emulator(mem)
    assert emu.handle(vcpu, internal_error(b"\xcc"))
    assert vcpu.regs.rip == RIP + 1 and vcpu.injected == [(3, None)]
    assert emu.counts["int3"] == 1


def test_clac_clears_and_stac_sets_rflags_ac(mem, vcpu):
    emu = Emulator(mem)
    vcpu.regs.rflags = 0x2 | RFLAGS_AC
    emu.handle(vcpu, internal_error(b"\x0f\x01\xca"))
    assert vcpu.regs.rflags == 0x2 and vcpu.regs.rip == RIP + 3
    emu.handle(vcpu, internal_error(b"\x0f\x01\xcb"))
    assert vcpu.regs.rflags == 0x2 | RFLAGS_AC and vcpu.regs.rip == RIP + 6
    assert emu.counts == {"clac": 1, "stac": 1}


def test_clac_at_cpl3_injects_ud_without_advancing(mem, vcpu):
    vcpu.sregs.ss.dpl = 3
    Emulator(mem).handle(vcpu, internal_error(b"\x0f\x01\xca"))
    assert vcpu.injected == [(6, None)] and vcpu.regs.rip == RIP


def test_fwait_only_advances_rip(mem, vcpu):
    vcpu.regs.rax = 7
    Emulator(mem).handle(vcpu, internal_error(b"\x9b"))
    assert vcpu.regs.rip == RIP + 1 and vcpu.regs.rax == 7 and vcpu.injected == []


def test_completed_instruction_clears_rflags_rf(mem, vcpu):
    vcpu.regs.rflags = 0x2 | (1 << 16)
    Emulator(mem).handle(vcpu, internal_error(b"\x9b"))
    assert vcpu.regs.rflags == 0x2


def test_instruction_bytes_are_fetched_through_page_tables_when_exit_has_none(mem, vcpu):
    mem.write(CODE, b"\x0f\x01\xcb")  # stac
    Emulator(mem).handle(vcpu, internal_error(None))
    assert vcpu.regs.rflags & RFLAGS_AC and vcpu.regs.rip == RIP + 3


def test_short_exit_bytes_are_completed_from_guest_memory(mem, vcpu):
    mem.write(CODE, b"\xf3\x48\x0f\xb8\xc3")
    vcpu.regs.rbx = 0xFF
    Emulator(mem).handle(vcpu, internal_error(b"\xf3\x48"))  # KVM reported only 2 of popcnt's 5 bytes
    assert vcpu.regs.rax == 8 and vcpu.regs.rip == RIP + 5


def test_instruction_ending_at_last_mapped_byte_is_emulated(mem, vcpu):
    mem.write(EDGE_PHYS + 0xFFF, b"\xcc")
    vcpu.regs.rip = EDGE + 0xFFF
    Emulator(mem).handle(vcpu, internal_error(None))
    assert vcpu.injected == [(3, None)] and vcpu.regs.rip == EDGE + 0x1000


def test_instruction_fetch_into_unmapped_page_injects_fetch_pf(mem, vcpu):
    mem.write(EDGE_PHYS + 0xFFE, b"\x0f\x01")  # clac's third byte would be on the unmapped page
    vcpu.regs.rip = EDGE + 0xFFE
    Emulator(mem).handle(vcpu, internal_error(None))
    assert vcpu.injected == [(14, 0x10)] and vcpu.sregs.cr2 == UNMAPPED and vcpu.regs.rip == EDGE + 0xFFE


def test_popcnt_r64_counts_bits_and_clears_arithmetic_flags(mem, vcpu):
    vcpu.regs.rbx = 0xF0F0_0000_0000_0001
    vcpu.regs.rflags = 0x2 | RFLAGS_CF | RFLAGS_OF | RFLAGS_SF | RFLAGS_PF | RFLAGS_ZF
    Emulator(mem).handle(vcpu, internal_error(b"\xf3\x48\x0f\xb8\xc3"))  # popcnt rax, rbx
    assert vcpu.regs.rax == 9 and vcpu.regs.rflags == 0x2 and vcpu.regs.rip == RIP + 5


def test_popcnt_of_zero_sets_zf(mem, vcpu):
    vcpu.regs.rax, vcpu.regs.rbx = 55, 0
    Emulator(mem).handle(vcpu, internal_error(b"\xf3\x48\x0f\xb8\xc3"))
    assert vcpu.regs.rax == 0 and vcpu.regs.rflags == 0x2 | RFLAGS_ZF


def test_popcnt_r32_zero_extends_and_r16_merges(mem, vcpu):
    vcpu.regs.rax, vcpu.regs.rcx = 0xFFFF_FFFF_FFFF_FFFF, 0xFFFF_FFFF_0000_0007
    Emulator(mem).handle(vcpu, internal_error(b"\xf3\x0f\xb8\xc1"))  # popcnt eax, ecx
    assert vcpu.regs.rax == 3
    vcpu.regs.rax, vcpu.regs.rcx = 0x1234_5678_9ABC_DEF0, 0xFFFF_0000_0000_00FF
    Emulator(mem).handle(vcpu, internal_error(b"\x66\xf3\x0f\xb8\xc1"))  # popcnt ax, cx
    assert vcpu.regs.rax == 0x1234_5678_9ABC_0008


def test_popcnt_memory_source_uses_base_index_scale_displacement(mem, vcpu):
    mem.write_u64(DATA + 0x48, 0xFF00_FF00_FF00_FF01)
    vcpu.regs.rax, vcpu.regs.rbx = KERNEL + DATA, 0x10
    Emulator(mem).handle(vcpu, internal_error(b"\xf3\x48\x0f\xb8\x44\x98\x08"))  # popcnt rax, [rax+rbx*4+8]
    assert vcpu.regs.rax == 33 and vcpu.regs.rip == RIP + 7


def _cmpxchg16b_setup(mem, vcpu, memory, expected):
    mem.write(DATA, memory)
    vcpu.regs.rdi = KERNEL + DATA
    vcpu.regs.rax, vcpu.regs.rdx = expected
    vcpu.regs.rbx, vcpu.regs.rcx = 0xBBBB_BBBB_BBBB_BBBB, 0xCCCC_CCCC_CCCC_CCCC


def test_lock_cmpxchg16b_equal_stores_rcx_rbx_and_sets_zf(mem, vcpu):
    _cmpxchg16b_setup(mem, vcpu, (1).to_bytes(8, "little") + (2).to_bytes(8, "little"), (1, 2))
    emu = Emulator(mem)
    emu.handle(vcpu, internal_error(b"\xf0\x48\x0f\xc7\x0f"))  # lock cmpxchg16b [rdi]
    assert mem.read(DATA, 16) == b"\xbb" * 8 + b"\xcc" * 8
    assert vcpu.regs.rflags & RFLAGS_ZF and (vcpu.regs.rax, vcpu.regs.rdx) == (1, 2)
    assert vcpu.regs.rip == RIP + 5 and emu.counts["cmpxchg16b"] == 1


def test_cmpxchg16b_unequal_loads_rdx_rax_clears_zf_and_keeps_memory(mem, vcpu):
    old = (5).to_bytes(8, "little") + (6).to_bytes(8, "little")
    _cmpxchg16b_setup(mem, vcpu, old, (1, 2))
    vcpu.regs.rflags = 0x2 | RFLAGS_ZF
    Emulator(mem).handle(vcpu, internal_error(b"\x48\x0f\xc7\x0f"))  # cmpxchg16b [rdi]
    assert mem.read(DATA, 16) == old
    assert not vcpu.regs.rflags & RFLAGS_ZF and (vcpu.regs.rax, vcpu.regs.rdx) == (5, 6)


def test_cmpxchg16b_misaligned_operand_injects_gp0(mem, vcpu):
    _cmpxchg16b_setup(mem, vcpu, bytes(16), (0, 0))
    vcpu.regs.rdi += 8
    Emulator(mem).handle(vcpu, internal_error(b"\xf0\x48\x0f\xc7\x0f"))
    assert vcpu.injected == [(13, 0)] and vcpu.regs.rip == RIP


def test_cmpxchg8b_compares_edx_eax_and_stores_ecx_ebx(mem, vcpu):
    mem.write_u64(DATA, 0x0000_0002_0000_0001)
    vcpu.regs.rsi = KERNEL + DATA
    vcpu.regs.rax, vcpu.regs.rdx = 0xFFFF_FFFF_0000_0001, 2  # upper halves are not compared
    vcpu.regs.rbx, vcpu.regs.rcx = 0x1111_1111, 0x2222_2222
    emu = Emulator(mem)
    emu.handle(vcpu, internal_error(b"\x0f\xc7\x0e"))  # cmpxchg8b [rsi]
    assert mem.read_u64(DATA) == 0x2222_2222_1111_1111 and vcpu.regs.rflags & RFLAGS_ZF
    emu.handle(vcpu, internal_error(b"\x0f\xc7\x0e"))  # now unequal: loads EDX:EAX
    assert (vcpu.regs.rax, vcpu.regs.rdx) == (0x1111_1111, 0x2222_2222) and not vcpu.regs.rflags & RFLAGS_ZF


def test_ldmxcsr_rip_relative_loads_mxcsr_into_xsave_state_marking_sse_in_use(mem, vcpu):
    mem.write_u32(CODE + 7 + 0x100, 0x9FC0)
    Emulator(mem).handle(vcpu, internal_error(b"\x0f\xae\x15\x00\x01\x00\x00"))  # ldmxcsr [rip+0x100]
    assert vcpu.mxcsr == 0x9FC0 and vcpu.regs.rip == RIP + 7 and vcpu.injected == []
    assert vcpu.xsave.region[128] & 2  # XSTATE_BV.SSE, without which KVM_SET_XSAVE drops MXCSR


def test_ldmxcsr_uses_default_mxcsr_mask_when_saved_mask_is_zero(mem, vcpu):
    vcpu.xsave.region[7] = 0
    mem.write_u32(DATA, 0x1FC0)  # DAZ (bit 6) is outside the default mask 0xFFBF
    vcpu.regs.rax = KERNEL + DATA
    Emulator(mem).handle(vcpu, internal_error(b"\x0f\xae\x10"))
    assert vcpu.injected == [(13, 0)] and vcpu.mxcsr == 0x1F80


def test_ldmxcsr_with_reserved_bit_injects_gp0_and_keeps_mxcsr(mem, vcpu):
    mem.write_u32(DATA, 0x1_1F80)
    vcpu.regs.rax = KERNEL + DATA
    Emulator(mem).handle(vcpu, internal_error(b"\x0f\xae\x10"))  # ldmxcsr [rax]
    assert vcpu.injected == [(13, 0)] and vcpu.mxcsr == 0x1F80 and vcpu.regs.rip == RIP


def test_stmxcsr_with_fs_override_adds_fs_base(mem, vcpu):
    vcpu.sregs.fs.base = KERNEL + DATA
    vcpu.xsave.region[6] = 0x1FBF
    Emulator(mem).handle(vcpu, internal_error(b"\x64\x0f\xae\x1c\x25\x40\x00\x00\x00"))  # stmxcsr fs:[0x40]
    assert mem.read_u32(DATA + 0x40) == 0x1FBF and vcpu.regs.rip == RIP + 9


def test_vldmxcsr_and_vstmxcsr_round_trip(mem, vcpu):
    mem.write_u32(DATA, 0x7F80)
    vcpu.regs.rax, vcpu.regs.rcx = KERNEL + DATA, KERNEL + DATA + 4
    emu = Emulator(mem)
    emu.handle(vcpu, internal_error(b"\xc5\xf8\xae\x10"))  # vldmxcsr [rax]
    emu.handle(vcpu, internal_error(b"\xc5\xf8\xae\x19"))  # vstmxcsr [rcx]
    assert vcpu.mxcsr == 0x7F80 and mem.read_u32(DATA + 4) == 0x7F80
    assert emu.counts == {"vldmxcsr": 1, "vstmxcsr": 1}


def test_ldmxcsr_with_cr0_ts_injects_nm(mem, vcpu):
    vcpu.sregs.cr0 |= 1 << 3
    vcpu.regs.rax = KERNEL + DATA
    Emulator(mem).handle(vcpu, internal_error(b"\x0f\xae\x10"))
    assert vcpu.injected == [(7, None)] and vcpu.regs.rip == RIP


def test_page_fault_on_memory_operand_injects_pf_with_cr2(mem, vcpu):
    vcpu.regs.rax = UNMAPPED + 0x10
    Emulator(mem).handle(vcpu, internal_error(b"\x0f\xae\x18"))  # stmxcsr [rax]: a supervisor write
    assert vcpu.injected == [(14, 0b10)] and vcpu.sregs.cr2 == UNMAPPED + 0x10 and vcpu.regs.rip == RIP


def test_protected_mode_operand_adds_ds_base_to_32_bit_address(mem):
    v = FakeVcpu()
    v.sregs.cr0, v.sregs.cr4 = 0x11, 0x200  # PE|ET, OSFXSR; paging off
    v.sregs.cs.db, v.sregs.ds.base = 1, 0x1000_0000
    v.regs.rip, v.regs.rax = 0x8000, DATA - 0x1000_0000 + 0x20
    mem.write_u32(DATA + 0x10, 0x1F81)
    Emulator(mem).handle(v, internal_error(b"\x0f\xae\x50\xf0"))  # ldmxcsr [eax-0x10]
    assert v.mxcsr == 0x1F81 and v.regs.rip == 0x8004


def test_unknown_instruction_fails_naming_instruction_bytes_rip_and_cpl(mem, vcpu):
    emu = Emulator(mem)
    with pytest.raises(EmulationFailure) as e:
        emu.handle(vcpu, internal_error(b"\x48\x0f\xae\x29\x90\x90"))  # xrstor64 [rcx]
    msg = str(e.value)
    assert f"guest vCPU 0 at rip {RIP:#x} (CPL 0): cannot emulate 'xrstor64 [rcx]' (48 0f ae 29)" in msg
    assert "noxsave" in msg and sum(emu.counts.values()) == 0 and vcpu.regs.rip == RIP


def test_xsetbv_is_refused_not_emulated(mem, vcpu):
    with pytest.raises(EmulationFailure, match=r"'xsetbv' \(0f 01 d1\)"):
        Emulator(mem).handle(vcpu, internal_error(b"\x0f\x01\xd1"))


def test_undecodable_bytes_fail_with_their_hex(mem, vcpu):
    expected = r"at rip 0xffffffff80100000 \(CPL 0\): cannot decode instruction bytes \(06 00"
    with pytest.raises(EmulationFailure, match=expected):
        Emulator(mem).handle(vcpu, internal_error(b"\x06" + bytes(14)))  # push es: invalid in 64-bit mode


def test_counts_are_exact_with_concurrent_vcpu_threads(mem):
    emu = Emulator(mem)
    vcpus = [long_mode_vcpu(i) for i in range(4)]

    def run(v):
        for _ in range(300):
            emu.handle(v, internal_error(b"\x9b"))

    threads = [threading.Thread(target=run, args=(v,)) for v in vcpus]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert emu.counts["wait"] == 1200 and all(v.regs.rip == RIP + 300 for v in vcpus)
