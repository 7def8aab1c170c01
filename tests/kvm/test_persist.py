"""popek.persist on a real KVM: a whole Vm (platform devices, virtio-rng on PCI, in-kernel irqchip) running the
counting test guest is snapshotted to a directory and restored into a fresh Vm that counts on; bad snapshots are
refused without leaving KVM file descriptors behind."""

from __future__ import annotations

import os
import time

import popek_test_guests as guests  # registered by tests/kvm/conftest.py
import pytest

from popek import persist
from popek.boot.x86 import setup_long_mode
from popek.memory import GuestMemory
from popek.snapshot import SnapshotError, load_memory, read_memory_info, read_state
from popek.vm import MIN_MEMORY, Vm, VmConfig, VmError, VmState
from test_state import Recorder  # the port-write recorder the state tests use

pytestmark = pytest.mark.kvm

PORT_OUT = guests.ports()["PORT_OUT"]
# 8250 register offsets (PC16550D datasheet): IER 1, LCR 3, SCR 7.
IER, LCR, SCR = 1, 3, 7


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _tiny_vm(image, track_dirty_pages: bool = False) -> Vm:
    """A Vm whose RAM holds the counting guest instead of a kernel (the restore path's ``memory=`` skips the
    kernel load), vCPU 0 set up in long mode at its entry, and a Recorder on PORT_OUT."""
    mem = GuestMemory.x86(MIN_MEMORY)
    mem.write(image.load_address, image.data)
    vm = Vm(VmConfig(kernel="/nonexistent/tiny-guest", cmdline="tiny", memory=MIN_MEMORY, repair_syscall=False,
                     track_dirty_pages=track_dirty_pages), memory=mem)
    setup_long_mode(vm.memory, vm.vcpus[0].fd, image.load_address)
    return vm


def _attach(vm: Vm) -> Recorder:
    out = Recorder()
    vm.pio.insert(PORT_OUT, 4, out)
    return out


@pytest.fixture
def vms():
    made: list[Vm] = []
    yield made.append
    for vm in made:
        if vm.state is VmState.CREATED:
            vm.close()
        elif vm.state is not VmState.STOPPED:
            vm.stop()


def test_restored_vm_counts_on_from_the_snapshot_with_devices_and_registers_as_saved(guest_image, vms, tmp_path):
    src = _tiny_vm(guest_image("counter"))
    vms(src)
    out = _attach(src)
    src.serial.write(LCR, bytes([0x1B]))  # 8 bits, 2 stop, even parity: not the reset value
    src.serial.write(SCR, bytes([0x5A]))
    src.serial.write(IER, bytes([0x05]))
    src.rtc.write(0, bytes([0x40]))  # CMOS index 0x40 (general purpose byte), then its value
    src.rtc.write(1, bytes([0xA7]))
    src.start()
    assert out.wait(20, 10)
    src.pause()
    last = out.values[-1]
    assert out.values == list(range(1, last + 1))
    persist.snapshot(src, tmp_path / "snap")
    assert src.state is VmState.PAUSED  # a paused VM stays paused
    saved_regs = bytes(src.vcpus[0].fd.get_regs())
    devices = {name: getattr(src, name).state() for name in persist.DEVICES}
    src.stop()

    dst = persist.restore(tmp_path / "snap")
    vms(dst)
    assert dst.state is VmState.CREATED
    assert bytes(dst.vcpus[0].fd.get_regs()) == saved_regs
    for name in ("serial", "rtc", "i8042", "pci_io"):
        got, want = getattr(dst, name).state(), devices[name]
        if name == "rtc":
            assert abs(got.pop("offset") - want.pop("offset")) < 1e-3
        assert got == want, name
    assert dst.pci.state() == devices["pci"]  # host bridge and the virtio-rng transport's config space
    assert dst.serial.read(SCR, 1) == b"\x5a" and dst.serial.read(LCR, 1) == b"\x1b"
    new = _attach(dst)
    dst.start()
    assert new.wait(10, 10), dst.vcpus[0].stop_detail
    assert new.values[:10] == list(range(last + 1, last + 11))


