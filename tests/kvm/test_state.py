"""popek.state and popek.snapshot on a real KVM: a counting guest saved, restored into a fresh VM (new /dev/kvm fd)
and cloned continues exactly where it stopped; irqchip routing survives; diff snapshots; unsupported state named."""

from __future__ import annotations

import struct
import threading
import time

import popek_test_guests as guests  # registered by tests/kvm/conftest.py
import pytest

from popek.boot import layout
from popek.boot.x86 import setup_lapic, setup_long_mode
from popek.bus import Bus
from popek.kvm import abi
from popek.kvm.system import KVM_CAP_TSC_CONTROL, Kvm
from popek.memory import PAGE_SIZE, GuestMemory
from popek.snapshot import (MemoryInfo, Snapshot, VmSummary, check_host, cpu_fingerprint, dirty_bitmaps,
                            load_memory, merge_diff, read_state, write_diff_memory, write_memory, write_state)
from popek.state import (StateError, StateUnsupported, VcpuState, restore_vcpu, restore_vm, save_vcpu, save_vm,
                         state_support)
from popek.vcpu import Vcpu, install_kick_signal

pytestmark = pytest.mark.kvm

PORTS = guests.ports()
MEM_SIZE = 2 << 20
BAD_REPORT = 0xFFFFFFFF  # counter.S: the three copies of the report number disagree


class Recorder:
    """Bus device: every write as an int; ``wait(n)`` blocks until n writes arrived; reads are 0xff."""

    def __init__(self):
        self.values: list[int] = []
        self._cond = threading.Condition()

    def read(self, offset, size):
        return b"\xff" * size

    def write(self, offset, data):
        with self._cond:
            self.values.append(int.from_bytes(data, "little"))
            self._cond.notify_all()

    def wait(self, n, timeout=10.0):
        with self._cond:
            return self._cond.wait_for(lambda: len(self.values) >= n, timeout)


class TestVm:
    """A one-vCPU VM on its own /dev/kvm fd with in-kernel irqchip and PIT over ``mem`` (slot i = region i)."""

    __test__ = False

    def __init__(self, mem: GuestMemory, dirty_log: bool = False):
        install_kick_signal()
        self.kvm = Kvm()
        self.mem = mem
        self.vm = self.kvm.create_vm()
        self.vm.set_tss_addr(layout.KVM_TSS_ADDR)
        self.vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        self.vm.create_irqchip()
        self.vm.create_pit2()
        for slot, r in enumerate(mem.regions):
            self.vm.set_user_memory_region(slot, r.gpa, r.size, r.host_address,
                                           abi.KVM_MEM_LOG_DIRTY_PAGES if dirty_log else 0)
        self.fd = self.vm.create_vcpu(0)
        self.out, self.irq, self.faults = Recorder(), Recorder(), Recorder()
        pio = Bus("pio")
        for port, dev in (("PORT_OUT", self.out), ("PORT_IRQ", self.irq), ("FAULT_PORT", self.faults)):
            pio.insert(PORTS[port], 4, dev)
        self.runner = Vcpu(self.fd, pio, Bus("mmio"))

    @classmethod
    def boot(cls, image, **kw) -> "TestVm":
        mem = GuestMemory.x86(MEM_SIZE)
        mem.write(image.load_address, image.data)
        t = cls(mem, **kw)
        setup_long_mode(mem, t.fd, image.load_address)
        setup_lapic(t.fd)
        return t

    def run_until(self, n: int) -> None:
        if not self.runner.running:
            self.runner.start()
        assert self.out.wait(n), (f"guest reported {self.out.values[-3:]} after {len(self.out.values)} reports; "
                                  f"faults {self.faults.values}, stop {self.runner.stop_detail}")

    def save(self) -> tuple:
        """Pause and read VM + vCPU state (the vCPU thread stays parked)."""
        self.runner.pause()
        return save_vm(self.vm), save_vcpu(self.fd)

    def restore(self, vm_state, vcpu_state) -> "TestVm":
        restore_vm(self.vm, vm_state)
        restore_vcpu(self.fd, vcpu_state)
        return self

    def close(self) -> None:
        if self.runner.running:
            self.runner.stop()
            self.runner.join(5)
        self.fd.close()
        self.vm.close()
        self.kvm.close()
        self.mem.close()


