"""SYSCALL repair (popek.repair) on a fake vCPU whose guest memory holds page tables, an IDT and a #PF frame."""

import struct

import pytest

from popek.kvm.abi import KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP, kvm_sregs
from popek.kvm.system import Debug
from popek.memory import GuestMemory
from popek.repair import MSR_LSTAR, MSR_STAR, MSR_SYSCALL_MASK, SyscallRepair
from fakevcpu import FakeRegsVcpu

KERNEL = 0xFFFF_FFFF_8000_0000  # 1 GiB page -> guest physical 0
IDT, IDT2 = 0x6000, 0x7000  # physical; linear KERNEL + x
HANDLER, HANDLER2 = KERNEL + 0x10_0100, KERNEL + 0x10_0800
LSTAR = KERNEL + 0x14_0040  # entry_SYSCALL_64
KSTACK = 0x9000  # physical top of the kernel stack the #PF frame is pushed on
STAR = 0x0023_0010_0000_0000  # Linux: SYSRET base 0x23, SYSCALL CS 0x10
SFMASK = 0x47700  # Linux: TF DF IF IOPL NT AC
ARMED = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP
STEP = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP


class FakeVcpu(FakeRegsVcpu):
    """The VcpuFd contract subset SyscallRepair uses; records set_guest_debug calls."""

    def __init__(self, index=0):
        super().__init__(index)
        self.msrs = {MSR_STAR: STAR, MSR_LSTAR: LSTAR, MSR_SYSCALL_MASK: SFMASK}
        self.debug = []

    def get_msrs(self, indices):
        return {i: self.msrs[i] for i in indices}

    def set_guest_debug(self, control, debugreg):
        self.debug.append((control, list(debugreg)))


def write_gate(mem, idt, vector, target, present=True):
    """A 64-bit interrupt gate (SDM Vol. 3A Figure 6-8) for ``target`` in IDT at physical ``idt``."""
    lo = (target & 0xFFFF) | 0x10 << 16 | (0x8E if present else 0x0E) << 40 | ((target >> 16) & 0xFFFF) << 48
    mem.write(idt + vector * 16, struct.pack("<QQ", lo, target >> 32))


@pytest.fixture
def mem():
    with GuestMemory([(0, 0x100_0000)]) as m:
        m.write_u64(0x1000 + 511 * 8, 0x3000 | 3)
        m.write_u64(0x3000 + 510 * 8, 0 | 0x83)
        write_gate(m, IDT, 14, HANDLER)
        write_gate(m, IDT, 13, KERNEL + 0x10_0200)
        yield m


@pytest.fixture
def vcpu():
    v = FakeVcpu()
    s = v.sregs
    s.cr0, s.cr3, s.cr4, s.efer = 0x8001_0033, 0x1000, 0x20, 0xD01  # long mode, EFER.SCE set
    s.idt.base, s.idt.limit = KERNEL + IDT, 256 * 16 - 1
    s.cr2 = 0x1234
    return v


def at_handler(mem, vcpu, error, rip, cs, rflags, rsp, ss, cr2):
    """Put the vCPU where the hardware leaves it on #PF delivery: at the handler, frame at RSP, CPL 0."""
    mem.write(KSTACK - 48, struct.pack("<6Q", error, rip, cs, rflags, rsp, ss))
    vcpu.regs.rsp, vcpu.regs.rip, vcpu.regs.rflags = KERNEL + KSTACK - 48, HANDLER, 0x2
    vcpu.sregs.cs.selector, vcpu.sregs.cs.dpl, vcpu.sregs.cs.l = 0x10, 0, 1
    vcpu.sregs.ss.selector, vcpu.sregs.ss.dpl = 0, 0
    vcpu.sregs.cr2 = cr2
    return Debug(exception=1, pc=HANDLER, dr6=0xFFFF0FF1, dr7=0x401)


def test_poll_arms_execute_breakpoint_on_idt_vector_14_handler(mem, vcpu):
    SyscallRepair(mem).poll(vcpu)
    [(control, dr)] = vcpu.debug
    assert control == ARMED and dr[0] == HANDLER
    assert dr[7] & 0x3 == 0x1 and dr[7] & 0xF_0000 == 0  # L0 enabled, R/W0 = execute, LEN0 = 1 byte


