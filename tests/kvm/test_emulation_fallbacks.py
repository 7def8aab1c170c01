"""Emulator and SyscallRepair on a real vCPU: hand-assembled long-mode guests with kernel and user pages."""

from __future__ import annotations

import signal
import struct
import threading

import pytest

from popek.emulate import Emulator
from popek.kvm.system import Debug, Hlt, InternalError, IoOut, detect_flavor
from popek.memory import GuestMemory
from popek.mmu import read_virt
from popek.repair import MSR_LSTAR, MSR_STAR, MSR_SYSCALL_MASK, SyscallRepair
from popek.vcpu import KICK_SIGNAL

pytestmark = pytest.mark.kvm

PF_HANDLER, LSTAR, OTHER_HANDLER, USER_CODE, USER_STACK = 0x8000, 0x8100, 0x8200, 0x10000, 0x21000
KSTACK_TOP, TSS, GDT, IDT, PML4 = 0xA000, 0x6000, 0x5000, 0x7000, 0x1000
UNMAPPED = 0x30000
STAR = 0x0020_0010_0000_0000  # Linux layout: SYSCALL CS 0x10 / SS 0x18, SYSRET CS 0x33 / SS 0x2B
SFMASK = 0x47700
USER_RFLAGS = 0x202  # IF set: PVM runs user mode with IF=1 whatever the VMM asks

PF_CODE = "58 e7 12 48 83 04 24 07 48 cf"  # pop rax; out 0x12, eax; add qword [rsp], 7; iretq
ENTRY_CODE = "8c c8 e7 10 48 0f 07"  # mov eax, cs; out 0x10, eax; sysretq
OTHER_CODE = "8c c8 e7 13 f4 eb fd"  # mov eax, cs; out 0x13, eax; hlt; jmp $-1
USER_PROGRAM = ("8b 04 25 00 00 03 00"  # mov eax, [UNMAPPED]: an ordinary #PF, the handler skips it
                "0f 05"  # syscall
                "8b 04 25 00 00 03 00"  # mov eax, [UNMAPPED] again, now after sysretq
                "eb fe")  # jmp $
SYSCALL_RETURN = USER_CODE + 9


def _seg(s, selector, seg_type, dpl, l, db):
    s.selector, s.base, s.limit, s.type, s.present, s.dpl = selector, 0, 0xFFFF_FFFF, seg_type, 1, dpl
    s.db, s.s, s.l, s.g, s.avl, s.unusable = db, 1, l, 1, 0, 0