@pytest.fixture
def vms():
    made: list[TestVm] = []

    def make(t: TestVm) -> TestVm:
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def _copy_memory(mem: GuestMemory) -> GuestMemory:
    new = GuestMemory([(r.gpa, r.size) for r in mem.regions])
    for r in mem.regions:
        new.write(r.gpa, r.map[:])
    return new


def _counted(src: TestVm, n: int) -> int:
    """Run to at least n reports, check they are 1, 2, 3, ... and return the last one."""
    src.run_until(n)
    vals = list(src.out.values)
    assert vals == list(range(1, len(vals) + 1)), vals[:10]
    return vals[-1]


def _continues(dst: TestVm, last: int, n: int = 10) -> None:
    dst.run_until(n)
    assert dst.out.values[:n] == list(range(last + 1, last + 1 + n)), (last, dst.out.values[:n], dst.faults.values)


def _snapshot(t: TestVm, vm_st, cpu_st, memory: MemoryInfo) -> Snapshot:
    return Snapshot(VmSummary([(r.gpa, r.size) for r in t.mem.regions], 1, "counter"),
                    cpu_fingerprint(t.kvm.supported_cpuid()), vm_st, [cpu_st], {"ports": {"out": b"\x01"}}, memory)


def test_restored_vm_continues_counting_with_no_lost_or_repeated_report(guest_image, vms):
    src = vms(TestVm.boot(guest_image("counter")))
    _counted(src, 20)
    vm_st, cpu_st = src.save()
    last = src.out.values[-1]
    time.sleep(0.05)
    assert src.out.values[-1] == last  # parked: no more reports
    mem = _copy_memory(src.mem)
    src.close()
    # through the serialized form, as a snapshot file carries it
    dst = vms(TestVm(mem).restore(type(vm_st).from_dict(vm_st.to_dict()), VcpuState.from_dict(cpu_st.to_dict())))
    _continues(dst, last)


def test_restore_from_snapshot_files_continues_and_leaves_the_memory_file_unchanged(guest_image, vms, tmp_path):
    image = guest_image("counter")
    src = vms(TestVm.boot(image))
    _counted(src, 20)
    vm_st, cpu_st = src.save()
    last = src.out.values[-1]
    counter = image.symbols["counter"]
    saved = src.mem.read_u64(counter)  # the pause may land anywhere in a period
    assert last << 16 <= saved <= (last + 1) << 16
    info = write_memory(tmp_path / "mem", src.mem)
    write_state(tmp_path / "state", _snapshot(src, vm_st, cpu_st, info))
    src.close()

    snap = read_state(tmp_path / "state")
    kvm = Kvm()
    check_host(snap, kvm.supported_cpuid())
    kvm.close()
    assert snap.devices == {"ports": {"out": b"\x01"}}
    dst = vms(TestVm(load_memory(tmp_path / "mem", snap.memory)).restore(snap.vm, snap.vcpus[0]))
    _continues(dst, last)
    with open(tmp_path / "mem", "rb") as f:  # MAP_PRIVATE: the guest's writes did not reach the file
        f.seek(counter)
        assert struct.unpack("<Q", f.read(8))[0] == saved
    assert dst.mem.read_u64(counter) >= (last + 10) << 16


