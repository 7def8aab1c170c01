"""KVM x86-64 ABI: ctypes structures, ioctl numbers and constants of <linux/kvm.h> and <asm/kvm.h>."""

# Layouts follow the kernel UAPI headers (include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h) and
# Documentation/virt/kvm/api.rst; every size is asserted at import so a layout mistake fails loudly, and
# tests/unit/test_abi.py compares sizes, offsets and ioctl numbers with the installed headers.

from __future__ import annotations

import ctypes
from ctypes import Structure, Union, c_char, c_uint8, c_uint16, c_uint32, c_uint64, sizeof

u8, u16, u32, u64 = c_uint8, c_uint16, c_uint32, c_uint64

# --- ioctl number encoding (include/uapi/asm-generic/ioctl.h) -------------------------------------------------
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _IOC(direction: int, typ: int, nr: int, size: int) -> int:
    """Encode an ioctl request number (asm-generic/ioctl.h ``_IOC``); ``size`` is the argument size in bytes."""
    if size >= 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return (direction << _IOC_DIRSHIFT) | (typ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def _IO(typ: int, nr: int) -> int:
    return _IOC(_IOC_NONE, typ, nr, 0)


def _IOR(typ: int, nr: int, struct) -> int:
    return _IOC(_IOC_READ, typ, nr, struct if isinstance(struct, int) else sizeof(struct))


def _IOW(typ: int, nr: int, struct) -> int:
    return _IOC(_IOC_WRITE, typ, nr, struct if isinstance(struct, int) else sizeof(struct))


def _IOWR(typ: int, nr: int, struct) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, typ, nr, struct if isinstance(struct, int) else sizeof(struct))


# --- constants ---------------------------------------------------------------------------------------------
KVM_API_VERSION = 12

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_X86_BUS_LOCK = 33
KVM_EXIT_NOTIFY = 37

#: Exit reason number -> name, for exit counters and messages.
EXIT_REASON_NAMES = {v: k[len("KVM_EXIT_"):] for k, v in dict(globals()).items() if k.startswith("KVM_EXIT_")}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3
KVM_SYSTEM_EVENT_WAKEUP = 4
KVM_SYSTEM_EVENT_SUSPEND = 5
KVM_SYSTEM_EVENT_SEV_TERM = 6

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002
KVM_GUESTDBG_USE_SW_BP = 0x00010000
KVM_GUESTDBG_USE_HW_BP = 0x00020000
KVM_GUESTDBG_INJECT_DB = 0x00040000
KVM_GUESTDBG_INJECT_BP = 0x00080000

KVM_PIT_SPEAKER_DUMMY = 1

KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_IOAPIC_NUM_PINS = 24

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0

KVM_VCPUEVENT_VALID_NMI_PENDING = 0x01
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x02
KVM_VCPUEVENT_VALID_SHADOW = 0x04

# Capabilities (KVM_CHECK_EXTENSION arguments) Popek uses.
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MP_STATE = 14
KVM_CAP_SYNC_MMU = 16
KVM_CAP_SET_GUEST_DEBUG = 23
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQ_INJECT_STATUS = 26
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_PIT_STATE2 = 35
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_INTERNAL_ERROR_DATA = 40
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_TSC_DEADLINE_TIMER = 72
KVM_CAP_READONLY_MEM = 81
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_XSAVE2 = 208

# x86 exception vectors (asm/kvm.h)
DB_VECTOR, BP_VECTOR, UD_VECTOR, DF_VECTOR, GP_VECTOR, PF_VECTOR = 1, 3, 6, 8, 13, 14


# --- structures (asm/kvm.h) --------------------------------------------------------------------------------
class kvm_regs(Structure):
    """KVM_GET_REGS/KVM_SET_REGS general registers, 144 bytes."""
    _fields_ = [(n, u64) for n in ("rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags").split()]


class kvm_segment(Structure):
    """One segment register as KVM sees it (hidden part included), 24 bytes."""
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8), ("present", u8), ("dpl", u8),
                ("db", u8), ("s", u8), ("l", u8), ("g", u8), ("avl", u8), ("unusable", u8), ("padding", u8)]