def test_poll_does_not_arm_before_syscall_is_enabled(mem, vcpu):
    r = SyscallRepair(mem)
    vcpu.sregs.efer &= ~1  # SCE clear
    r.poll(vcpu)
    vcpu.sregs.efer |= 1
    vcpu.msrs[MSR_LSTAR] = 0
    r.poll(vcpu)
    assert vcpu.debug == []


def test_poll_does_not_arm_on_absent_gate_or_short_idt(mem, vcpu):
    r = SyscallRepair(mem)
    write_gate(mem, IDT, 14, HANDLER, present=False)
    r.poll(vcpu)
    write_gate(mem, IDT, 14, HANDLER)
    vcpu.sregs.idt.limit = 14 * 16 + 7
    r.poll(vcpu)
    assert vcpu.debug == []


def test_poll_does_not_rearm_when_nothing_changed(mem, vcpu):
    r = SyscallRepair(mem)
    r.poll(vcpu)
    r.poll(vcpu)
    assert len(vcpu.debug) == 1


def test_poll_rearms_when_the_kernel_switches_idt(mem, vcpu):
    r = SyscallRepair(mem)
    r.poll(vcpu)
    write_gate(mem, IDT2, 14, HANDLER2)
    vcpu.sregs.idt.base = KERNEL + IDT2
    r.poll(vcpu)
    assert [(c, d[0]) for c, d in vcpu.debug] == [(ARMED, HANDLER), (ARMED, HANDLER2)]


def test_poll_rearms_when_lstar_changes(mem, vcpu):
    r = SyscallRepair(mem)
    r.poll(vcpu)
    vcpu.msrs[MSR_LSTAR] = LSTAR + 0x100
    r.poll(vcpu)
    assert len(vcpu.debug) == 2 and vcpu.debug[1][0] == ARMED


def test_poll_disarms_when_syscall_is_turned_off(mem, vcpu):
    r = SyscallRepair(mem)
    r.poll(vcpu)
    vcpu.sregs.efer &= ~1
    r.poll(vcpu)
    assert vcpu.debug[-1] == (0, [0] * 8)


def test_syscall_shaped_fault_is_completed_as_syscall_entry(mem, vcpu):
    r = SyscallRepair(mem)
    r.poll(vcpu)  # sees CR2 = 0x1234
    ex = at_handler(mem, vcpu, error=0x15, rip=LSTAR, cs=0x33, rflags=0x246, rsp=0x7FFD_1000, ss=0x2B, cr2=LSTAR)
    vcpu.regs.rcx, vcpu.regs.r11 = 0x40_1234, 0x246
    assert r.on_debug(vcpu, ex) is True
    g, s = vcpu.regs, vcpu.sregs
    assert (g.rip, g.rsp, g.rflags) == (LSTAR, 0x7FFD_1000, 0x46)
    assert (g.rcx, g.r11) == (0x40_1234, 0x246)  # SYSCALL's own saves stay
    assert (s.cs.selector, s.cs.dpl, s.cs.l, s.cs.db, s.cs.type, s.cs.s, s.cs.present) == (0x10, 0, 1, 0, 11, 1, 1)
    assert (s.cs.base, s.cs.limit, s.cs.g) == (0, 0xFFFF_FFFF, 1)
    assert (s.ss.selector, s.ss.dpl, s.ss.db, s.ss.type, s.ss.s, s.ss.present) == (0x18, 0, 1, 3, 1, 1)
    assert s.cr2 == 0x1234
    assert (r.repaired, r.debug_exits, r.faults_passed) == (1, 1, 0)
    assert len(vcpu.debug) == 1  # the breakpoint stays armed: execution resumes at LSTAR, not at the handler


def test_syscall_rflags_come_from_r11_when_frame_differs(mem, vcpu):
    r = SyscallRepair(mem)
    r.poll(vcpu)
    ex = at_handler(mem, vcpu, error=0x15, rip=LSTAR, cs=0x33, rflags=0x2, rsp=0x7FFD_1000, ss=0x2B, cr2=LSTAR)
    vcpu.regs.r11 = 0x1_0283  # RF|IF|SF|CF as SYSCALL saved them
    r.on_debug(vcpu, ex)
    assert vcpu.regs.rflags == 0x83  # IF masked by SFMASK, RF cleared, bit 1 set


