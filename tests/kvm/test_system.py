"""popek.kvm.system: opening /dev/kvm, flavour detection, and the VM/vCPU ioctls on a real KVM."""

from __future__ import annotations

import time

import pytest

from popek.kvm import abi
from popek.kvm.system import Debug, Hlt, Interrupted, IoOut, Kvm, KvmError, detect_flavor

# --- no KVM needed ---------------------------------------------------------------------------------------------


def test_missing_device_node_raises_kvm_error_saying_kvm_is_unavailable(tmp_path):
    with pytest.raises(KvmError, match="does not exist: KVM is not available"):
        Kvm(str(tmp_path / "kvm"))


def test_a_device_that_is_not_kvm_raises_kvm_error_naming_the_device_and_the_ioctl():
    with pytest.raises(KvmError, match=r"^/dev/null is not a KVM device: KVM_GET_API_VERSION: Inappropriate ioctl"):
        Kvm("/dev/null")


def _host(tmp_path, flags: str, pvm: bool):
    (tmp_path / "module").mkdir()
    if pvm:
        (tmp_path / "module" / "kvm_pvm").mkdir()
    (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: fpu {flags} sse2\n")
    return str(tmp_path / "module"), str(tmp_path / "cpuinfo")


def test_detect_flavor_is_kvm_pvm_when_module_loaded_and_no_vmx_or_svm(tmp_path):
    f = detect_flavor(*_host(tmp_path, "pae", pvm=True))
    assert (f.name, f.emulating_cpl0) == ("kvm_pvm", True)
    assert "kvm_pvm" in f.reason


@pytest.mark.parametrize("flag", ["vmx", "svm"])
def test_detect_flavor_is_hardware_when_cpu_has_vmx_or_svm_even_with_kvm_pvm(tmp_path, flag):
    f = detect_flavor(*_host(tmp_path, flag, pvm=True))
    assert (f.name, f.emulating_cpl0) == ("hardware", False)
    assert flag in f.reason


def test_detect_flavor_does_not_assume_emulation_without_kvm_pvm(tmp_path):
    f = detect_flavor(*_host(tmp_path, "pae", pvm=False))
    assert (f.name, f.emulating_cpl0) == ("hardware", False)


# --- on /dev/kvm -----------------------------------------------------------------------------------------------


@pytest.mark.kvm
def test_kvm_has_api_12_and_a_run_area_larger_than_kvm_run(kvm):
    assert kvm.api_version == 12
    assert kvm.vcpu_mmap_size >= abi.ctypes.sizeof(abi.kvm_run)
    assert kvm.check_extension(abi.KVM_CAP_USER_MEMORY) > 0


@pytest.mark.kvm
def test_supported_cpuid_lists_the_basic_leaves(kvm):
    leaves = {e.function for e in kvm.supported_cpuid()}
    assert {0, 1, 0x80000000} <= leaves


@pytest.mark.kvm
def test_regs_sregs_fpu_round_trip_through_the_vcpu(machine):
    fd = machine("hlt").vcpus[0]
    r = fd.get_regs()
    r.rax, r.r15 = 0x1122334455667788, 42
    fd.set_regs(r)
    assert (fd.get_regs().rax, fd.get_regs().r15) == (0x1122334455667788, 42)
    s = fd.get_sregs()
    s.cr2 = 0xDEAD000
    fd.set_sregs(s)
    assert fd.get_sregs().cr2 == 0xDEAD000
    f = fd.get_fpu()
    f.fcw = 0x27F
    f.xmm[3][0] = 0xAB
    fd.set_fpu(f)
    assert (fd.get_fpu().fcw, fd.get_fpu().xmm[3][0]) == (0x27F, 0xAB)


@pytest.mark.kvm
def test_fpu_control_state_set_through_xsave_is_what_the_guest_sees(machine):
    # KVM_SET_XSAVE legacy area: fcw at byte 0, mxcsr at byte 24, XSTATE_BV at byte 512 (x87|SSE = 3).
    # (On kvm_pvm KVM_SET_FPU did not reach the guest and KVM_GET_FPU read mxcsr as 0; XSAVE does work.)
    m = machine("fpu")
    fd = m.vcpus[0]
    xs = fd.get_xsave()
    xs.region[0] = (xs.region[0] & ~0xFFFF) | 0x27F
    xs.region[6] = 0x9F80
    xs.region[128] |= 3
    fd.set_xsave(xs)
    out = m.log("PORT_OUT")
    done = m.log("PORT_DONE")
    v = m.runner(0)
    v.start()
    assert done.wait(1, 5), v.stop_detail
    assert out.values == [0x9F80, 0x27F]


@pytest.mark.kvm
def test_msrs_round_trip_and_a_refused_msr_is_named(machine):
    fd = machine("hlt").vcpus[0]
    fd.set_msrs({0xC0000102: 0xFFFF800000001000, 0xC0000082: 0xFFFFFFFF81000000})
    assert fd.get_msrs([0xC0000102, 0xC0000082]) == {0xC0000102: 0xFFFF800000001000, 0xC0000082: 0xFFFFFFFF81000000}
    with pytest.raises(KvmError, match="MSR 0xdead0000"):
        fd.set_msrs({0xDEAD0000: 1})


@pytest.mark.kvm
def test_inject_exception_sets_an_injected_exception_in_vcpu_events(machine):
    fd = machine("hlt").vcpus[0]
    fd.inject_exception(abi.GP_VECTOR, error_code=0x18)
    ev = fd.get_vcpu_events()
    assert (ev.exception.injected, ev.exception.nr, ev.exception.has_error_code, ev.exception.error_code) == (
        1, abi.GP_VECTOR, 1, 0x18)


@pytest.mark.kvm
def test_hardware_breakpoint_via_set_guest_debug_gives_a_debug_exit_at_its_address(machine):
    m = machine("hlt")
    fd = m.vcpus[0]
    second = m.image.symbols["second"]
    fd.set_guest_debug(abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_USE_HW_BP, [second, 0, 0, 0, 0, 0, 0, 0x1])
    assert fd.run() == IoOut(0xE4, 4, 1, b"\x01\0\0\0")
    assert fd.run() == Hlt()
    ex = fd.run()
    assert isinstance(ex, Debug) and ex.exception == abi.DB_VECTOR and ex.pc == second
    assert ex.dr6 & 1  # B0: breakpoint 0 hit
    fd.set_guest_debug(0)
    assert fd.run() == IoOut(0xE4, 4, 1, b"\x02\0\0\0")


@pytest.mark.kvm
def test_immediate_exit_makes_kvm_run_return_interrupted_without_running_the_guest(machine):
    fd = machine("hlt").vcpus[0]
    rip = fd.get_regs().rip
    fd.immediate_exit = True
    assert fd.run() == Interrupted()
    assert fd.get_regs().rip == rip
    fd.immediate_exit = False
    assert isinstance(fd.run(), IoOut)


@pytest.mark.kvm
def test_complete_io_refuses_when_no_input_is_pending_or_the_length_is_wrong(machine):
    m = machine("echo")
    fd = m.vcpus[0]
    with pytest.raises(KvmError, match="not an IoIn or MmioRead"):
        fd.complete_io(b"\0\0\0\0")
    ex = fd.run()
    while type(ex).__name__ != "IoIn":
        ex = fd.run()
    with pytest.raises(ValueError, match="wants 4 bytes, got 2"):
        fd.complete_io(b"\0\0")


@pytest.mark.kvm
def test_irqchip_state_reads_the_ioapic_and_writes_back_a_redirection_entry(machine):
    m = machine("hlt", irqchip=True)
    chip = m.vm.get_irqchip(abi.KVM_IRQCHIP_IOAPIC)
    assert chip.chip.ioapic.base_address == 0xFEC00000
    chip.chip.ioapic.redirtbl[5] = 0x0000000000000035
    m.vm.set_irqchip(chip)
    assert m.vm.get_irqchip(abi.KVM_IRQCHIP_IOAPIC).chip.ioapic.redirtbl[5] == 0x35
    pic = m.vm.get_irqchip(abi.KVM_IRQCHIP_PIC_MASTER)
    pic.chip.pic.imr = 0xFB
    m.vm.set_irqchip(pic)
    assert m.vm.get_irqchip(abi.KVM_IRQCHIP_PIC_MASTER).chip.pic.imr == 0xFB


@pytest.mark.kvm
def test_pit2_state_round_trips(machine):
    m = machine("hlt", irqchip=True)
    m.vm.create_pit2()
    st = m.vm.get_pit2()
    st.channels[0].count = 0x1234
    m.vm.set_pit2(st)
    assert m.vm.get_pit2().channels[0].count == 0x1234


@pytest.mark.kvm
def test_kvmclock_advances_and_can_be_set(machine):
    vm = machine("hlt").vm
    a = vm.get_clock().clock
    time.sleep(0.01)
    assert vm.get_clock().clock > a
    c = vm.get_clock()
    c.clock += 10 ** 12
    c.flags = 0
    vm.set_clock(c)
    assert vm.get_clock().clock >= a + 10 ** 12


@pytest.mark.kvm
def test_mp_state_lapic_xsave_xcrs_debugregs_round_trip(machine):
    m = machine("hlt", irqchip=True)
    fd = m.vcpus[0]
    assert fd.get_mp_state() == abi.KVM_MP_STATE_RUNNABLE
    fd.set_mp_state(abi.KVM_MP_STATE_RUNNABLE)
    lapic = fd.get_lapic()
    assert lapic.regs[0x30] & 0xFF in range(0x10, 0x20)  # APIC version register: integrated APIC (0x1X)
    fd.set_lapic(lapic)
    xs = fd.get_xsave()
    fd.set_xsave(xs)
    xcrs = fd.get_xcrs()
    assert xcrs.nr_xcrs >= 1 and xcrs.xcrs[0].value & 1  # XCR0.x87 is always set
    fd.set_xcrs(xcrs)
    d = fd.get_debugregs()
    d.db[0] = 0x1000
    fd.set_debugregs(d)
    assert fd.get_debugregs().db[0] == 0x1000


@pytest.mark.kvm
def test_dirty_log_marks_the_page_the_guest_writes_and_resets_on_read(machine):
    m = machine("spin")
    region = m.mem.regions[0]
    m.vm.set_user_memory_region(0, region.gpa, region.size, region.host_address, abi.KVM_MEM_LOG_DIRTY_PAGES)
    npages = region.size // 4096
    m.vm.get_dirty_log(0, npages)  # start clean
    out = m.log("PORT_OUT")
    v = m.runner(0)
    v.start()
    assert out.wait(1, 5)
    time.sleep(0.01)
    v.pause()
    page = m.image.symbols["counter"] // 4096

    def dirty(bitmap: bytes, p: int) -> bool:
        return bool(bitmap[p // 8] >> (p % 8) & 1)

    first = m.vm.get_dirty_log(0, npages)
    assert len(first) == (npages + 63) // 64 * 8
    assert dirty(first, page)
    assert not dirty(m.vm.get_dirty_log(0, npages), page), "bitmap not reset while the guest is paused"
    v.resume()


@pytest.mark.kvm
def test_a_vcpu_whose_run_area_cannot_be_mapped_closes_its_fd(kvm, monkeypatch):
    import os

    from popek.kvm import system

    vm = kvm.create_vm()
    try:
        def failing_mmap(*args, **kwargs):
            raise OSError(12, "Cannot allocate memory")

        before = set(os.listdir("/proc/self/fd"))
        monkeypatch.setattr(system.mmap, "mmap", failing_mmap)
        with pytest.raises(OSError):
            vm.create_vcpu(0)
        assert set(os.listdir("/proc/self/fd")) == before
    finally:
        vm.close()
