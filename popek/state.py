"""Save and restore of the KVM objects' state (vCPUs, in-kernel irqchip, PIT, kvmclock) as plain, checked records."""

# Sources: Documentation/virt/kvm/api.rst (each ioctl named below); the vCPU restore order is Firecracker's
# (vstate/vcpu/x86_64.rs): cpuid, mp_state, regs, sregs, xsave, xcrs, debugregs, lapic, msrs (TSC first,
# TSC_DEADLINE last), vcpu_events -- KVM_SET_REGS clears pending exceptions, so vcpu_events comes after it, and the
# LAPIC must be in TSC-deadline mode before MSR_IA32_TSC_DEADLINE is written.
#
# What this KVM lacks is detected, never skipped: every failed state ioctl raises StateUnsupported naming it.
# Measured on kvm_pvm (6.18): every ioctl used here works; KVM_CAP_NESTED_STATE is 0 (no nested virtualization,
# so there is no nested state to lose); KVM_CAP_XSAVE2 reports 4096 (the legacy KVM_GET_XSAVE area suffices);
# KVM_GET_CLOCK reports flags 0 (no KVM_CLOCK_REALTIME: the host clocksource is not the TSC).

from __future__ import annotations

import ctypes
import logging
import struct
from dataclasses import dataclass

from popek.kvm import abi
from popek.kvm.abi import (kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state,
                           kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs)
from popek.kvm.system import (KVM_CAP_GET_TSC_KHZ, KVM_CAP_NESTED_STATE, KVM_CLOCK_REALTIME,
                              NESTED_STATE_HEADER_SIZE, KvmError, VcpuFd, VmFd)

log = logging.getLogger(__name__)

XSAVE_LEGACY_SIZE = 4096

# MSRs (Intel SDM vol. 4, table 2-2).
MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
MSR_MTRRCAP = 0xFE
MSR_IA32_MCG_CAP = 0x179
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_MTRR_FIXED = (0x250, 0x258, 0x259) + tuple(range(0x268, 0x270))
MSR_MTRR_PHYS_BASE0 = 0x200
MSR_IA32_MC0_CTL = 0x400

#: Guest TSC frequencies closer than this (parts per million) count as equal: no KVM_SET_TSC_KHZ (Firecracker's
#: and QEMU's tolerance).
TSC_KHZ_TOLERANCE_PPM = 250

# struct kvm_nested_state header fields (arch/x86/include/uapi/asm/kvm.h).
_KVM_STATE_NESTED_FORMAT_VMX = 0
_KVM_STATE_NESTED_GUEST_MODE = 1
_KVM_STATE_NESTED_RUN_PENDING = 2


class StateError(ValueError):
    """A state record that does not fit: wrong struct name or size, missing key, or an XSAVE area of another size."""


class StateUnsupported(KvmError):
    """This KVM lacks or failed a state ioctl, so the state cannot be saved or restored completely.

    ``ioctl`` names it (e.g. "KVM_GET_NESTED_STATE"); ``errno`` is the OS error (0 if KVM did not fail but the
    state cannot be represented).
    """

    def __init__(self, ioctl: str, why: str, err: int = 0):
        super().__init__(f"{ioctl}: {why}", err)
        self.ioctl = ioctl


def _call(name: str, fn, *args):
    """Run one state ioctl wrapper; any KvmError becomes StateUnsupported naming ``name``."""
    try:
        return fn(*args)
    except StateUnsupported:
        raise
    except KvmError as e:
        msg = str(e)
        raise StateUnsupported(name, msg.partition(": ")[2] if msg.startswith(name + ":") else msg, e.errno) from None


# --- ctypes structs as records ---------------------------------------------------------------------------------
def pack_struct(s: ctypes.Structure) -> dict:
    """A ctypes struct as ``{"type": struct name, "size": bytes, "data": bytes(s)}`` (native little-endian layout)."""
    return {"type": type(s).__name__, "size": ctypes.sizeof(s), "data": bytes(s)}