def test_snapshot_of_a_running_vm_pauses_it_and_resumes_it_afterwards(guest_image, vms, tmp_path):
    vm = _tiny_vm(guest_image("counter"))
    vms(vm)
    out = _attach(vm)
    vm.start()
    assert out.wait(3, 10)
    snap = persist.save(vm, tmp_path / "state", tmp_path / "memory")
    assert vm.state is VmState.RUNNING
    n = len(out.values)
    assert out.wait(n + 3, 10)  # still counting
    assert snap.config.vcpu_count == 1 and snap.config.extra["memory"] == MIN_MEMORY


def test_snapshot_of_a_vm_that_never_ran_is_refused(guest_image, vms, tmp_path):
    vm = _tiny_vm(guest_image("counter"))
    vms(vm)
    with pytest.raises(VmError, match="cannot snapshot a VM that is created"):
        persist.snapshot(vm, tmp_path)
    assert not (tmp_path / "state").exists() and not (tmp_path / "memory").exists()


@pytest.fixture
def saved(guest_image, tmp_path):
    vm = _tiny_vm(guest_image("counter"))
    out = _attach(vm)
    vm.start()
    assert out.wait(3, 10)
    vm.pause()
    persist.snapshot(vm, tmp_path / "snap")
    vm.stop()
    return tmp_path / "snap"


def test_corrupt_state_file_is_refused_and_leaves_no_file_descriptor_open(saved):
    state = saved / "state"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    before = _open_fds()
    with pytest.raises(SnapshotError, match="CRC-32 mismatch"):
        persist.restore(saved)
    assert _open_fds() == before


