"""Tiny guests run by popek.vcpu.Vcpu: port I/O, MMIO, HLT, irqchip interrupts, SMP, kick/pause/resume, shutdown."""

from __future__ import annotations

import threading
import time

import pytest

from popek.boot.x86 import setup_lapic
from popek.kvm import abi
from popek.kvm.system import Hlt, InternalError, IoOut, detect_flavor

pytestmark = pytest.mark.kvm


class Stops:
    """Handlers object recording on_stop calls."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.done = threading.Event()

    def on_stop(self, vcpu, reason, detail):
        self.calls.append((reason, detail))
        self.done.set()


def _run_until(machine_, log, n, handlers=None, timeout=5.0):
    v = machine_.runner(0, handlers)
    v.start()
    ok = log.wait(n, timeout)
    return v, ok


def test_port_io_guest_echoes_values_read_from_a_port_and_does_string_io(machine):
    m = machine("echo")
    feed = m.feed("PORT_IN", [0x11223344, 0xDEADBEEF, 0])
    out = m.log("PORT_OUT")
    text = m.log("PORT_STR_OUT")
    m.feed("PORT_STR_IN", [0x0101, 0x0202, 0x0303, 0x0404])
    result = m.log("PORT_RESULT")
    done = m.log("PORT_DONE")
    stops = Stops()
    v, ok = _run_until(m, done, 1, stops)
    assert ok, f"guest did not finish: {stops.calls or v.exit_counts}"
    v.stop()
    assert v.join(5)
    assert out.values == [0x11223344, 0xDEADBEEF, 0]
    assert feed.reads == 3
    assert b"".join(text.raw) == b"popek!"  # rep outsb: every byte reaches the bus, whatever count KVM used
    assert result.values == [0x02020101, 0x04040303]  # rep insw: 4 words delivered in order
    assert stops.calls[0][0] == "stopped"
    assert v.exit_counts["IoOut"] >= 6 and v.exit_counts["IoIn"] >= 2


def test_mmio_writes_and_reads_outside_guest_ram_reach_the_mmio_bus(machine):
    m = machine("mmio")

    class Dev:
        def __init__(self):
            self.writes, self.reads = [], []

        def read(self, offset, size):
            self.reads.append((offset, size))
            return bytes(range(offset, offset + size))

        def write(self, offset, data):
            self.writes.append((offset, data))

    dev = Dev()
    m.mmio.insert(0x10000000, 0x1000, dev)
    out = m.log("PORT_OUT")
    done = m.log("PORT_DONE")
    v, ok = _run_until(m, done, 1)
    assert ok, v.stop_detail
    assert dev.writes == [(0, (0x12345678).to_bytes(4, "little")), (8, (0x0123456789ABCDEF).to_bytes(8, "little")),
                          (3, b"\xab")]
    assert dev.reads == [(0x10, 4), (0x18, 8), (0x20, 1)]
    assert out.values == [0x13121110, 0x1B1A1918, 0x1F1E1D1C, 0x20]


def test_hlt_without_irqchip_ends_kvm_run_with_kvm_exit_hlt(machine):
    m = machine("hlt")
    fd = m.vcpus[0]
    exits = [fd.run() for _ in range(4)]
    assert exits == [IoOut(0xE4, 4, 1, b"\x01\0\0\0"), Hlt(), IoOut(0xE4, 4, 1, b"\x02\0\0\0"), Hlt()]


def test_on_hlt_hook_true_continues_and_false_stops_with_reason_halt(machine):
    m = machine("hlt")
    out = m.log("PORT_OUT")
    seen = []

    class H(Stops):
        def on_hlt(self, vcpu):
            seen.append(len(out.values))
            return len(seen) == 1

    h = H()
    v = m.runner(0, h)
    v.start()
    assert h.done.wait(5)
    assert out.values == [1, 2] and seen == [1, 2]
    assert h.calls[0][0] == "halt"


def test_ioapic_interrupt_from_kvm_irq_line_runs_guest_handler_while_at_cpl3(machine):
    m = machine("irq", irqchip=True)
    setup_lapic(m.vcpus[0])
    out = m.log("PORT_OUT")
    irq = m.log("PORT_IRQ")
    v, ok = _run_until(m, out, 1)
    assert ok and out.values == [ord("R")], v.stop_detail
    for n in (1, 2, 3):  # edge-triggered IOAPIC pin 20 -> vector 0x30; the handler EOIs so each edge is delivered
        m.vm.irq_line(20, 1)
        m.vm.irq_line(20, 0)
        assert irq.wait(n, 5), f"interrupt {n} not delivered: {v.stop_detail or v.exit_counts}"
    assert irq.values == [1, 2, 3]
    assert v.running


def test_two_vcpus_run_at_the_same_time(machine):
    # Each vCPU waits in a spin barrier for the other before writing its id: this ends only if both run together.
    m = machine("smp", vcpus=2)
    out = m.log("PORT_OUT")
    handlers = [Stops(), Stops()]
    runners = [m.runner(i, handlers[i]) for i in range(2)]
    for r in runners:
        r.start()
    assert out.wait(2, 10), f"barrier not passed: {[r.exit_counts for r in runners]}"
    assert sorted(out.values) == [0, 1]
    for h in handlers:
        assert h.done.wait(5) and h.calls[0][0] == "halt"
    assert m.read_u64("arrived") & 0xFFFFFFFF == 2


def _spinning(machine):
    m = machine("spin")
    out = m.log("PORT_OUT")
    stops = Stops()
    v, ok = _run_until(m, out, 1, stops)
    assert ok, v.stop_detail
    return m, v, stops


def test_pause_parks_the_vcpu_outside_kvm_run_and_resume_continues_it(machine):
    m, v, _ = _spinning(machine)
    time.sleep(0.02)
    v.pause()
    assert v.paused
    before = m.read_u64("counter")
    time.sleep(0.05)
    assert m.read_u64("counter") == before, "guest ran while paused"
    rip = m.vcpus[0].get_regs().rip  # the vCPU thread is parked, so its fd may be used here
    assert m.image.symbols["spin_loop"] <= rip < m.image.symbols["spin_end"]
    assert m.vcpus[0].get_sregs().cs.dpl == 3
    v.resume()
    deadline = time.monotonic() + 5
    while m.read_u64("counter") == before and time.monotonic() < deadline:
        time.sleep(0.005)
    assert m.read_u64("counter") > before, "guest did not continue after resume"
    assert not v.paused


def test_kick_interrupts_kvm_run_and_the_loop_keeps_running(machine):
    m, v, stops = _spinning(machine)
    before = v.exit_counts["Interrupted"]
    v.kick()
    deadline = time.monotonic() + 5
    while v.exit_counts["Interrupted"] == before and time.monotonic() < deadline:
        time.sleep(0.005)
    assert v.exit_counts["Interrupted"] > before, "the kick did not end KVM_RUN"
    assert v.running and not stops.calls
    assert v.time_in_guest > 0 and v.time_in_vmm > 0


def test_request_sample_records_the_guest_rip_of_the_spin_loop(machine):
    m, v, _ = _spinning(machine)
    for _ in range(5):
        v.request_sample()
        time.sleep(0.01)
    deadline = time.monotonic() + 5
    while len(v.samples) < 5 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(v.samples) == 5  # one sample per request, even when the host delays the vCPU thread
    lo, hi = m.image.symbols["spin_loop"], m.image.symbols["spin_end"]
    assert all(lo <= rip < hi for rip in v.samples), [hex(r) for r in v.samples]


def test_stop_ends_the_loop_with_reason_stopped(machine):
    m, v, stops = _spinning(machine)
    v.stop()
    assert v.join(5)
    assert stops.calls == [("stopped", "vCPU 0: stop() was called")]
    assert not v.running and v.stop_reason == "stopped"


def test_triple_fault_stops_the_loop_with_reason_shutdown(machine):
    m = machine("triple")
    stops = Stops()
    v = m.runner(0, stops)
    v.start()
    assert v.join(5)
    assert [r for r, _ in stops.calls] == ["shutdown"]
    assert "KVM_EXIT_SHUTDOWN" in stops.calls[0][1]


def test_exception_in_a_device_stops_the_loop_with_reason_error_and_the_message(machine):
    m = machine("echo")
    m.feed("PORT_IN", [5])  # the guest's second read finds no value: IndexError in the device
    m.log("PORT_OUT")
    stops = Stops()
    v = m.runner(0, stops)
    v.start()
    assert v.join(5)
    reason, detail = stops.calls[0]
    assert reason == "error" and "IndexError" in detail
    assert isinstance(v.error, IndexError)


def test_guest_exception_reported_by_the_guest_runtime_stops_with_error(machine):
    # The spin guest's IDT reports exceptions on FAULT_PORT; inject #UD at CPL 3 through KVM_SET_VCPU_EVENTS.
    m, v, stops = _spinning(machine)
    v.pause()
    m.vcpus[0].inject_exception(abi.UD_VECTOR)
    v.resume()
    assert v.join(5)
    reason, detail = stops.calls[0]
    assert reason == "error" and "vector 6" in detail, detail


@pytest.mark.skipif(not detect_flavor().emulating_cpl0, reason="only a CPL 0 emulator fails on cmpxchg16b")
def test_emulation_failure_is_an_internal_error_with_instruction_bytes_and_the_hook_can_resume(machine):
    m = machine("emufail")
    out = m.log("PORT_OUT")
    seen: list[InternalError] = []

    class H(Stops):
        def on_internal_error(self, vcpu, exit):
            seen.append(exit)
            regs = vcpu.fd.get_regs()
            regs.rip = m.image.symbols["after"]  # skip the instruction, as an emulating handler would
            vcpu.fd.set_regs(regs)
            return True

    h = H()
    v = m.runner(0, h)
    v.start()
    assert h.done.wait(5)
    assert len(seen) == 1
    assert seen[0].suberror == abi.KVM_INTERNAL_ERROR_EMULATION
    assert seen[0].insn_bytes[:4] == bytes.fromhex("f0480fc7")
    assert out.values == [1] and h.calls[0][0] == "halt"


def test_unhandled_emulation_failure_stops_with_error_naming_the_bytes(machine):
    if not detect_flavor().emulating_cpl0:
        pytest.skip("only a CPL 0 emulator fails on cmpxchg16b")
    m = machine("emufail")
    stops = Stops()
    v = m.runner(0, stops)
    v.start()
    assert v.join(5)
    reason, detail = stops.calls[0]
    assert reason == "error" and "emulation failure" in detail and "f0 48 0f c7" in detail