def unpack_struct(cls: type, rec: object, what: str):
    """The ``cls`` instance in a ``pack_struct`` record (``from_buffer_copy``).

    :raises StateError: naming ``what`` if the record is not a dict of that struct name and size, or its data
        length differs from the recorded size.
    """
    if not isinstance(rec, dict) or not {"type", "size", "data"} <= rec.keys():
        raise StateError(f"{what}: not a struct record (needs type, size and data)")
    size, data = ctypes.sizeof(cls), rec["data"]
    if rec["type"] != cls.__name__:
        raise StateError(f"{what}: record holds a {rec['type']}, expected {cls.__name__}")
    if rec["size"] != size:
        raise StateError(f"{what}: {cls.__name__} of {rec['size']} bytes in the record, this Popek's is {size} bytes")
    if not isinstance(data, bytes):
        raise StateError(f"{what}: {cls.__name__} data is a {type(data).__name__}, not bytes")
    if len(data) != size:
        raise StateError(f"{what}: {cls.__name__} data is {len(data)} bytes, the record says {size}")
    return cls.from_buffer_copy(data)


def _need(d: object, keys: tuple[str, ...], what: str) -> dict:
    if not isinstance(d, dict):
        raise StateError(f"{what}: expected a dict, got {type(d).__name__}")
    missing = [k for k in keys if k not in d]
    if missing:
        raise StateError(f"{what} lacks {', '.join(missing)}")
    return d