def make_guest(kvm, kernel_code: bytes | None = None):
    """A VM with 1 MiB RAM, 4 KiB identity pages (kernel 0x1000-0x9FFF, user 0x10000 and 0x20000), GDT/TSS/IDT and
    one vCPU in long mode: at CPL 3 at USER_CODE, or at CPL 0 at 0x8000 running ``kernel_code``."""
    mem = GuestMemory([(0, 0x10_0000)])
    mem.write_u64(PML4, 0x2000 | 7)
    mem.write_u64(0x2000, 0x3000 | 7)
    mem.write_u64(0x3000, 0x4000 | 7)
    for page in range(1, 0xA):
        mem.write_u64(0x4000 + page * 8, page << 12 | 3)
    for page in (0x10, 0x20):
        mem.write_u64(0x4000 + page * 8, page << 12 | 7)
    gdt = [0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00CFFB000000FFFF, 0x00CFF3000000FFFF,
           0x00AFFB000000FFFF, 0x67 | TSS << 16 | 0x89 << 40, 0]
    mem.write(GDT, struct.pack(f"<{len(gdt)}Q", *gdt))
    mem.write_u64(TSS + 4, KSTACK_TOP)
    mem.write_u16(TSS + 0x66, 0x68)
    for vec in range(32):
        target = PF_HANDLER if vec == 14 else OTHER_HANDLER
        mem.write(IDT + vec * 16, struct.pack("<QQ", target | 0x10 << 16 | 0x8E << 40, 0))
    mem.write(PF_HANDLER, bytes.fromhex(PF_CODE))
    mem.write(LSTAR, bytes.fromhex(ENTRY_CODE))
    mem.write(OTHER_HANDLER, bytes.fromhex(OTHER_CODE))
    mem.write(USER_CODE, bytes.fromhex(USER_PROGRAM))
    if kernel_code is not None:
        mem.write(PF_HANDLER, kernel_code)
    vm = kvm.create_vm()
    vm.set_user_memory_region(0, 0, mem.regions[0].size, mem.regions[0].host_address)
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid2(kvm.supported_cpuid())
    s = vcpu.get_sregs()
    user = kernel_code is None
    _seg(s.cs, 0x33 if user else 0x10, 11, 3 if user else 0, 1, 0)
    for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
        _seg(seg, 0x2B if user else 0x18, 3, 3 if user else 0, 0, 1)
    s.tr.selector, s.tr.base, s.tr.limit, s.tr.type, s.tr.present, s.tr.s, s.tr.unusable = 0x38, TSS, 0x67, 11, 1, 0, 0
    s.gdt.base, s.gdt.limit = GDT, len(gdt) * 8 - 1
    s.idt.base, s.idt.limit = IDT, 32 * 16 - 1
    # CR0 PG WP NE ET MP PE; CR4 OSXMMEXCPT OSFXSR PAE; EFER NXE LMA LME SCE
    s.cr0, s.cr3, s.cr4, s.efer = 0x8005_0033, PML4, 0x620, 0xD01
    vcpu.set_sregs(s)
    r = vcpu.get_regs()
    r.rip, r.rsp, r.rflags = (USER_CODE, USER_STACK, USER_RFLAGS) if user else (PF_HANDLER, KSTACK_TOP, 0x2)
    vcpu.set_regs(r)
    vcpu.set_msrs({MSR_STAR: STAR, MSR_LSTAR: LSTAR, MSR_SYSCALL_MASK: SFMASK})
    return mem, vm, vcpu


@pytest.fixture
def guest(kvm):
    made = []

    def make(kernel_code=None):
        made.append(make_guest(kvm, kernel_code))
        return made[-1]

    yield make
    for mem, vm, vcpu in made:
        vcpu.close()
        vm.close()
        mem.close()


def run(vcpu, on_exit, seconds=20.0, max_exits=100):
    """Run until ``on_exit(exit, regs, sregs)`` returns True; a watchdog interrupts a guest that stops exiting."""
    main = threading.get_ident()
    done = threading.Event()

    def watchdog():
        if not done.wait(seconds):
            vcpu.immediate_exit = True
            signal.pthread_kill(main, KICK_SIGNAL)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        for _ in range(max_exits):
            ex = vcpu.run()
            if on_exit(ex, vcpu.get_regs(), vcpu.get_sregs()):
                return
        pytest.fail(f"guest did not finish within {max_exits} exits")
    finally:
        done.set()


