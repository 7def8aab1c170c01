"""popek.kvm.abi against the kernel headers: a C program built at test time prints sizeof/offsetof/ioctl numbers."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from popek.kvm import abi

HEADERS = [Path("/usr/include/linux/kvm.h"), Path("/usr/include/x86_64-linux-gnu/asm/kvm.h")]

STRUCTS = ["kvm_regs", "kvm_segment", "kvm_dtable", "kvm_sregs", "kvm_fpu", "kvm_msr_entry", "kvm_msrs",
           "kvm_cpuid_entry2", "kvm_cpuid2", "kvm_lapic_state", "kvm_debug_exit_arch", "kvm_guest_debug_arch",
           "kvm_vcpu_events", "kvm_debugregs", "kvm_xsave", "kvm_xcrs", "kvm_pit_channel_state", "kvm_pit_state2",
           "kvm_pic_state", "kvm_ioapic_state", "kvm_irqchip", "kvm_userspace_memory_region", "kvm_irq_level",
           "kvm_pit_config", "kvm_guest_debug", "kvm_mp_state", "kvm_clock_data", "kvm_dirty_log", "kvm_run",
           "kvm_irq_routing_irqchip", "kvm_irq_routing_msi", "kvm_irq_routing_entry", "kvm_irq_routing", "kvm_irqfd",
           "kvm_ioeventfd", "kvm_msi"]

# (struct, C member designator, Python attribute path)
OFFSETS = [
    ("kvm_run", "immediate_exit", "immediate_exit"),
    ("kvm_run", "exit_reason", "exit_reason"),
    ("kvm_run", "cr8", "cr8"),
    ("kvm_run", "apic_base", "apic_base"),
    ("kvm_run", "io", "exit"),
    ("kvm_run", "io.port", "exit.io.port"),
    ("kvm_run", "io.count", "exit.io.count"),
    ("kvm_run", "io.data_offset", "exit.io.data_offset"),
    ("kvm_run", "mmio.phys_addr", "exit.mmio.phys_addr"),
    ("kvm_run", "mmio.data", "exit.mmio.data"),
    ("kvm_run", "mmio.len", "exit.mmio.len"),
    ("kvm_run", "mmio.is_write", "exit.mmio.is_write"),
    ("kvm_run", "hw.hardware_exit_reason", "exit.hw.hardware_exit_reason"),
    ("kvm_run", "fail_entry.cpu", "exit.fail_entry.cpu"),
    ("kvm_run", "internal.suberror", "exit.internal.suberror"),
    ("kvm_run", "internal.ndata", "exit.internal.ndata"),
    ("kvm_run", "internal.data", "exit.internal.data"),
    ("kvm_run", "emulation_failure.flags", "exit.emulation_failure.flags"),
    ("kvm_run", "emulation_failure.insn_size", "exit.emulation_failure.insn_size"),
    ("kvm_run", "emulation_failure.insn_bytes", "exit.emulation_failure.insn_bytes"),
    ("kvm_run", "debug.arch.pc", "exit.debug.arch.pc"),
    ("kvm_run", "debug.arch.dr7", "exit.debug.arch.dr7"),
    ("kvm_run", "system_event.type", "exit.system_event.type"),
    ("kvm_run", "system_event.flags", "exit.system_event.data"),
    ("kvm_run", "kvm_valid_regs", "kvm_valid_regs"),
    ("kvm_run", "s", "s"),
    ("kvm_sregs", "gdt", "gdt"),
    ("kvm_sregs", "cr0", "cr0"),
    ("kvm_sregs", "efer", "efer"),
    ("kvm_sregs", "interrupt_bitmap", "interrupt_bitmap"),
    ("kvm_fpu", "fcw", "fcw"),
    ("kvm_fpu", "last_ip", "last_ip"),
    ("kvm_fpu", "xmm", "xmm"),
    ("kvm_fpu", "mxcsr", "mxcsr"),
    ("kvm_vcpu_events", "interrupt", "interrupt"),
    ("kvm_vcpu_events", "sipi_vector", "sipi_vector"),
    ("kvm_vcpu_events", "flags", "flags"),
    ("kvm_vcpu_events", "triple_fault", "triple_fault"),
    ("kvm_vcpu_events", "exception_has_payload", "exception_has_payload"),
    ("kvm_vcpu_events", "exception_payload", "exception_payload"),
    ("kvm_segment", "unusable", "unusable"),
    ("kvm_guest_debug", "arch", "arch"),
    ("kvm_irqchip", "chip", "chip"),
    ("kvm_ioapic_state", "redirtbl", "redirtbl"),
    ("kvm_pit_state2", "flags", "flags"),
    ("kvm_clock_data", "realtime", "realtime"),
    ("kvm_xcrs", "padding", "padding"),
    ("kvm_irq_routing_entry", "u", "u"),
    ("kvm_irq_routing_entry", "u.msi.data", "u.msi.data"),
    ("kvm_irqfd", "resamplefd", "resamplefd"),
    ("kvm_ioeventfd", "fd", "fd"),
    ("kvm_ioeventfd", "flags", "flags"),
    ("kvm_msi", "devid", "devid"),
]

IOCTLS = sorted(k for k in dir(abi) if k.startswith("KVM_") and getattr(abi, k) in abi.IOCTL_NAMES
                and abi.IOCTL_NAMES[getattr(abi, k)] == k)

CONSTANTS = sorted(k for k in dir(abi) if k.startswith(("KVM_EXIT_", "KVM_CAP_", "KVM_GUESTDBG_", "KVM_MP_STATE_",
                                                          "KVM_SYSTEM_EVENT_", "KVM_INTERNAL_ERROR_", "KVM_MEM_",
                                                          "KVM_IRQCHIP_", "KVM_VCPUEVENT_", "KVM_IRQ_ROUTING_",
                                                          "KVM_IRQFD_FLAG_", "KVM_IOEVENTFD_FLAG_")))


@pytest.fixture(scope="module")
def header_values(tmp_path_factory) -> dict[str, int]:
    """Compile and run a C program that prints every checked value from <linux/kvm.h> as ``name value`` lines."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    missing = [str(h) for h in HEADERS if not h.exists()]
    if missing:
        pytest.skip(f"kernel headers missing: {', '.join(missing)} (install linux-libc-dev)")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void) {"]
    for s in STRUCTS:
        lines.append(f'printf("sizeof:{s} %zu\\n", sizeof(struct {s}));')
    for s, member, _ in OFFSETS:
        lines.append(f'printf("offsetof:{s}.{member} %zu\\n", offsetof(struct {s}, {member}));')
    for name in IOCTLS + CONSTANTS:
        lines.append(f'#ifdef {name}\nprintf("{name} %llu\\n", (unsigned long long)({name}));\n#endif')
    lines.append("return 0; }")
    d = tmp_path_factory.mktemp("abi")
    (d / "abi.c").write_text("\n".join(lines))
    cc = subprocess.run(["gcc", "-o", str(d / "abi"), str(d / "abi.c")], capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    out = subprocess.run([str(d / "abi")], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("name", STRUCTS)
def test_struct_size_matches_kernel_header(header_values, name):
    assert ctypes.sizeof(getattr(abi, name)) == header_values[f"sizeof:{name}"]


def _offset(struct, path: str) -> int:
    off = 0
    for part in path.split("."):
        field = getattr(struct, part)
        off += field.offset
        struct = dict(struct._fields_)[part]
    return off


@pytest.mark.parametrize("struct,member,path", OFFSETS, ids=[f"{s}.{m}" for s, m, _ in OFFSETS])
def test_field_offset_matches_kernel_header(header_values, struct, member, path):
    assert _offset(getattr(abi, struct), path) == header_values[f"offsetof:{struct}.{member}"]


@pytest.mark.parametrize("name", IOCTLS)
def test_ioctl_number_matches_kernel_header(header_values, name):
    assert name in header_values, f"{name} is not defined by the installed headers"
    assert getattr(abi, name) == header_values[name], f"{name}: {getattr(abi, name):#x} != {header_values[name]:#x}"


@pytest.mark.parametrize("name", CONSTANTS)
def test_constant_matches_kernel_header(header_values, name):
    if name not in header_values:
        pytest.skip(f"{name} is newer than the installed headers")
    assert getattr(abi, name) == header_values[name]


def test_emulation_failure_overlay_starts_at_kvm_run_offset_32():
    # environment.md: u32 suberror; u32 ndata; u64 flags; u8 insn_size; u8 insn_bytes[15] at offset 32 of kvm_run
    assert [_offset(abi.kvm_run, f"exit.emulation_failure.{f}") for f in ("suberror", "ndata", "flags", "insn_size",
                                                                          "insn_bytes")] == [32, 36, 40, 48, 49]


def test_ioctl_encoding_uses_direction_size_type_and_number():
    assert abi._IOWR(abi.KVMIO, 0x05, 8) == (3 << 30) | (8 << 16) | (0xAE << 8) | 0x05
    with pytest.raises(ValueError, match="does not fit"):
        abi._IOW(abi.KVMIO, 0, 1 << 14)


def test_msrs_and_cpuid_variants_have_header_then_entries():
    t = abi.kvm_msrs_n(3)
    assert ctypes.sizeof(t) == 8 + 3 * 16 and t.entries.offset == 8
    c = abi.kvm_cpuid2_n(2)
    assert ctypes.sizeof(c) == 8 + 2 * 40 and c.entries.offset == 8