class kvm_dtable(Structure):
    """GDTR/IDTR: base and limit, 16 bytes."""
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(Structure):
    """KVM_GET_SREGS/KVM_SET_SREGS special registers, 312 bytes."""
    _fields_ = ([(n, kvm_segment) for n in "cs ds es fs gs ss tr ldt".split()]
                + [("gdt", kvm_dtable), ("idt", kvm_dtable)]
                + [(n, u64) for n in "cr0 cr2 cr3 cr4 cr8 efer apic_base".split()]
                + [("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64))])


class kvm_fpu(Structure):
    """KVM_GET_FPU/KVM_SET_FPU x87/SSE state (FXSAVE-like), 416 bytes."""
    _fields_ = [("fpr", (u8 * 16) * 8), ("fcw", u16), ("fsw", u16), ("ftwx", u8), ("pad1", u8),
                ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64), ("xmm", (u8 * 16) * 16),
                ("mxcsr", u32), ("pad2", u32)]


class kvm_msr_entry(Structure):
    """One MSR index/value pair, 16 bytes."""
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(Structure):
    """KVM_GET_MSRS/KVM_SET_MSRS header (8 bytes); ``kvm_msrs_n(n)`` gives the variant with n entries."""
    _fields_ = [("nmsrs", u32), ("pad", u32)]


def kvm_msrs_n(n: int) -> type[Structure]:
    """A kvm_msrs structure type with a fixed ``entries[n]`` array (the header's flexible array)."""
    return type(f"kvm_msrs_{n}", (Structure,), {"_fields_": [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * n)]})


class kvm_cpuid_entry2(Structure):
    """One CPUID leaf/subleaf, 40 bytes."""
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32), ("ebx", u32), ("ecx", u32),
                ("edx", u32), ("padding", u32 * 3)]


class kvm_cpuid2(Structure):
    """KVM_SET_CPUID2/KVM_GET_SUPPORTED_CPUID header (8 bytes); ``kvm_cpuid2_n(n)`` has n entries."""
    _fields_ = [("nent", u32), ("padding", u32)]


def kvm_cpuid2_n(n: int) -> type[Structure]:
    """A kvm_cpuid2 structure type with a fixed ``entries[n]`` array."""
    return type(f"kvm_cpuid2_{n}", (Structure,), {"_fields_": [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * n)]})


class kvm_lapic_state(Structure):
    """KVM_GET_LAPIC/KVM_SET_LAPIC: the local APIC register page (first 1 KiB), 1024 bytes."""
    _fields_ = [("regs", u8 * 0x400)]


class kvm_debug_exit_arch(Structure):
    """The x86 part of a KVM_EXIT_DEBUG exit, 32 bytes."""
    _fields_ = [("exception", u32), ("pad", u32), ("pc", u64), ("dr6", u64), ("dr7", u64)]


class kvm_guest_debug_arch(Structure):
    """DR0-DR7 for KVM_SET_GUEST_DEBUG (index 7 is DR7), 64 bytes."""
    _fields_ = [("debugreg", u64 * 8)]


class _vcpu_events_exception(Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8), ("error_code", u32)]


