"""VMM-side emulation of the instructions a software KVM fails to emulate (KVM_EXIT_INTERNAL_ERROR, suberror 1)."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

from iced_x86 import Decoder, DecoderError, Formatter, FormatterSyntax, Instruction, Mnemonic, OpKind, Register, \
    RegisterExt

from popek.kvm.abi import KVM_INTERNAL_ERROR_EMULATION
from popek.memory import PAGE_SIZE, GuestMemory
from popek.mmu import CR0_PE, EFER_LMA, NonCanonicalAddress, PageFault, ranges, read_virt, write_virt

# RFLAGS bits (Intel SDM Vol. 1 §3.4.3).
RFLAGS_CF, RFLAGS_PF, RFLAGS_AF, RFLAGS_ZF, RFLAGS_SF = 1 << 0, 1 << 2, 1 << 4, 1 << 6, 1 << 7
RFLAGS_OF, RFLAGS_RF, RFLAGS_AC = 1 << 11, 1 << 16, 1 << 18
_CR0_MP, _CR0_EM, _CR0_TS = 1 << 1, 1 << 2, 1 << 3
_CR4_OSFXSR = 1 << 9

# Exception vectors (Intel SDM Vol. 3A §6.3.1, Table 6-1).
VEC_BP, VEC_UD, VEC_NM, VEC_SS, VEC_GP, VEC_PF = 3, 6, 7, 12, 13, 14

# MXCSR lives in the legacy region of the KVM_GET_XSAVE/KVM_SET_XSAVE area (kvm_xsave.region, u32 units): MXCSR at
# byte 24, MXCSR_MASK at byte 28, XSTATE_BV at byte 512 (SDM Vol. 1 §10.5.1 Table 10-2, §13.4.2). Not KVM_GET_FPU /
# KVM_SET_FPU: KVM does not copy kvm_fpu.mxcsr either way (arch/x86/kvm/x86.c; measured on kvm_pvm: reads 0, writes
# are dropped), while KVM_SET_XSAVE with XSTATE_BV.SSE set did change the MXCSR the guest's own stmxcsr stores.
_XSAVE_MXCSR, _XSAVE_MXCSR_MASK, _XSAVE_XSTATE_BV = 24 // 4, 28 // 4, 512 // 4
_XFEATURE_SSE = 1 << 1
#: MXCSR_MASK to assume when the saved one is 0 (SDM Vol. 1 §11.6.6).
MXCSR_MASK_DEFAULT = 0xFFBF

_GPR = {getattr(Register, n.upper()): n for n in
        "rax rcx rdx rbx rsp rbp rsi rdi r8 r9 r10 r11 r12 r13 r14 r15".split()}
_HIGH8 = {Register.AH, Register.CH, Register.DH, Register.BH}
_SEG = {Register.ES: "es", Register.CS: "cs", Register.SS: "ss", Register.DS: "ds", Register.FS: "fs",
        Register.GS: "gs"}
_MNEMONIC = {getattr(Mnemonic, n): n.lower() for n in dir(Mnemonic) if n.isupper()}
_NO_XSAVE = {getattr(Mnemonic, n) for n in dir(Mnemonic)
             if n.isupper() and (n.startswith(("XSAVE", "XRSTOR")) or n in ("XSETBV", "XGETBV"))}

#: Serialises the emulated read-compare-write of CMPXCHG8B/16B between the vCPU threads of this process. It does
#: NOT exclude the other vCPUs' native (or in-kernel emulated) accesses to the same memory: those can interleave.
_ATOMIC_LOCK = threading.Lock()


class EmulationFailure(RuntimeError):
    """The guest executed an instruction neither KVM nor this emulator can emulate; the message says which, where."""


class _Fault(Exception):
    """An exception the instruction raises in the guest (fault semantics: registers and RIP stay unchanged)."""

    def __init__(self, vector: int, error_code: int | None = None):
        super().__init__(vector, error_code)
        self.vector, self.error_code = vector, error_code


@dataclass
class _Ctx:
    vcpu: object
    regs: object
    sregs: object
    instr: Instruction
    bitness: int
    cpl: int


def _reg(regs, r: int) -> int:
    """Value of a general-purpose register (any width) from ``kvm_regs``."""
    v = getattr(regs, _GPR[RegisterExt.full_register(r)])
    if r in _HIGH8:
        return (v >> 8) & 0xFF
    return v & ((1 << 8 * RegisterExt.size(r)) - 1)


def _set_reg(regs, r: int, value: int) -> None:
    """Write a 16/32/64-bit register as the CPU does: 32-bit writes zero-extend, 16-bit writes merge."""
    name, size = _GPR[RegisterExt.full_register(r)], RegisterExt.size(r)
    if size == 2:
        setattr(regs, name, (getattr(regs, name) & ~0xFFFF) | (value & 0xFFFF))
    else:
        setattr(regs, name, value & ((1 << 8 * size) - 1))


class Emulator:
    """Emulates, on the vCPU's registers and guest memory, the few instructions a software KVM gives up on.

    Handles int3, clac/stac, fwait, popcnt, cmpxchg8b/16b, (v)ldmxcsr/(v)stmxcsr (list and reasons:
    /work/shared/reference/environment.md "What the emulator cannot do"). Semantics follow the Intel SDM Vol. 2
    instruction pages; guest exceptions are injected with ``vcpu.inject_exception`` (faults leave RIP unchanged,
    #PF also sets CR2). Not modelled: segment limit checks outside 64-bit mode, SMAP, single-step (#DB after an
    emulated instruction when RFLAGS.TF is set), #MF from pending x87 exceptions at fwait.

    :param mem: the VM's guest memory
    :ivar counts: instructions emulated so far, by lower-case iced mnemonic name (``"cmpxchg16b"``, ``"wait"``)
    """

    def __init__(self, mem: GuestMemory):
        self.mem = mem
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._handlers = {
            Mnemonic.INT3: self._int3, Mnemonic.CLAC: self._clac, Mnemonic.STAC: self._stac,
            Mnemonic.WAIT: self._wait, Mnemonic.POPCNT: self._popcnt,
            Mnemonic.CMPXCHG8B: self._cmpxchg, Mnemonic.CMPXCHG16B: self._cmpxchg,
            Mnemonic.LDMXCSR: self._ldmxcsr, Mnemonic.VLDMXCSR: self._ldmxcsr,
            Mnemonic.STMXCSR: self._stmxcsr, Mnemonic.VSTMXCSR: self._stmxcsr,
        }

    def handle(self, vcpu, exit) -> bool:
        """Emulate the instruction behind a ``KVM_EXIT_INTERNAL_ERROR`` exit, leaving the vCPU ready to resume.

        :param vcpu: a ``popek.kvm.system.VcpuFd`` (or anything with its get/set_regs, get/set_sregs,
            get/set_xsave and inject_exception)
        :param exit: an ``InternalError(suberror, data, insn_bytes)`` exit; ``insn_bytes`` None means the bytes are
            fetched from guest memory at CS.base+RIP through the guest's page tables
        :returns: False if the suberror is not ``KVM_INTERNAL_ERROR_EMULATION`` (the caller reports it); True once
            the instruction is emulated or the exception it raises (e.g. #PF on its memory operand) is injected
        :raises EmulationFailure: for an instruction this emulator does not handle (naming it, its bytes, RIP, CPL)
        """
        if exit.suberror != KVM_INTERNAL_ERROR_EMULATION:
            return False
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        bitness = 64 if sregs.efer & EFER_LMA and sregs.cs.l else 32 if sregs.cs.db else 16
        cpl = sregs.ss.dpl if sregs.cr0 & CR0_PE else 0
        rip = regs.rip & ((1 << bitness) - 1)
        try:
            instr, code = self._decode(exit.insn_bytes, sregs, bitness, rip, cpl)
        except PageFault as pf:  # the instruction fetch itself faulted
            self._inject_pf(vcpu, sregs, pf)
            return True
        if instr.is_invalid:
            raise EmulationFailure(f"guest vCPU {vcpu.index} at rip {rip:#x} (CPL {cpl}): cannot decode "
                                   f"instruction bytes ({code.hex(' ')})")
        name = _MNEMONIC.get(instr.mnemonic, "?")
        fn = self._handlers.get(instr.mnemonic)
        if fn is None:
            hint = "; XSAVE state is not emulated: boot the guest with 'noxsave'" if instr.mnemonic in _NO_XSAVE else ""
            raise EmulationFailure(f"guest vCPU {vcpu.index} at rip {rip:#x} (CPL {cpl}): cannot emulate "
                                   f"'{_format(instr)}' ({code[:instr.len].hex(' ')}){hint}")
        ctx = _Ctx(vcpu, regs, sregs, instr, bitness, cpl)
        try:
            trap = fn(ctx)
        except PageFault as pf:
            self._inject_pf(vcpu, sregs, pf)
        except NonCanonicalAddress:
            vcpu.inject_exception(VEC_SS if instr.memory_segment == Register.SS else VEC_GP, 0)
        except _Fault as f:
            vcpu.inject_exception(f.vector, f.error_code)
        else:
            regs.rip = instr.next_ip & ((1 << bitness) - 1)
            regs.rflags &= ~RFLAGS_RF  # RF is cleared when an instruction completes (SDM Vol. 3A §18.3.1.1)
            vcpu.set_regs(regs)
            if trap is not None:
                vcpu.inject_exception(*trap)
        with self._lock:
            self.counts[name] += 1
        return True

    # --- decoding and operands -------------------------------------------------------------------------------

    def _decode(self, insn_bytes: bytes | None, sregs, bitness: int, rip: int, cpl: int) -> tuple[Instruction, bytes]:
        """Decode from the exit's bytes, or from guest memory when they are absent or too short."""
        if insn_bytes:
            d = Decoder(bitness, insn_bytes, ip=rip)
            instr = d.decode()
            if not (instr.is_invalid and d.last_error == DecoderError.NO_MORE_BYTES):
                return instr, bytes(insn_bytes)
        linear = (rip + (sregs.cs.base if bitness != 64 else 0)) & ((1 << (64 if bitness == 64 else 32)) - 1)
        fault = None
        try:
            code = read_virt(self.mem, sregs, linear, 15, user=cpl == 3, fetch=True)
        except PageFault as pf:  # the instruction may end before the unmapped page
            first = PAGE_SIZE - (linear & (PAGE_SIZE - 1))
            if first >= 15:
                raise
            code, fault = read_virt(self.mem, sregs, linear, first, user=cpl == 3, fetch=True), pf
        d = Decoder(bitness, code, ip=rip)
        instr = d.decode()
        if fault is not None and instr.is_invalid and d.last_error == DecoderError.NO_MORE_BYTES:
            raise fault
        return instr, code

    @staticmethod
    def _address(ctx: _Ctx) -> int:
        """Linear address of the memory operand: segment base + base + index*scale + disp (SDM Vol. 1 §3.7.5)."""
        i, regs = ctx.instr, ctx.regs
        base, index = i.memory_base, i.memory_index
        if base in (Register.RIP, Register.EIP):
            ea, size = i.memory_displacement, RegisterExt.size(base)  # iced already resolved next_ip + disp
        else:
            ea = i.memory_displacement
            if base != Register.NONE:
                ea += _reg(regs, base)
            if index != Register.NONE:
                ea += _reg(regs, index) * i.memory_index_scale
            reg = base if base != Register.NONE else index
            size = RegisterExt.size(reg) if reg != Register.NONE else (i.memory_displ_size or ctx.bitness // 8)
        ea &= (1 << 8 * min(size, 8)) - 1
        seg = _SEG[i.memory_segment]
        if ctx.bitness == 64:
            return (ea + (getattr(ctx.sregs, seg).base if seg in ("fs", "gs") else 0)) & ((1 << 64) - 1)
        return (ea + getattr(ctx.sregs, seg).base) & 0xFFFF_FFFF

    def _read(self, ctx: _Ctx, n: int) -> bytes:
        return read_virt(self.mem, ctx.sregs, self._address(ctx), n, user=ctx.cpl == 3, set_accessed=True)

    def _write(self, ctx: _Ctx, data: bytes) -> None:
        write_virt(self.mem, ctx.sregs, self._address(ctx), data, user=ctx.cpl == 3, set_accessed=True)

    @staticmethod
    def _inject_pf(vcpu, sregs, pf: PageFault) -> None:
        sregs.cr2 = pf.vaddr
        vcpu.set_sregs(sregs)
        vcpu.inject_exception(VEC_PF, pf.error_code)

    # --- instructions: each returns None or a trap (vector, error_code) to inject after RIP advanced ---------

    def _int3(self, ctx: _Ctx):
        """INT3: #BP is a trap, so it is injected with RIP already past the int3 (SDM Vol. 2A INT n/INTO/INT3/INT1)."""
        return (VEC_BP, None)

    def _clac(self, ctx: _Ctx):
        if ctx.cpl:
            raise _Fault(VEC_UD)
        ctx.regs.rflags &= ~RFLAGS_AC

    def _stac(self, ctx: _Ctx):
        if ctx.cpl:
            raise _Fault(VEC_UD)
        ctx.regs.rflags |= RFLAGS_AC

    def _wait(self, ctx: _Ctx):
        if ctx.sregs.cr0 & (_CR0_MP | _CR0_TS) == _CR0_MP | _CR0_TS:
            raise _Fault(VEC_NM)

    def _popcnt(self, ctx: _Ctx):
        """POPCNT r, r/m: ZF = (source == 0); CF, OF, SF, AF, PF cleared (SDM Vol. 2B POPCNT)."""
        i = ctx.instr
        dst = i.op0_register
        size = RegisterExt.size(dst)
        src = _reg(ctx.regs, i.op1_register) if i.op1_kind == OpKind.REGISTER else \
            int.from_bytes(self._read(ctx, size), "little")
        _set_reg(ctx.regs, dst, src.bit_count())
        flags = ctx.regs.rflags & ~(RFLAGS_CF | RFLAGS_PF | RFLAGS_AF | RFLAGS_ZF | RFLAGS_SF | RFLAGS_OF)
        ctx.regs.rflags = flags | (RFLAGS_ZF if src == 0 else 0)

    def _cmpxchg(self, ctx: _Ctx):
        """CMPXCHG8B/16B m: compare EDX:EAX / RDX:RAX with memory; equal → store ECX:EBX / RCX:RBX and ZF=1, else
        load memory into EDX:EAX / RDX:RAX and ZF=0 (SDM Vol. 2A CMPXCHG8B/CMPXCHG16B). Always a write access."""
        regs = ctx.regs
        n = 16 if ctx.instr.mnemonic == Mnemonic.CMPXCHG16B else 8
        half, mask = n // 2, (1 << 4 * n) - 1
        addr = self._address(ctx)
        if n == 16 and addr % 16:
            raise _Fault(VEC_GP, 0)  # cmpxchg16b needs a 16-byte aligned operand
        with _ATOMIC_LOCK:
            pieces = ranges(self.mem, ctx.sregs, addr, n, write=True, user=ctx.cpl == 3, set_accessed=True)
            old = b"".join(self.mem.read(gpa, size) for gpa, size in pieces)
            lo, hi = int.from_bytes(old[:half], "little"), int.from_bytes(old[half:], "little")
            if lo == regs.rax & mask and hi == regs.rdx & mask:
                new = (regs.rbx & mask).to_bytes(half, "little") + (regs.rcx & mask).to_bytes(half, "little")
                off = 0
                for gpa, size in pieces:
                    self.mem.write(gpa, new[off:off + size])
                    off += size
                regs.rflags |= RFLAGS_ZF
            else:
                regs.rax, regs.rdx = lo, hi
                regs.rflags &= ~RFLAGS_ZF

    def _sse_state_checks(self, ctx: _Ctx) -> None:
        """#UD/#NM conditions of LDMXCSR/STMXCSR (SDM Vol. 2A LDMXCSR, "Protected Mode Exceptions")."""
        cr0 = ctx.sregs.cr0
        legacy = ctx.instr.mnemonic in (Mnemonic.LDMXCSR, Mnemonic.STMXCSR)
        if legacy and (cr0 & _CR0_EM or not ctx.sregs.cr4 & _CR4_OSFXSR):
            raise _Fault(VEC_UD)
        if cr0 & _CR0_TS:
            raise _Fault(VEC_NM)

    def _ldmxcsr(self, ctx: _Ctx):
        """LDMXCSR m32: MXCSR ← m32 through KVM_GET_XSAVE/KVM_SET_XSAVE; #GP(0) if a bit outside MXCSR_MASK is set.

        XSTATE_BV.SSE is set on the way back, else KVM_SET_XSAVE treats the SSE state (MXCSR with it) as init.
        """
        self._sse_state_checks(ctx)
        value = int.from_bytes(self._read(ctx, 4), "little")
        xsave = ctx.vcpu.get_xsave()
        if value & ~(xsave.region[_XSAVE_MXCSR_MASK] or MXCSR_MASK_DEFAULT):
            raise _Fault(VEC_GP, 0)
        xsave.region[_XSAVE_MXCSR] = value
        xsave.region[_XSAVE_XSTATE_BV] |= _XFEATURE_SSE
        ctx.vcpu.set_xsave(xsave)

    def _stmxcsr(self, ctx: _Ctx):
        """STMXCSR m32: m32 ← MXCSR (from KVM_GET_XSAVE)."""
        self._sse_state_checks(ctx)
        self._write(ctx, ctx.vcpu.get_xsave().region[_XSAVE_MXCSR].to_bytes(4, "little"))


def _format(instr: Instruction) -> str:
    """Intel-syntax text of an instruction with 0x-prefixed lower-case hex, e.g. ``xrstor64 [rcx]``."""
    f = Formatter(FormatterSyntax.INTEL)
    f.hex_prefix, f.hex_suffix, f.uppercase_hex = "0x", "", False
    return f.format(instr)