def test_ordinary_fault_single_steps_then_rearms(mem, vcpu):
    r = SyscallRepair(mem)
    r.poll(vcpu)
    ex = at_handler(mem, vcpu, error=0x6, rip=0x40_1000, cs=0x33, rflags=0x246, rsp=0x7FFD_1000, ss=0x2B,
                    cr2=0x7FFD_0FF8)
    before = bytes(vcpu.regs)
    assert r.on_debug(vcpu, ex) is True
    assert bytes(vcpu.regs) == before  # the guest's handler runs on the untouched frame
    assert vcpu.debug[-1] == (STEP, [0] * 8)
    r.poll(vcpu)  # polling mid-step must not re-arm over the single step
    assert vcpu.debug[-1][0] == STEP
    assert r.on_debug(vcpu, Debug(exception=1, pc=HANDLER + 4, dr6=0xFFFF4FF0, dr7=0x400)) is True
    assert vcpu.debug[-1] == (ARMED, [HANDLER, 0, 0, 0, 0, 0, 0, vcpu.debug[0][1][7]])
    assert (r.repaired, r.debug_exits, r.faults_passed) == (0, 2, 1)


def test_user_fetch_fault_elsewhere_than_lstar_is_ordinary(mem, vcpu):
    r = SyscallRepair(mem)
    r.poll(vcpu)
    ex = at_handler(mem, vcpu, error=0x14, rip=0x40_2000, cs=0x33, rflags=0x246, rsp=0x7FFD_1000, ss=0x2B,
                    cr2=0x40_2000)
    r.on_debug(vcpu, ex)
    assert r.faults_passed == 1 and r.repaired == 0 and vcpu.regs.rip == HANDLER


def test_kernel_mode_fault_at_lstar_is_ordinary(mem, vcpu):
    r = SyscallRepair(mem)
    r.poll(vcpu)
    ex = at_handler(mem, vcpu, error=0x11, rip=LSTAR, cs=0x10, rflags=0x46, rsp=KERNEL + 0x8000, ss=0x18, cr2=LSTAR)
    r.on_debug(vcpu, ex)
    assert r.faults_passed == 1 and r.repaired == 0


def test_cr2_after_an_ordinary_fault_is_restored_by_a_later_repair(mem, vcpu):
    r = SyscallRepair(mem)
    r.poll(vcpu)
    r.on_debug(vcpu, at_handler(mem, vcpu, 0x6, 0x40_1000, 0x33, 0x246, 0x7FFD_1000, 0x2B, cr2=0x7FFD_0FF8))
    r.on_debug(vcpu, Debug(exception=1, pc=HANDLER + 4, dr6=0x4000, dr7=0x400))
    vcpu.regs.r11 = 0x246
    r.on_debug(vcpu, at_handler(mem, vcpu, 0x15, LSTAR, 0x33, 0x246, 0x7FFD_1000, 0x2B, cr2=LSTAR))
    assert r.repaired == 1 and vcpu.sregs.cr2 == 0x7FFD_0FF8


def test_debug_exits_not_at_the_breakpoint_are_not_consumed(mem, vcpu):
    r = SyscallRepair(mem)
    assert r.on_debug(vcpu, Debug(exception=1, pc=HANDLER, dr6=1, dr7=0)) is False  # not armed yet
    r.poll(vcpu)
    assert r.on_debug(vcpu, Debug(exception=3, pc=KERNEL + 0x10_0500, dr6=0, dr7=0)) is False  # a #BP
    assert r.on_debug(vcpu, Debug(exception=1, pc=KERNEL + 0x10_0500, dr6=0x4000, dr7=0)) is False  # stray step
    assert r.debug_exits == 0 and len(vcpu.debug) == 1


def test_each_vcpu_has_its_own_breakpoint_state(mem, vcpu):
    r = SyscallRepair(mem)
    other = FakeVcpu(1)
    other.sregs = kvm_sregs.from_buffer_copy(vcpu.sregs)
    r.poll(vcpu)
    r.poll(other)
    r.on_debug(vcpu, at_handler(mem, vcpu, 0x6, 0x40_1000, 0x33, 0x246, 0x7FFD_1000, 0x2B, cr2=0x7FFD_0FF8))
    assert vcpu.debug[-1][0] == STEP and other.debug == [(ARMED, vcpu.debug[0][1])]
    assert r.on_debug(other, Debug(exception=1, pc=HANDLER + 4, dr6=0x4000, dr7=0x400)) is False