def _int(v: object, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise StateError(f"{what}: expected an integer, got {type(v).__name__}")
    return v


# --- vCPU -------------------------------------------------------------------------------------------------------
@dataclass
class VcpuState:
    """One vCPU's architectural state as KVM reports it (api.rst, the KVM_GET_* ioctl of each field).

    ``xsave``: the raw XSAVE area (KVM_GET_XSAVE, 4096 bytes; KVM_GET_XSAVE2 when KVM_CAP_XSAVE2 is larger; it
    holds the x87/SSE/AVX state, so KVM_GET_FPU is not saved). ``lapic`` None: the VM has no in-kernel irqchip.
    ``msrs``: ``{index: value}`` in save order. ``tsc_khz``: guest TSC frequency, None without KVM_CAP_GET_TSC_KHZ.
    """

    cpuid: list[kvm_cpuid_entry2]
    mp_state: int
    regs: kvm_regs
    sregs: kvm_sregs
    xsave: bytes
    xcrs: kvm_xcrs
    debugregs: kvm_debugregs
    lapic: kvm_lapic_state | None
    msrs: dict[int, int]
    vcpu_events: kvm_vcpu_events
    tsc_khz: int | None

    _STRUCTS = {"regs": kvm_regs, "sregs": kvm_sregs, "xcrs": kvm_xcrs, "debugregs": kvm_debugregs,
                "vcpu_events": kvm_vcpu_events}

    def to_dict(self) -> dict:
        """Plain values (ints, bytes, lists, struct records) for popek.snapshot."""
        d = {k: pack_struct(getattr(self, k)) for k in self._STRUCTS}
        d.update(cpuid=[pack_struct(e) for e in self.cpuid], mp_state=self.mp_state, xsave=bytes(self.xsave),
                 lapic=None if self.lapic is None else pack_struct(self.lapic),
                 msrs=[[i, v] for i, v in self.msrs.items()], tsc_khz=self.tsc_khz)
        return d

    @classmethod
    def from_dict(cls, d: dict, what: str = "vcpu") -> "VcpuState":
        """Rebuild from ``to_dict()``. :raises StateError: naming the first field that is missing or malformed."""
        _need(d, tuple(cls._STRUCTS) + ("cpuid", "mp_state", "xsave", "lapic", "msrs", "tsc_khz"), what)
        fields = {k: unpack_struct(t, d[k], f"{what}.{k}") for k, t in cls._STRUCTS.items()}
        if not isinstance(d["cpuid"], list):
            raise StateError(f"{what}.cpuid: expected a list of kvm_cpuid_entry2 records")
        xsave = d["xsave"]
        if not isinstance(xsave, bytes) or len(xsave) < XSAVE_LEGACY_SIZE:
            raise StateError(f"{what}.xsave: expected at least {XSAVE_LEGACY_SIZE} bytes of XSAVE area")
        msrs = {}
        if not isinstance(d["msrs"], list):
            raise StateError(f"{what}.msrs: expected a list of [index, value] pairs")
        for pair in d["msrs"]:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise StateError(f"{what}.msrs: {pair!r} is not an [index, value] pair")
            msrs[_int(pair[0], f"{what}.msrs index")] = _int(pair[1], f"{what}.msrs value")
        return cls(cpuid=[unpack_struct(kvm_cpuid_entry2, e, f"{what}.cpuid[{i}]") for i, e in enumerate(d["cpuid"])],
                   mp_state=_int(d["mp_state"], f"{what}.mp_state"), xsave=xsave,
                   lapic=None if d["lapic"] is None else unpack_struct(kvm_lapic_state, d["lapic"], f"{what}.lapic"),
                   msrs=msrs, tsc_khz=None if d["tsc_khz"] is None else _int(d["tsc_khz"], f"{what}.tsc_khz"),
                   **fields)


def xsave_size(vm: VmFd) -> int:
    """Bytes of this VM's XSAVE area: KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on the VM fd, at least 4096."""
    return max(XSAVE_LEGACY_SIZE, vm.check_extension(abi.KVM_CAP_XSAVE2))


def msrs_to_save(fd: VcpuFd) -> list[int]:
    """The MSRs whose values make up the vCPU's state, in save order.

    KVM_GET_MSR_INDEX_LIST (msrs_to_save + emulated MSRs, TSC among them) plus the architectural MSRs that list
    omits but a guest programs: the MTRRs (def type, fixed, MTRRCAP.VCNT variable pairs; SDM vol. 3A 11.11) and
    the MCA banks (MCG_CAP.Count x CTL/STATUS/ADDR/MISC; SDM vol. 3B 15.3), kept to those KVM_GET_MSRS accepts
    on this vCPU (an MSR KVM will not read has no state KVM keeps for it).
    """
    candidates = list(dict.fromkeys(fd.vm.kvm.get_msr_index_list()))
    caps = _readable(fd, [MSR_MTRRCAP, MSR_IA32_MCG_CAP])
    extra = [MSR_MTRR_DEF_TYPE, *MSR_MTRR_FIXED]
    if MSR_MTRRCAP in caps:
        extra += range(MSR_MTRR_PHYS_BASE0, MSR_MTRR_PHYS_BASE0 + 2 * (caps[MSR_MTRRCAP] & 0xFF))
    if MSR_IA32_MCG_CAP in caps:
        extra += range(MSR_IA32_MC0_CTL, MSR_IA32_MC0_CTL + 4 * (caps[MSR_IA32_MCG_CAP] & 0xFF))
    listed = set(candidates)
    candidates += [i for i in extra if i not in listed]
    readable = _readable(fd, candidates)
    refused = [i for i in candidates if i not in readable]
    if refused:
        log.debug("vCPU %d: KVM_GET_MSRS refuses %s; not part of its state", fd.index,
                  " ".join(f"{i:#x}" for i in refused))
    return [i for i in candidates if i in readable]


def _readable(fd: VcpuFd, indices: list[int]) -> dict[int, int]:
    """``{index: value}`` for the MSRs KVM_GET_MSRS reads: one ioctl, or one per MSR when some are refused."""
    try:
        return fd.get_msrs(indices)
    except KvmError:
        out = {}
        for i in indices:
            try:
                out.update(fd.get_msrs([i]))
            except KvmError:
                pass
        return out


def _check_no_nested_state(fd: VcpuFd) -> None:
    """KVM_GET_NESTED_STATE where KVM supports nesting: refuse to snapshot a vCPU that uses VMX/SVM itself.

    Popek does not save nested state; a vCPU that never entered VMX operation / guest mode has none (its header
    reports only the 128-byte header, no guest-mode flags, and for VMX vmxon_pa = -1).
    """
    cap = fd.vm.check_extension(KVM_CAP_NESTED_STATE)
    if cap <= 0:
        return
    raw = _call("KVM_GET_NESTED_STATE", fd.get_nested_state, cap)
    flags, fmt, size = struct.unpack_from("<HHI", raw)
    vmxon_pa = struct.unpack_from("<Q", raw, 8)[0] if fmt == _KVM_STATE_NESTED_FORMAT_VMX else None
    if (size > NESTED_STATE_HEADER_SIZE or flags & (_KVM_STATE_NESTED_GUEST_MODE | _KVM_STATE_NESTED_RUN_PENDING)
            or vmxon_pa not in (None, 0xFFFF_FFFF_FFFF_FFFF)):
        raise StateUnsupported("KVM_GET_NESTED_STATE", f"vCPU {fd.index} uses nested virtualization ({size} bytes "
                               f"of nested state, flags {flags:#x}); Popek does not save nested state")


def save_vcpu(fd: VcpuFd, *, irqchip: bool = True) -> VcpuState:
    """Read every piece of the vCPU's state. The vCPU must not be in KVM_RUN (``Vcpu.pause()`` parks it after
    completing pending I/O, which KVM needs before the state is consistent: api.rst KVM_RUN, "completion").

    ``irqchip``: the VM has the in-kernel irqchip, so the vCPU has a LAPIC to save.
    :raises StateUnsupported: naming the first state ioctl this KVM lacks or fails.
    """
    _check_no_nested_state(fd)
    xsize = xsave_size(fd.vm)
    xsave = (_call("KVM_GET_XSAVE2", fd.get_xsave2, xsize) if xsize > XSAVE_LEGACY_SIZE
             else bytes(_call("KVM_GET_XSAVE", fd.get_xsave)))
    indices = msrs_to_save(fd)
    tsc_khz = (_call("KVM_GET_TSC_KHZ", fd.get_tsc_khz) if fd.vm.check_extension(KVM_CAP_GET_TSC_KHZ) > 0 else None)
    return VcpuState(
        cpuid=_call("KVM_GET_CPUID2", fd.get_cpuid2), mp_state=_call("KVM_GET_MP_STATE", fd.get_mp_state),
        regs=_call("KVM_GET_REGS", fd.get_regs), sregs=_call("KVM_GET_SREGS", fd.get_sregs), xsave=xsave,
        xcrs=_call("KVM_GET_XCRS", fd.get_xcrs), debugregs=_call("KVM_GET_DEBUGREGS", fd.get_debugregs),
        lapic=_call("KVM_GET_LAPIC", fd.get_lapic) if irqchip else None,
        msrs=_call("KVM_GET_MSRS", fd.get_msrs, indices), vcpu_events=_call("KVM_GET_VCPU_EVENTS", fd.get_vcpu_events),
        tsc_khz=tsc_khz)


def restore_vcpu(fd: VcpuFd, st: VcpuState) -> None:
    """Load ``st`` into a freshly created vCPU (not yet run) in Firecracker's order (module comment); first
    KVM_SET_TSC_KHZ when the saved guest TSC frequency differs from this vCPU's by more than
    TSC_KHZ_TOLERANCE_PPM.

    :raises StateError: if the XSAVE area size differs from this VM's (e.g. AMX enabled on one side only);
        StateUnsupported: naming the first ioctl KVM refuses (KVM_SET_TSC_KHZ when it cannot scale the TSC).
    """
    want = xsave_size(fd.vm)
    if len(st.xsave) != want:
        raise StateError(f"vCPU {fd.index}: saved XSAVE area is {len(st.xsave)} bytes, this VM's is {want} "
                         f"(KVM_CAP_XSAVE2): the CPU features differ")
    if st.lapic is None and _has_lapic(fd):
        raise StateError(f"vCPU {fd.index}: the snapshot has no LAPIC state but this VM has an in-kernel irqchip")
    if st.tsc_khz is not None and fd.vm.check_extension(KVM_CAP_GET_TSC_KHZ) > 0:
        here = _call("KVM_GET_TSC_KHZ", fd.get_tsc_khz)
        if abs(here - st.tsc_khz) * 1_000_000 > TSC_KHZ_TOLERANCE_PPM * st.tsc_khz:
            try:
                fd.set_tsc_khz(st.tsc_khz)
            except KvmError as e:
                raise StateUnsupported("KVM_SET_TSC_KHZ", f"the guest TSC ran at {st.tsc_khz} kHz, this vCPU's runs "
                                       f"at {here} kHz and KVM cannot change it ({e})", e.errno) from None
    _call("KVM_SET_CPUID2", fd.set_cpuid2, st.cpuid)
    _call("KVM_SET_MP_STATE", fd.set_mp_state, st.mp_state)
    _call("KVM_SET_REGS", fd.set_regs, st.regs)
    _call("KVM_SET_SREGS", fd.set_sregs, st.sregs)
    _call("KVM_SET_XSAVE", fd.set_xsave_area, st.xsave)
    _call("KVM_SET_XCRS", fd.set_xcrs, st.xcrs)
    _call("KVM_SET_DEBUGREGS", fd.set_debugregs, st.debugregs)
    if st.lapic is not None:
        _call("KVM_SET_LAPIC", fd.set_lapic, st.lapic)
    order = sorted(st.msrs, key=lambda i: (i != MSR_IA32_TSC, i == MSR_IA32_TSC_DEADLINE))  # stable otherwise
    _call("KVM_SET_MSRS", fd.set_msrs, {i: st.msrs[i] for i in order})
    _call("KVM_SET_VCPU_EVENTS", fd.set_vcpu_events, st.vcpu_events)


def _has_lapic(fd: VcpuFd) -> bool:
    try:
        fd.get_lapic()
        return True
    except KvmError:
        return False


# --- VM ---------------------------------------------------------------------------------------------------------
@dataclass
class VmState:
    """The VM-wide in-kernel device state: kvmclock (KVM_GET_CLOCK), the 8259 pair and IOAPIC (KVM_GET_IRQCHIP),
    the i8254 (KVM_GET_PIT2). An irqchip/PIT field is None when the VM was built without it."""

    clock: kvm_clock_data
    pic_master: kvm_irqchip | None
    pic_slave: kvm_irqchip | None
    ioapic: kvm_irqchip | None
    pit: kvm_pit_state2 | None

    _TYPES = {"clock": kvm_clock_data, "pic_master": kvm_irqchip, "pic_slave": kvm_irqchip, "ioapic": kvm_irqchip,
              "pit": kvm_pit_state2}

    def to_dict(self) -> dict:
        """Plain values (struct records or None) for popek.snapshot."""
        return {k: None if getattr(self, k) is None else pack_struct(getattr(self, k)) for k in self._TYPES}

    @classmethod
    def from_dict(cls, d: dict, what: str = "vm") -> "VmState":
        """Rebuild from ``to_dict()``. :raises StateError: naming the first field that is missing or malformed."""
        _need(d, tuple(cls._TYPES), what)
        if d["clock"] is None:
            raise StateError(f"{what}.clock: missing kvmclock state")
        st = cls(**{k: None if d[k] is None else unpack_struct(t, d[k], f"{what}.{k}") for k, t in cls._TYPES.items()})
        for name, chip_id in (("pic_master", abi.KVM_IRQCHIP_PIC_MASTER), ("pic_slave", abi.KVM_IRQCHIP_PIC_SLAVE),
                              ("ioapic", abi.KVM_IRQCHIP_IOAPIC)):
            chip = getattr(st, name)
            if chip is not None and chip.chip_id != chip_id:
                raise StateError(f"{what}.{name}: kvm_irqchip has chip_id {chip.chip_id}, expected {chip_id}")
        if (st.pic_master is None) != (st.ioapic is None) or (st.pic_slave is None) != (st.ioapic is None):
            raise StateError(f"{what}: the PICs and IOAPIC come together (KVM_CREATE_IRQCHIP); some are missing")
        return st


def save_vm(vm: VmFd, *, irqchip: bool = True, pit: bool = True) -> VmState:
    """Read the VM-wide state; take it while every vCPU is paused. ``irqchip``/``pit``: the VM was built with
    KVM_CREATE_IRQCHIP / KVM_CREATE_PIT2.

    :raises StateUnsupported: naming the state ioctl that failed.
    """
    chips = [_call("KVM_GET_IRQCHIP", vm.get_irqchip, c) if irqchip else None
             for c in (abi.KVM_IRQCHIP_PIC_MASTER, abi.KVM_IRQCHIP_PIC_SLAVE, abi.KVM_IRQCHIP_IOAPIC)]
    return VmState(clock=_call("KVM_GET_CLOCK", vm.get_clock), pic_master=chips[0], pic_slave=chips[1],
                   ioapic=chips[2], pit=_call("KVM_GET_PIT2", vm.get_pit2) if pit else None)


def restore_vm(vm: VmFd, st: VmState, *, advance_clock: bool = False) -> None:
    """Load ``st`` into a new VM built with the same irqchip/PIT (before restoring its vCPUs).

    kvmclock: KVM_SET_CLOCK with the saved value, so guest time resumes where it was saved (the time the VM spent
    saved does not pass for the guest). ``advance_clock``: pass KVM_CLOCK_REALTIME with the saved realtime so KVM
    adds the host real time elapsed since the save (api.rst KVM_SET_CLOCK) -- only if the save recorded it
    (KVM_GET_CLOCK set KVM_CLOCK_REALTIME) and this KVM supports it (KVM_CAP_ADJUST_CLOCK), else flags are 0,
    which every KVM accepts (before 5.16 KVM_SET_CLOCK refused any flag).
    :raises StateUnsupported: naming the ioctl that failed (e.g. KVM_SET_IRQCHIP on a VM without irqchip).
    """
    for chip in (st.pic_master, st.pic_slave, st.ioapic):
        if chip is not None:
            _call("KVM_SET_IRQCHIP", vm.set_irqchip, chip)
    if st.pit is not None:
        _call("KVM_SET_PIT2", vm.set_pit2, st.pit)
    clock = kvm_clock_data(clock=st.clock.clock)
    if (advance_clock and st.clock.flags & KVM_CLOCK_REALTIME
            and vm.check_extension(abi.KVM_CAP_ADJUST_CLOCK) & KVM_CLOCK_REALTIME):
        clock.flags, clock.realtime = KVM_CLOCK_REALTIME, st.clock.realtime
    _call("KVM_SET_CLOCK", vm.set_clock, clock)


def state_support(fd: VcpuFd, *, irqchip: bool = True, pit: bool = True) -> dict[str, str]:
    """Which state ioctls this KVM performs for ``fd`` and its VM: ``{ioctl name: "ok" or why not}``.

    Reads only (and KVM_SET_TSC_KHZ with the current frequency); for reports such as ``popek`` diagnostics.
    """
    vm, out = fd.vm, {}

    def probe(name: str, fn, *args) -> None:
        try:
            fn(*args)
            out[name] = "ok"
        except KvmError as e:
            out[name] = str(e)

    for name, fn in (("KVM_GET_CPUID2", fd.get_cpuid2), ("KVM_GET_MP_STATE", fd.get_mp_state),
                     ("KVM_GET_REGS", fd.get_regs), ("KVM_GET_SREGS", fd.get_sregs), ("KVM_GET_XSAVE", fd.get_xsave),
                     ("KVM_GET_XCRS", fd.get_xcrs), ("KVM_GET_DEBUGREGS", fd.get_debugregs),
                     ("KVM_GET_VCPU_EVENTS", fd.get_vcpu_events), ("KVM_GET_CLOCK", vm.get_clock)):
        probe(name, fn)
    if irqchip:
        probe("KVM_GET_LAPIC", fd.get_lapic)
        probe("KVM_GET_IRQCHIP", vm.get_irqchip, abi.KVM_IRQCHIP_IOAPIC)
    if pit:
        probe("KVM_GET_PIT2", vm.get_pit2)
    probe("KVM_GET_MSRS", fd.get_msrs, msrs_to_save(fd))
    size = vm.check_extension(abi.KVM_CAP_XSAVE2)
    if size > 0:
        probe("KVM_GET_XSAVE2", fd.get_xsave2, size)
    else:
        out["KVM_GET_XSAVE2"] = "KVM_CAP_XSAVE2 is 0"
    if vm.check_extension(KVM_CAP_GET_TSC_KHZ) > 0:
        probe("KVM_GET_TSC_KHZ", fd.get_tsc_khz)
        probe("KVM_SET_TSC_KHZ", lambda: fd.set_tsc_khz(fd.get_tsc_khz()))
    else:
        out["KVM_GET_TSC_KHZ"] = "KVM_CAP_GET_TSC_KHZ is 0"
    cap = vm.check_extension(KVM_CAP_NESTED_STATE)
    if cap > 0:
        probe("KVM_GET_NESTED_STATE", fd.get_nested_state, cap)
    else:
        out["KVM_GET_NESTED_STATE"] = "KVM_CAP_NESTED_STATE is 0 (no nested virtualization, no nested state)"
    return out
