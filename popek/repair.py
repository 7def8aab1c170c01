"""Repair of guest SYSCALL from CPL 3 on a KVM that lands at LSTAR without switching to CPL 0 (kvm_pvm)."""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass

from popek.kvm.abi import KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP
from popek.memory import GuestMemory, GuestMemoryError
from popek.mmu import EFER_LMA, PF_I, NonCanonicalAddress, PageFault, read_virt

# Architectural MSRs (Intel SDM Vol. 4 §2.1, Table 2-2).
MSR_STAR = 0xC000_0081
MSR_LSTAR = 0xC000_0082
MSR_SYSCALL_MASK = 0xC000_0084  # IA32_FMASK ("SFMASK")
EFER_SCE = 1 << 0

VEC_PF = 14
VEC_DB = 1
#: DR7 for an execute breakpoint in DR0: L0 enable, R/W0 = 00 (execute), LEN0 = 00, bit 10 reads as 1
#: (SDM Vol. 3B §18.2.4).
DR7_EXEC_BP0 = (1 << 0) | (1 << 10)
DR6_B0 = 1 << 0
DR6_BS = 1 << 14
_RFLAGS_FIXED1 = 1 << 1
_RFLAGS_RF = 1 << 16


@dataclass
class _VcpuState:
    handler: int | None = None  # #PF handler address the breakpoint is on (None: not armed)
    lstar: int = 0
    stepping: bool = False  # breakpoint lifted, single-stepping past the handler's first instruction
    cr2: int | None = None  # CR2 before the guest's latest #PF, if seen