def test_cpl0_instructions_the_emulator_covers_give_architectural_results(guest):
    code = bytes.fromhex(
        "bb ff 00 00 00"  # mov ebx, 0xff
        "f3 0f b8 c3"  # popcnt eax, ebx
        "e7 10"  # out 0x10, eax
        "0f ae 14 25 00 90 00 00"  # ldmxcsr [0x9000]
        "0f ae 1c 25 04 90 00 00"  # stmxcsr [0x9004]
        "8b 04 25 04 90 00 00"  # mov eax, [0x9004]
        "e7 11"  # out 0x11, eax
        "0f 01 cb 9c 58 e7 12"  # stac; pushf; pop rax; out 0x12, eax
        "48 c7 c7 00 91 00 00 31 c0 31 d2 bb 01 00 00 00 b9 02 00 00 00"  # rdi=0x9100 rax=rdx=0 rbx=1 rcx=2
        "f0 48 0f c7 0f"  # lock cmpxchg16b [rdi]
        "48 8b 47 08 e7 13"  # mov rax, [rdi+8]; out 0x13, eax
        "f4")  # hlt
    mem, vm, vcpu = guest(code)
    mem.write_u32(0x9000, 0x9FC0)
    emu, outs = Emulator(mem), {}

    def on_exit(ex, regs, sregs):
        if isinstance(ex, IoOut):
            outs[ex.port] = int.from_bytes(ex.data, "little")
            return False
        if isinstance(ex, InternalError):
            return not emu.handle(vcpu, ex)
        assert isinstance(ex, Hlt), f"unexpected exit {ex} at rip {regs.rip:#x}"
        return True

    run(vcpu, on_exit)
    assert outs[0x10] == 8 and outs[0x11] == 0x9FC0 and outs[0x12] & (1 << 18) and outs[0x13] == 2
    assert mem.read_u64(0x9100) == 1
    if detect_flavor().emulating_cpl0:
        assert {"popcnt", "ldmxcsr", "stmxcsr", "stac", "cmpxchg16b"} <= set(emu.counts)


def test_unrepaired_syscall_on_emulating_kvm_faults_at_lstar_with_rcx_r11_set(guest):
    if not detect_flavor().emulating_cpl0:
        pytest.skip("SYSCALL switches to CPL 0 on hardware KVM")
    mem, vm, vcpu = guest()
    seen = []

    def on_exit(ex, regs, sregs):
        assert isinstance(ex, IoOut) and ex.port == 0x12, f"unexpected exit {ex} at rip {regs.rip:#x}"
        frame = struct.unpack("<5Q", read_virt(mem, sregs, regs.rsp, 40))  # after the handler's pop of the error code
        seen.append((int.from_bytes(ex.data, "little"), frame, regs.rcx, regs.r11, sregs.cr2))
        return len(seen) == 2

    run(vcpu, on_exit)
    error, (rip, cs, rflags, rsp, ss), rcx, r11, cr2 = seen[1]
    assert (error, rip, cs, rsp, ss, cr2) == (0x15, LSTAR, 0x33, USER_STACK, 0x2B, LSTAR)
    assert rcx == SYSCALL_RETURN and r11 == USER_RFLAGS  # SYSCALL's saves survive the #PF
    assert rflags & ~(1 << 16) == USER_RFLAGS & ~SFMASK  # the frame holds the masked RFLAGS (plus RF)


def test_repaired_syscall_enters_at_cpl0_on_user_stack_and_sysret_returns_to_user(guest):
    mem, vm, vcpu = guest()
    repair, events = SyscallRepair(mem), []

    def on_exit(ex, regs, sregs):
        if isinstance(ex, Debug):
            assert repair.on_debug(vcpu, ex), f"debug exit {ex} not the repair's"
        elif isinstance(ex, IoOut) and ex.port == 0x10:
            events.append(("entry", int.from_bytes(ex.data, "little"), regs.rsp, regs.rflags, regs.rcx, regs.r11))
        elif isinstance(ex, IoOut) and ex.port == 0x12:
            frame = struct.unpack("<5Q", read_virt(mem, sregs, regs.rsp, 40))
            events.append(("fault", int.from_bytes(ex.data, "little"), frame[0], frame[1]))
        else:
            pytest.fail(f"unexpected exit {ex} at rip {regs.rip:#x}")
        repair.poll(vcpu)
        return len(events) == 3

    repair.poll(vcpu)
    run(vcpu, on_exit)
    assert events[0] == ("fault", 4, USER_CODE, 0x33)
    assert events[1] == ("entry", 0x10, USER_STACK, USER_RFLAGS & ~SFMASK, SYSCALL_RETURN, USER_RFLAGS)
    assert events[2] == ("fault", 4, SYSCALL_RETURN, 0x33)  # back in user mode after sysretq
    if detect_flavor().emulating_cpl0:
        assert (repair.repaired, repair.faults_passed, repair.debug_exits) == (1, 2, 5)
    else:
        assert repair.repaired == 0