class _vcpu_events_interrupt(Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _vcpu_events_nmi(Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _vcpu_events_smi(Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class _vcpu_events_triple_fault(Structure):
    _fields_ = [("pending", u8)]


class kvm_vcpu_events(Structure):
    """KVM_GET_VCPU_EVENTS/KVM_SET_VCPU_EVENTS pending/injected events, 64 bytes."""
    _fields_ = [("exception", _vcpu_events_exception), ("interrupt", _vcpu_events_interrupt),
                ("nmi", _vcpu_events_nmi), ("sipi_vector", u32), ("flags", u32), ("smi", _vcpu_events_smi),
                ("triple_fault", _vcpu_events_triple_fault), ("reserved", u8 * 26),
                ("exception_has_payload", u8), ("exception_payload", u64)]


class kvm_debugregs(Structure):
    """KVM_GET_DEBUGREGS/KVM_SET_DEBUGREGS, 128 bytes."""
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


class kvm_xsave(Structure):
    """KVM_GET_XSAVE/KVM_SET_XSAVE legacy 4 KiB XSAVE area."""
    _fields_ = [("region", u32 * 1024)]


class kvm_xcr(Structure):
    """One extended control register (index ``xcr``, 0 = XCR0) and its value, 16 bytes."""
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


KVM_MAX_XCRS = 16


class kvm_xcrs(Structure):
    """KVM_GET_XCRS/KVM_SET_XCRS extended control registers (XCR0), 392 bytes."""
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * KVM_MAX_XCRS), ("padding", u64 * 16)]


class kvm_pit_channel_state(Structure):
    """One i8254 channel in KVM_GET_PIT2, 24 bytes."""
    _fields_ = [("count", u32), ("latched_count", u16), ("count_latched", u8), ("status_latched", u8),
                ("status", u8), ("read_state", u8), ("write_state", u8), ("write_latch", u8), ("rw_mode", u8),
                ("mode", u8), ("bcd", u8), ("gate", u8), ("count_load_time", ctypes.c_int64)]


class kvm_pit_state2(Structure):
    """KVM_GET_PIT2/KVM_SET_PIT2, 112 bytes."""
    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", u32), ("reserved", u32 * 9)]


class kvm_pic_state(Structure):
    """One 8259A PIC in kvm_irqchip, 16 bytes."""
    _fields_ = [(n, u8) for n in ("last_irr irr imr isr priority_add irq_base read_reg_select poll special_mask "
                                  "init_state auto_eoi rotate_on_auto_eoi special_fully_nested_mode init4 elcr "
                                  "elcr_mask").split()]


class kvm_ioapic_state(Structure):
    """The in-kernel IOAPIC in kvm_irqchip; ``redirtbl`` holds the 24 raw 64-bit redirection entries."""
    _fields_ = [("base_address", u64), ("ioregsel", u32), ("id", u32), ("irr", u32), ("pad", u32),
                ("redirtbl", u64 * KVM_IOAPIC_NUM_PINS)]


class _irqchip_union(Union):
    _fields_ = [("dummy", c_char * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state)]


class kvm_irqchip(Structure):
    """KVM_GET_IRQCHIP/KVM_SET_IRQCHIP, 520 bytes; ``chip_id`` is KVM_IRQCHIP_PIC_MASTER/SLAVE/IOAPIC."""
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", _irqchip_union)]


# --- structures (linux/kvm.h) ------------------------------------------------------------------------------
class kvm_userspace_memory_region(Structure):
    """KVM_SET_USER_MEMORY_REGION, 32 bytes."""
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64), ("memory_size", u64),
                ("userspace_addr", u64)]


class kvm_irq_level(Structure):
    """KVM_IRQ_LINE: GSI and level, 8 bytes (``irq`` shares storage with ``status``)."""
    _fields_ = [("irq", u32), ("level", u32)]


class kvm_pit_config(Structure):
    """KVM_CREATE_PIT2 flags, 64 bytes."""
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_guest_debug(Structure):
    """KVM_SET_GUEST_DEBUG, 72 bytes."""
    _fields_ = [("control", u32), ("pad", u32), ("arch", kvm_guest_debug_arch)]


class kvm_mp_state(Structure):
    """KVM_GET_MP_STATE/KVM_SET_MP_STATE, 4 bytes."""
    _fields_ = [("mp_state", u32)]


class kvm_clock_data(Structure):
    """KVM_GET_CLOCK/KVM_SET_CLOCK kvmclock value in ns, 48 bytes."""
    _fields_ = [("clock", u64), ("flags", u32), ("pad0", u32), ("realtime", u64), ("host_tsc", u64),
                ("pad", u32 * 4)]


class kvm_dirty_log(Structure):
    """KVM_GET_DIRTY_LOG: slot and a pointer to a bitmap of one bit per page, 16 bytes."""
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


# --- struct kvm_run ----------------------------------------------------------------------------------------
class _exit_hw(Structure):
    _fields_ = [("hardware_exit_reason", u64)]