def test_two_clones_from_one_snapshot_count_on_independently(guest_image, vms, tmp_path):
    src = vms(TestVm.boot(guest_image("counter")))
    _counted(src, 10)
    vm_st, cpu_st = src.save()
    last = src.out.values[-1]
    info = write_memory(tmp_path / "mem", src.mem)
    write_state(tmp_path / "state", _snapshot(src, vm_st, cpu_st, info))
    src.close()
    snap = read_state(tmp_path / "state")
    a = vms(TestVm(load_memory(tmp_path / "mem", snap.memory)).restore(snap.vm, snap.vcpus[0]))
    b = vms(TestVm(load_memory(tmp_path / "mem", snap.memory)).restore(snap.vm, snap.vcpus[0]))
    _continues(a, last, 30)
    a.runner.pause()
    _continues(b, last, 5)  # b starts from the snapshot, not from a's progress


def test_diff_snapshot_on_a_full_base_restores_the_later_state(guest_image, vms, tmp_path):
    image = guest_image("counter")
    src = vms(TestVm.boot(image, dirty_log=True))
    _counted(src, 10)
    src.save()
    dirty_bitmaps(src.vm, src.mem)  # reset KVM's log at the base snapshot
    base = write_memory(tmp_path / "base", src.mem)
    src.runner.resume()
    _counted(src, len(src.out.values) + 10)
    vm_st, cpu_st = src.save()
    last = src.out.values[-1]
    maps = dirty_bitmaps(src.vm, src.mem)
    dirty = [p for p in range(MEM_SIZE // PAGE_SIZE) if maps[0][p >> 3] >> (p & 7) & 1]
    assert image.symbols["counter"] // PAGE_SIZE in dirty and len(dirty) < 16, dirty
    diff = write_diff_memory(tmp_path / "diff", src.mem, maps, base)
    write_state(tmp_path / "state", _snapshot(src, vm_st, cpu_st, diff))
    src.close()

    snap = read_state(tmp_path / "state")
    dst = vms(TestVm(load_memory(tmp_path / "diff", snap.memory, base_path=tmp_path / "base")))
    _continues(dst.restore(snap.vm, snap.vcpus[0]), last)
    merge_diff(tmp_path / "base", tmp_path / "diff", tmp_path / "merged")
    merged = vms(TestVm(load_memory(tmp_path / "merged", snap.memory)).restore(snap.vm, snap.vcpus[0]))
    _continues(merged, last)


def test_restored_ioapic_route_and_lapic_still_deliver_interrupts_to_the_guest(guest_image, vms):
    src = vms(TestVm.boot(guest_image("irq")))
    src.run_until(1)  # 'R': the guest programmed IOAPIC pin 20 and enabled its LAPIC
    for n in (1, 2):
        src.vm.irq_line(20, 1)
        src.vm.irq_line(20, 0)
        assert src.irq.wait(n, 5), src.faults.values
    vm_st, cpu_st = src.save()
    mem = _copy_memory(src.mem)
    src.close()
    dst = vms(TestVm(mem).restore(vm_st, cpu_st))
    dst.runner.start()
    dst.vm.irq_line(20, 1)
    dst.vm.irq_line(20, 0)
    assert dst.irq.wait(1, 5), (dst.faults.values, dst.runner.stop_detail)
    assert dst.irq.values == [3]  # the handler's count lives in guest memory: it goes on from 2


def test_saved_state_holds_tsc_and_the_kvm_msr_list_and_lapic(guest_image, vms):
    src = vms(TestVm.boot(guest_image("counter")))
    _counted(src, 3)
    _, st = src.save()
    listed = set(src.kvm.get_msr_index_list())
    assert 0x10 in st.msrs and st.msrs[0x10] > 0  # MSR_IA32_TSC after running
    assert listed & set(st.msrs) == {i for i in listed if i in st.msrs} and len(listed & set(st.msrs)) > 10
    assert 0x2FF in st.msrs  # MTRR def type: not in KVM's list, saved anyway
    assert st.lapic is not None and len(st.xsave) >= 4096
    assert st.regs.r12 in (src.out.values[-1], src.out.values[-1] + 1)  # paused before or after its out


def test_every_state_ioctl_popek_needs_is_supported_here(guest_image, vms, capsys):
    t = vms(TestVm.boot(guest_image("counter")))
    support = state_support(t.fd)
    with capsys.disabled():
        print("\nstate ioctls on this KVM:", *(f"  {k}: {v}" for k, v in support.items()), sep="\n")
    needed = ["KVM_GET_CPUID2", "KVM_GET_MP_STATE", "KVM_GET_REGS", "KVM_GET_SREGS", "KVM_GET_XSAVE", "KVM_GET_XCRS",
              "KVM_GET_DEBUGREGS", "KVM_GET_VCPU_EVENTS", "KVM_GET_CLOCK", "KVM_GET_LAPIC", "KVM_GET_IRQCHIP",
              "KVM_GET_PIT2", "KVM_GET_MSRS"]
    assert {k: support[k] for k in needed} == {k: "ok" for k in needed}


def test_restore_refuses_an_xsave_area_of_another_size(guest_image, vms):
    t = vms(TestVm.boot(guest_image("counter")))
    st = save_vcpu(t.fd)
    st.xsave += bytes(64)
    fresh = vms(TestVm(GuestMemory.x86(MEM_SIZE)))
    with pytest.raises(StateError, match=r"XSAVE area is 4160 bytes, this VM's is 4096"):
        restore_vcpu(fresh.fd, st)


def test_restore_names_kvm_set_tsc_khz_when_kvm_cannot_run_the_saved_tsc_frequency(guest_image, vms):
    t = vms(TestVm.boot(guest_image("counter")))
    if t.vm.check_extension(KVM_CAP_TSC_CONTROL) > 0:
        pytest.skip("this KVM scales the TSC, so any saved frequency can be set")
    st = save_vcpu(t.fd)
    st.tsc_khz = 1000  # far below the host's: without TSC scaling KVM cannot slow the TSC down
    fresh = vms(TestVm(GuestMemory.x86(MEM_SIZE)))
    with pytest.raises(StateUnsupported, match=r"^KVM_SET_TSC_KHZ: the guest TSC ran at 1000 kHz") as e:
        restore_vcpu(fresh.fd, st)
    assert e.value.ioctl == "KVM_SET_TSC_KHZ"


def test_save_vcpu_without_irqchip_names_kvm_get_lapic_when_asked_for_the_lapic(machine):
    m = machine("hlt")  # no in-kernel irqchip: no LAPIC to read
    with pytest.raises(StateUnsupported, match=r"^KVM_GET_LAPIC: ") as e:
        save_vcpu(m.vcpus[0])
    assert e.value.ioctl == "KVM_GET_LAPIC"
    assert save_vcpu(m.vcpus[0], irqchip=False).lapic is None


def test_restore_writes_back_the_saved_msrs_and_the_guest_tsc_goes_on_from_the_saved_value(guest_image, vms):
    src = vms(TestVm.boot(guest_image("counter")))
    lstar, kgs, tsc = 0xFFFF_8000_1234_5000, 0xFFFF_8880_0000_1000, 1 << 50
    src.fd.set_msrs({0xC0000082: lstar, 0xC0000102: kgs, 0x10: tsc})  # MSR_LSTAR, MSR_KERNEL_GS_BASE, MSR_IA32_TSC
    _counted(src, 3)
    vm_st, st = src.save()
    mem = _copy_memory(src.mem)
    src.close()
    dst = vms(TestVm(mem).restore(vm_st, st))
    got = dst.fd.get_msrs([0xC0000082, 0xC0000102, 0x10])
    assert (got[0xC0000082], got[0xC0000102]) == (lstar, kgs)
    assert st.msrs[0x10] <= got[0x10] < st.msrs[0x10] + 60 * 1000 * st.tsc_khz  # the saved TSC, not the host's
    stable = [i for i in st.msrs if i != 0x10]
    assert dst.fd.get_msrs(stable) == {i: st.msrs[i] for i in stable}