def test_truncated_memory_file_is_refused_and_leaves_no_file_descriptor_open(saved):
    mem = saved / "memory"
    os.truncate(mem, os.path.getsize(mem) // 2)
    before = _open_fds()
    with pytest.raises(SnapshotError):
        persist.restore(saved)
    assert _open_fds() == before


def test_memory_file_of_another_snapshot_is_refused_before_any_vm_is_built(saved, guest_image, tmp_path):
    other = _tiny_vm(guest_image("counter"))
    out = _attach(other)
    other.start()
    assert out.wait(1, 10)
    persist.snapshot(other, tmp_path / "other")
    other.stop()
    os.replace(tmp_path / "other" / "memory", saved / "memory")
    before = _open_fds()
    with pytest.raises(SnapshotError, match="different snapshots"):
        persist.restore(saved)
    assert _open_fds() == before


def test_restore_with_a_missing_drive_image_fails_cleanly(saved, monkeypatch):
    real = persist._config_of

    def with_drive(summary, source):
        cfg = real(summary, source)
        cfg.drives = [persist.DriveConfig(saved / "gone.img")]
        return cfg

    monkeypatch.setattr(persist, "_config_of", with_drive)
    before = _open_fds()
    t = time.monotonic()
    with pytest.raises(VmError):
        persist.restore(saved)
    assert _open_fds() == before and time.monotonic() - t < 10


def test_vm_handle_loads_a_snapshot_paused_resumes_it_and_snapshots_it_again(saved, tmp_path):
    from popek.api.handle import VmHandle
    from popek.api.model import VmSpec

    states: list[str] = []
    h = VmHandle(VmSpec(), on_state=states.append)
    assert h.state == "Not started"
    h.snapshot_load(snapshot_path=str(saved / "state"), mem_file_path=str(saved / "memory"), resume_vm=False)
    try:
        assert h.state == "Paused" and states == ["paused"]
        out = _attach(h.vm)
        h.resume()
        assert out.wait(5, 10) and h.state == "Running"
        h.pause()
        last = out.values[-1]
        h.snapshot_create(snapshot_type="Full", snapshot_path=str(tmp_path / "s2"), mem_file_path=str(tmp_path / "m2"))
        with pytest.raises(VmError, match="needs a VM started with track_dirty_pages"):
            h.snapshot_create(snapshot_type="Diff", snapshot_path=str(tmp_path / "s3"),
                              mem_file_path=str(tmp_path / "m3"))
    finally:
        h.stop()
    g = VmHandle(VmSpec())
    g.snapshot_load(snapshot_path=str(tmp_path / "s2"), mem_file_path=str(tmp_path / "m2"), resume_vm=True)
    try:
        assert g.state == "Running"
    finally:
        g.stop()
    dst = persist.load(tmp_path / "s2", tmp_path / "m2")
    try:
        out = _attach(dst)
        dst.start()
        assert out.wait(3, 10) and out.values[:3] == [last + 1, last + 2, last + 3]
    finally:
        dst.stop()


def _ram(mem: GuestMemory) -> list[bytes]:
    return [bytes(r.map) for r in mem.regions]


def _counting(guest_image, vms) -> tuple[Vm, Recorder]:
    """The counting guest running in a Vm that tracks dirty pages, and its port recorder."""
    vm = _tiny_vm(guest_image("counter"), track_dirty_pages=True)
    vms(vm)
    out = _attach(vm)
    vm.start()
    return vm, out


def test_diff_snapshot_over_its_base_equals_the_full_snapshot_byte_for_byte(guest_image, vms, tmp_path):
    vm, out = _counting(guest_image, vms)
    assert out.wait(3, 10)
    with pytest.raises(VmError, match="take a Full snapshot first"):
        persist.snapshot(vm, tmp_path / "early", diff=True)
    persist.snapshot(vm, tmp_path / "base")  # of the running VM: the guest counts on afterwards
    assert out.wait(len(out.values) + 3, 10)
    vm.pause()
    dma = 20 << 20  # a page neither the guest nor the base touched, written by the VMM (as device DMA would be)
    vm.memory.write(dma + 100, b"written by a device")
    persist.snapshot(vm, tmp_path / "diff", diff=True)
    persist.snapshot(vm, tmp_path / "full")
    last = out.values[-1]
    live = _ram(vm.memory)
    vm.stop()

    diff, full = read_state(tmp_path / "diff" / "state"), read_state(tmp_path / "full" / "state")
    assert diff.memory.kind == "diff" and diff.memory.base_id == read_memory_info(tmp_path / "base" / "memory").id
    assert diff.config.extra[persist.BASE_MEMORY] == str(tmp_path / "base" / "memory")
    allocated = os.stat(tmp_path / "diff" / "memory").st_blocks * 512
    assert allocated < os.stat(tmp_path / "full" / "memory").st_blocks * 512  # sparse, and fewer pages than Full
    with load_memory(tmp_path / "diff" / "memory", diff.memory, base_path=tmp_path / "base" / "memory") as a, \
            load_memory(tmp_path / "full" / "memory", full.memory) as b:
        assert _ram(a) == _ram(b) == live
        assert a.read(dma + 100, 19) == b"written by a device"

    dst = persist.restore(tmp_path / "diff")  # finds its base by the path it recorded
    vms(dst)
    new = _attach(dst)
    dst.start()
    assert new.wait(3, 10) and new.values[:3] == [last + 1, last + 2, last + 3]


def test_a_second_diff_is_on_the_first_and_restores_once_that_is_merged(guest_image, vms, tmp_path):
    from popek.snapshot import merge_diff

    vm, out = _counting(guest_image, vms)
    assert out.wait(3, 10)
    persist.snapshot(vm, tmp_path / "s0")
    for d in ("s1", "s2"):
        assert out.wait(len(out.values) + 2, 10)
        vm.pause()
        persist.snapshot(vm, tmp_path / d, diff=True)
        last = out.values[-1]
        vm.resume()
    vm.stop()
    with pytest.raises(SnapshotError, match="is itself a diff"):
        persist.restore(tmp_path / "s2")
    merge_diff(tmp_path / "s0" / "memory", tmp_path / "s1" / "memory", tmp_path / "s1" / "memory")
    dst = persist.restore(tmp_path / "s2")
    vms(dst)
    new = _attach(dst)
    dst.start()
    assert new.wait(2, 10) and new.values[:2] == [last + 1, last + 2]


def test_a_failed_diff_keeps_its_pages_for_the_next_one(guest_image, vms, tmp_path):
    vm, out = _counting(guest_image, vms)
    assert out.wait(2, 10)
    persist.snapshot(vm, tmp_path / "base")
    vm.pause()
    vm.memory.write(20 << 20, b"dma")
    with pytest.raises(OSError):
        persist.save(vm, tmp_path / "s", tmp_path / "no-such-dir" / "memory", diff=True)
    persist.snapshot(vm, tmp_path / "diff", diff=True)
    live = _ram(vm.memory)
    vm.stop()
    diff = read_state(tmp_path / "diff" / "state")
    with load_memory(tmp_path / "diff" / "memory", diff.memory, base_path=tmp_path / "base" / "memory") as m:
        assert _ram(m) == live