class _exit_fail_entry(Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _exit_ex(Structure):
    _fields_ = [("exception", u32), ("error_code", u32)]


class _exit_io(Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class _exit_debug(Structure):
    _fields_ = [("arch", kvm_debug_exit_arch)]


class _exit_mmio(Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _exit_internal(Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _exit_emulation_failure(Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("flags", u64), ("insn_size", u8), ("insn_bytes", u8 * 15)]


class _exit_system_event(Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]  # data[0] is the older ``flags``


class _exit_union(Union):
    _fields_ = [("hw", _exit_hw), ("fail_entry", _exit_fail_entry), ("ex", _exit_ex), ("io", _exit_io),
                ("debug", _exit_debug), ("mmio", _exit_mmio), ("internal", _exit_internal),
                ("emulation_failure", _exit_emulation_failure), ("system_event", _exit_system_event),
                ("padding", c_char * 256)]


class kvm_run(Structure):
    """The mmap()ed shared run area of a vCPU (api.rst section 5 "The kvm_run structure").

    Header to the exit union is 32 bytes; the union is 256 bytes; sync regs follow (2048 bytes padded).
    """
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8), ("flags", u16),
                ("cr8", u64), ("apic_base", u64), ("exit", _exit_union),
                ("kvm_valid_regs", u64), ("kvm_dirty_regs", u64), ("s", c_char * 2048)]


KVM_RUN_EXIT_OFFSET = kvm_run.exit.offset

# --- sizes, asserted against the kernel ABI ----------------------------------------------------------------
_SIZES = {kvm_regs: 144, kvm_segment: 24, kvm_dtable: 16, kvm_sregs: 312, kvm_fpu: 416, kvm_msr_entry: 16,
          kvm_msrs: 8, kvm_cpuid_entry2: 40, kvm_cpuid2: 8, kvm_lapic_state: 1024, kvm_debug_exit_arch: 32,
          kvm_guest_debug_arch: 64, kvm_vcpu_events: 64, kvm_debugregs: 128, kvm_xsave: 4096, kvm_xcrs: 392,
          kvm_pit_channel_state: 24, kvm_pit_state2: 112, kvm_irqchip: 520, kvm_userspace_memory_region: 32,
          kvm_irq_level: 8, kvm_pit_config: 64, kvm_guest_debug: 72, kvm_mp_state: 4, kvm_clock_data: 48,
          kvm_dirty_log: 16, _exit_union: 256, kvm_run: 2352}
for _t, _n in _SIZES.items():
    assert sizeof(_t) == _n, f"{_t.__name__} is {sizeof(_t)} bytes, the kernel ABI says {_n}"
assert KVM_RUN_EXIT_OFFSET == 32, "kvm_run exit union must start at offset 32"
assert kvm_run.immediate_exit.offset == 1
assert kvm_vcpu_events.exception_payload.offset == 56
del _t, _n

# --- ioctl numbers -----------------------------------------------------------------------------------------
_BEFORE_IOCTLS = set(globals())
# /dev/kvm
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, kvm_cpuid2)
KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, 4)  # struct kvm_msr_list header: __u32 nmsrs
# VM fd
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, u64)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, kvm_irq_level)
KVM_GET_IRQCHIP = _IOWR(KVMIO, 0x62, kvm_irqchip)
KVM_SET_IRQCHIP = _IOR(KVMIO, 0x63, kvm_irqchip)  # sic: _IOR in the header
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, kvm_pit_config)
KVM_SET_CLOCK = _IOW(KVMIO, 0x7B, kvm_clock_data)
KVM_GET_CLOCK = _IOR(KVMIO, 0x7C, kvm_clock_data)
KVM_GET_PIT2 = _IOR(KVMIO, 0x9F, kvm_pit_state2)
KVM_SET_PIT2 = _IOW(KVMIO, 0xA0, kvm_pit_state2)
# vCPU fd
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, kvm_msrs)
KVM_GET_FPU = _IOR(KVMIO, 0x8C, kvm_fpu)
KVM_SET_FPU = _IOW(KVMIO, 0x8D, kvm_fpu)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, kvm_lapic_state)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, kvm_lapic_state)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, kvm_cpuid2)
KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, kvm_cpuid2)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, kvm_mp_state)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, kvm_mp_state)
KVM_NMI = _IO(KVMIO, 0x9A)
KVM_SET_GUEST_DEBUG = _IOW(KVMIO, 0x9B, kvm_guest_debug)
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, kvm_vcpu_events)
KVM_GET_DEBUGREGS = _IOR(KVMIO, 0xA1, kvm_debugregs)
KVM_SET_DEBUGREGS = _IOW(KVMIO, 0xA2, kvm_debugregs)
KVM_GET_XSAVE = _IOR(KVMIO, 0xA4, kvm_xsave)
KVM_SET_XSAVE = _IOW(KVMIO, 0xA5, kvm_xsave)
KVM_GET_XCRS = _IOR(KVMIO, 0xA6, kvm_xcrs)
KVM_SET_XCRS = _IOW(KVMIO, 0xA7, kvm_xcrs)

# Spot checks against values printed by the kernel headers (verified in tests/unit/test_abi.py too).
assert KVM_RUN == 0xAE80 and KVM_GET_REGS == 0x8090AE81 and KVM_SET_SREGS == 0x4138AE84
assert KVM_SET_USER_MEMORY_REGION == 0x4020AE46 and KVM_GET_SUPPORTED_CPUID == 0xC008AE05

#: ioctl number -> name, for error messages.
IOCTL_NAMES = {v: k for k, v in dict(globals()).items() if k.startswith("KVM_") and k not in _BEFORE_IOCTLS}
del _BEFORE_IOCTLS