class SyscallRepair:
    """Completes the SYSCALL entry this KVM leaves half done, using an execute breakpoint on the guest's #PF handler.

    On kvm_pvm a SYSCALL at CPL 3 jumps to LSTAR but keeps the user CS/SS, so the kernel's entry code page-faults
    (user instruction fetch from a supervisor page) and that #PF is delivered through the guest IDT at CPL 0.
    The breakpoint on the IDT vector-14 handler catches it: the frame is unwound and SYSCALL's architectural
    effects (Intel SDM Vol. 2B SYSCALL, "Operation") are applied by the VMM. Ordinary faults are let through by
    lifting the breakpoint for one single-stepped instruction (setting RF does not skip it on this KVM). Measured
    behaviour: /work/shared/reference/environment.md, "SYSCALL from guest user mode is broken". SYSRET needed no
    repair there. The caller enables this only on an emulating KVM; the class itself works with any vCPU.

    Uses from the vCPU: ``index get_regs set_regs get_sregs set_sregs get_msrs set_guest_debug``.

    :param mem: guest memory (the IDT and the exception frame are read through the guest's page tables)
    :ivar repaired: SYSCALLs completed
    :ivar debug_exits: debug exits this class consumed (breakpoint hits and single steps)
    :ivar faults_passed: ordinary page faults let through to the guest's handler
    """

    def __init__(self, mem: GuestMemory):
        self.mem = mem
        self.repaired = 0
        self.debug_exits = 0
        self.faults_passed = 0
        self._states: dict[int, _VcpuState] = {}
        self._lock = threading.Lock()

    def _state(self, vcpu) -> _VcpuState:
        with self._lock:
            return self._states.setdefault(vcpu.index, _VcpuState())

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def poll(self, vcpu) -> None:
        """Arm, re-arm or disarm the breakpoint to match the guest's current IDT and SYSCALL setup.

        Call on every exit and periodically (costs KVM_GET_SREGS, KVM_GET_MSRS and two guest reads). Arms once
        EFER.SCE and EFER.LMA are set, LSTAR is non-zero and the IDT's vector-14 gate is present; re-arms when the
        gate's handler (the kernel switches IDTs during boot) or LSTAR changes; disarms when SYSCALL is turned off.
        Does nothing while a single step is in flight.
        """
        st = self._state(vcpu)
        if st.stepping:
            return
        sregs = vcpu.get_sregs()
        if st.handler is None:
            st.cr2 = sregs.cr2  # once armed, every #PF passes through on_debug, which tracks CR2
        lstar = vcpu.get_msrs([MSR_LSTAR])[MSR_LSTAR] if sregs.efer & EFER_SCE and sregs.efer & EFER_LMA else 0
        handler = self._pf_handler(sregs) if lstar else None
        if handler is None:
            if st.handler is not None:
                vcpu.set_guest_debug(0, [0] * 8)
                st.handler = None
        elif handler != st.handler or lstar != st.lstar:
            st.lstar = lstar
            self._arm(vcpu, st, handler)

    def _pf_handler(self, sregs) -> int | None:
        """Offset of the IDT's #PF gate (64-bit 16-byte gate, SDM Vol. 3A §6.14.1), or None if absent/unreadable."""
        if sregs.idt.limit < VEC_PF * 16 + 15:
            return None
        try:
            lo, hi = struct.unpack("<QQ", read_virt(self.mem, sregs, sregs.idt.base + VEC_PF * 16, 16))
        except (PageFault, NonCanonicalAddress, GuestMemoryError):
            return None
        if not lo >> 47 & 1:  # P bit (byte 5 bit 7)
            return None
        return (lo & 0xFFFF) | ((lo >> 48) & 0xFFFF) << 16 | (hi & 0xFFFF_FFFF) << 32

    @staticmethod
    def _arm(vcpu, st: _VcpuState, handler: int) -> None:
        vcpu.set_guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP, [handler, 0, 0, 0, 0, 0, 0, DR7_EXEC_BP0])
        st.handler, st.stepping = handler, False

    def on_debug(self, vcpu, exit) -> bool:
        """Handle a ``Debug(exception, pc, dr6, dr7)`` exit (KVM_EXIT_DEBUG, kvm_debug_exit_arch).

        At the #PF handler breakpoint: a frame with CS RPL 3, RIP == LSTAR == CR2 and the instruction-fetch bit in
        the error code is a SYSCALL that did not switch; it is completed (see :meth:`_complete_syscall`). Any other
        fault is passed on: breakpoint lifted, one instruction single-stepped. At that single step's exit (DR6.BS)
        the breakpoint is re-armed.

        :returns: True if the exit was this class's and the vCPU can be resumed; False for debug exits it does
            not own (the caller handles or reports them)
        """
        st = self._state(vcpu)
        if st.stepping and exit.dr6 & DR6_BS:
            self._count("debug_exits")
            self._arm(vcpu, st, st.handler)
            return True
        if st.handler is None or st.stepping or exit.exception != VEC_DB or \
                not (exit.pc == st.handler or exit.dr6 & DR6_B0):
            return False
        self._count("debug_exits")
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        try:
            error, rip, cs, rflags, rsp, ss = struct.unpack("<6Q", read_virt(self.mem, sregs, regs.rsp, 48))
        except (PageFault, NonCanonicalAddress, GuestMemoryError):
            error = cs = 0  # unreadable frame: cannot be ours, let the guest handle it
        if cs & 3 == 3 and error & PF_I and rip == sregs.cr2:
            msrs = vcpu.get_msrs([MSR_STAR, MSR_LSTAR, MSR_SYSCALL_MASK])
            if rip == msrs[MSR_LSTAR]:
                self._complete_syscall(vcpu, st, regs, sregs, msrs, rsp)
                return True
        st.cr2 = sregs.cr2
        self._count("faults_passed")
        vcpu.set_guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP, [0] * 8)
        st.stepping = True
        return True

    def _complete_syscall(self, vcpu, st: _VcpuState, regs, sregs, msrs: dict[int, int], user_rsp: int) -> None:
        """Apply SYSCALL's effects per Intel SDM Vol. 2B SYSCALL "Operation" on top of the user-mode state.

        RCX (return RIP) and R11 (RFLAGS) were written by the half-done SYSCALL and the #PF does not touch them
        (measured on kvm_pvm, tests/kvm/test_emulation_fallbacks.py: at the handler RCX = the return RIP and
        R11 = the user RFLAGS, while the frame's RFLAGS is already masked by SFMASK and has RF set, as a fault
        frame does). RFLAGS = R11 & ~IA32_FMASK, RF cleared: R11 is what SYSCALL saved, so it is right whether or
        not a KVM masked the frame's copy. RSP = the frame's RSP (SYSCALL does not switch stacks; the kernel stack
        frame the #PF pushed is discarded). CR2 gets back its value from before the fault when known.
        """
        star, fmask = msrs[MSR_STAR], msrs[MSR_SYSCALL_MASK]
        regs.rip = msrs[MSR_LSTAR]
        regs.rsp = user_rsp
        regs.rflags = (regs.r11 & ~fmask & ~_RFLAGS_RF & 0xFFFF_FFFF_FFFF_FFFF) | _RFLAGS_FIXED1
        sel = (star >> 32) & 0xFFFF
        _flat(sregs.cs, sel & 0xFFFC, seg_type=11, l=1, db=0)  # execute/read, accessed; 64-bit code
        _flat(sregs.ss, (sel + 8) & 0xFFFF, seg_type=3, l=0, db=1)  # read/write, accessed
        if st.cr2 is not None:
            sregs.cr2 = st.cr2
        vcpu.set_sregs(sregs)
        vcpu.set_regs(regs)
        self._count("repaired")


def _flat(seg, selector: int, seg_type: int, l: int, db: int) -> None:
    """Load a flat DPL-0 segment as SYSCALL does: base 0, limit 4 GiB-1 (G=1), S=1, present."""
    seg.selector, seg.base, seg.limit, seg.type = selector, 0, 0xFFFF_FFFF, seg_type
    seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g, seg.avl, seg.unusable = 1, 0, db, 1, l, 1, 0, 0