# --- interrupt routing, irqfd, ioeventfd, MSI (linux/kvm.h; api.rst KVM_SET_GSI_ROUTING, KVM_IRQFD, KVM_IOEVENTFD,
# KVM_SIGNAL_MSI) --------------------------------------------------------------------------------------------
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_IRQFD_RESAMPLE = 82
KVM_CAP_IOEVENTFD_NO_LENGTH = 100
KVM_CAP_IOEVENTFD_ANY_LENGTH = 122

KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2

KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2


class kvm_irq_routing_irqchip(Structure):
    """A route to an in-kernel irqchip pin: ``irqchip`` KVM_IRQCHIP_PIC_MASTER/PIC_SLAVE/IOAPIC, ``pin``; 8 bytes."""
    _fields_ = [("irqchip", u32), ("pin", u32)]


class kvm_irq_routing_msi(Structure):
    """A route that sends an MSI: the message address (low/high dwords) and data; ``devid`` unused on x86; 16 bytes."""
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("devid", u32)]


class _irq_routing_union(Union):
    _fields_ = [("irqchip", kvm_irq_routing_irqchip), ("msi", kvm_irq_routing_msi), ("pad", u32 * 8)]


class kvm_irq_routing_entry(Structure):
    """One GSI route (``type`` KVM_IRQ_ROUTING_IRQCHIP or KVM_IRQ_ROUTING_MSI, payload in ``u``), 48 bytes."""
    _fields_ = [("gsi", u32), ("type", u32), ("flags", u32), ("pad", u32), ("u", _irq_routing_union)]


class kvm_irq_routing(Structure):
    """KVM_SET_GSI_ROUTING header (8 bytes); ``kvm_irq_routing_n(n)`` has ``entries[n]``."""
    _fields_ = [("nr", u32), ("flags", u32)]


def kvm_irq_routing_n(n: int) -> type[Structure]:
    """A kvm_irq_routing structure type with a fixed ``entries[n]`` array (the header's flexible array)."""
    return type(f"kvm_irq_routing_{n}", (Structure,),
                {"_fields_": [("nr", u32), ("flags", u32), ("entries", kvm_irq_routing_entry * n)]})


class kvm_irqfd(Structure):
    """KVM_IRQFD: eventfd ``fd`` injects GSI ``gsi``; ``resamplefd`` with KVM_IRQFD_FLAG_RESAMPLE; 32 bytes."""
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


class kvm_ioeventfd(Structure):
    """KVM_IOEVENTFD: a guest write of ``len`` bytes (0 = any) at ``addr`` (MMIO, or PIO with the flag) signals
    eventfd ``fd`` instead of exiting; with KVM_IOEVENTFD_FLAG_DATAMATCH only if the value equals ``datamatch``;
    64 bytes."""
    _fields_ = [("datamatch", u64), ("addr", u64), ("len", u32), ("fd", ctypes.c_int32), ("flags", u32),
                ("pad", u8 * 36)]


class kvm_msi(Structure):
    """KVM_SIGNAL_MSI: inject one MSI (address low/high, data); ``flags``/``devid`` unused on x86; 32 bytes."""
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("flags", u32), ("devid", u32),
                ("pad", u8 * 12)]


for _t, _n in {kvm_irq_routing_irqchip: 8, kvm_irq_routing_msi: 16, kvm_irq_routing_entry: 48, kvm_irq_routing: 8,
               kvm_irqfd: 32, kvm_ioeventfd: 64, kvm_msi: 32}.items():
    assert sizeof(_t) == _n, f"{_t.__name__} is {sizeof(_t)} bytes, the kernel ABI says {_n}"
assert kvm_irq_routing_entry.u.offset == 16 and kvm_ioeventfd.flags.offset == 24
del _t, _n

KVM_SET_GSI_ROUTING = _IOW(KVMIO, 0x6A, kvm_irq_routing)
KVM_IRQFD = _IOW(KVMIO, 0x76, kvm_irqfd)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, kvm_ioeventfd)
KVM_SIGNAL_MSI = _IOW(KVMIO, 0xA5, kvm_msi)
IOCTL_NAMES.update({KVM_SET_GSI_ROUTING: "KVM_SET_GSI_ROUTING", KVM_IRQFD: "KVM_IRQFD",
                    KVM_IOEVENTFD: "KVM_IOEVENTFD", KVM_SIGNAL_MSI: "KVM_SIGNAL_MSI"})
