"""The vCPU run loop: one thread per vCPU calling KVM_RUN and dispatching exits to the buses and to hooks."""

from __future__ import annotations

import collections
import signal
import threading
import time
from typing import Protocol

from popek.bus import Bus
from popek.kvm import abi
from popek.kvm.system import (Debug, FailEntry, Hlt, InternalError, Interrupted, IoIn, IoOut, MmioRead, MmioWrite,
                              Shutdown, SystemEvent, Unknown, VcpuFd)

KICK_SIGNAL = signal.SIGUSR1


def _kick_handler(signum, frame) -> None:
    """No-op: the signal only exists to make KVM_RUN return EINTR in the vCPU thread."""


def install_kick_signal() -> None:
    """Install the no-op SIGUSR1 handler (no SA_RESTART) that ``Vcpu.kick`` relies on. Call once from the main thread.

    :raises ValueError: if called from another thread (Python allows signal handlers only in the main thread).
    """
    if signal.getsignal(KICK_SIGNAL) is not _kick_handler:
        signal.signal(KICK_SIGNAL, _kick_handler)
        signal.siginterrupt(KICK_SIGNAL, True)


class VcpuHandlers(Protocol):
    """Hooks a Vcpu calls (all optional: a missing hook gets the default named in each docstring).

    Hooks run on the vCPU thread, between exits; they may use the VcpuFd (get/set regs, inject_exception, ...).
    """

    def on_internal_error(self, vcpu: "Vcpu", exit: InternalError) -> bool:
        """True = handled (e.g. instruction emulated, RIP advanced), keep running. Default: stop with "error"."""

    def on_debug(self, vcpu: "Vcpu", exit: Debug) -> bool:
        """KVM_EXIT_DEBUG; True = handled. Default: stop with "error"."""

    def on_hlt(self, vcpu: "Vcpu") -> bool:
        """KVM_EXIT_HLT (no in-kernel irqchip); True = keep running. Default: stop with "halt"."""

    def on_exit_poll(self, vcpu: "Vcpu") -> None:
        """Called after every exit (keep it cheap)."""

    def on_stop(self, vcpu: "Vcpu", reason: str, detail: str) -> None:
        """The loop ended: reason "shutdown", "system-event", "reset", "halt", "error" or "stopped"."""


class Vcpu:
    """Runs one vCPU in its own thread.

    :param fd: the vCPU fd (its registers must already hold the entry state).
    :param pio: port I/O bus (KVM_EXIT_IO; ``count > 1`` string I/O is split into ``count`` accesses).
    :param mmio: MMIO bus (KVM_EXIT_MMIO).
    :param handlers: an object with any of the ``VcpuHandlers`` hooks, or None.

    Statistics: ``exit_counts`` (Counter by exit class name: "IoIn", "IoOut", "MmioRead", "Interrupted", ...),
    ``time_in_guest`` / ``time_in_vmm`` (seconds inside / outside KVM_RUN, parked time excluded), ``samples``
    (RIPs taken by ``request_sample``). After the loop ends: ``stop_reason``, ``stop_detail``, ``error`` (the
    exception that stopped it, if any).
    """

    def __init__(self, fd: VcpuFd, pio: Bus, mmio: Bus, handlers: object | None = None):
        self.fd = fd
        self.index = fd.index
        self.pio = pio
        self.mmio = mmio
        self.handlers = handlers
        self.exit_counts: collections.Counter[str] = collections.Counter()
        self.time_in_guest = 0.0
        self.time_in_vmm = 0.0
        self.samples: list[int] = []
        self.stop_reason: str | None = None
        self.stop_detail = ""
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._kick_lock = threading.Lock()
        self._alive = False
        self._stop_req = False
        self._pause_req = False
        self._parked = False
        self._sample_lock = threading.Lock()
        self._samples_requested = 0  # advanced by request_sample (any thread)
        self._samples_served = 0  # advanced by the vCPU thread

    # control (any thread) -------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the vCPU thread.

        :raises RuntimeError: if already started, or the kick signal handler is missing and this is not the main
            thread (call ``install_kick_signal()`` from the main thread first).
        """
        if self._thread is not None:
            raise RuntimeError(f"vCPU {self.index} was already started")
        if signal.getsignal(KICK_SIGNAL) is not _kick_handler:
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError("install_kick_signal() must be called from the main thread before starting vCPUs")
            install_kick_signal()
        self._alive = True
        self._thread = threading.Thread(target=self._loop, name=f"vcpu{self.index}", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        """Make KVM_RUN return now: set kvm_run.immediate_exit, then SIGUSR1 the vCPU thread (api.rst
        KVM_CAP_IMMEDIATE_EXIT). Requests set before the kick are seen at the next exit boundary."""
        self.fd.immediate_exit = True
        with self._kick_lock:
            if self._alive and self._thread is not None and self._thread.ident is not None:
                signal.pthread_kill(self._thread.ident, KICK_SIGNAL)

    def pause(self, timeout: float | None = 10.0) -> None:
        """Park the vCPU thread outside KVM_RUN (pending I/O completed, registers consistent) and return once parked.

        Returns at once if the loop is not running. :raises TimeoutError: if it did not park within ``timeout``
        seconds (the request stays; ``resume`` cancels it); RuntimeError if called from the vCPU's own thread.
        """
        self._not_on_own_thread("pause")
        with self._cond:
            self._pause_req = True
        deadline = None if timeout is None else time.monotonic() + timeout
        self.kick()
        with self._cond:
            while not self._parked and self._alive:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"vCPU {self.index} did not park within {timeout} s")
                if not self._cond.wait(0.05 if left is None else min(left, 0.05)):
                    self.kick()  # belt and braces; one kick suffices by construction

    def resume(self) -> None:
        """Let a paused vCPU run again."""
        with self._cond:
            self._pause_req = False
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        """True while the thread is parked by ``pause``."""
        return self._parked

    def stop(self) -> None:
        """Ask the loop to end (``on_stop`` reason "stopped"); does not wait — use ``join``."""
        with self._cond:
            self._stop_req = True
            self._cond.notify_all()
        self.kick()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end; returns True if it has ended."""
        if self._thread is None:
            return True
        self._not_on_own_thread("join")
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def request_sample(self) -> None:
        """Record the guest RIP (KVM_GET_REGS) in ``samples`` at the next exit, kicking the vCPU to force one.

        For a sampling profiler that calls this at a fixed interval. Requests made before the vCPU thread could
        serve the previous one are all recorded with the RIP of the exit that serves them, so every request gives
        exactly one sample (samples keep their time weight).
        """
        with self._sample_lock:
            self._samples_requested += 1
        self.kick()

    @property
    def running(self) -> bool:
        """True from ``start`` until the loop has ended."""
        return self._alive

    def _not_on_own_thread(self, what: str) -> None:
        if self._thread is not None and threading.current_thread() is self._thread:
            raise RuntimeError(f"vCPU {self.index}: {what}() called from the vCPU's own thread would deadlock")

    # the loop (vCPU thread) ----------------------------------------------------------------------------------
    def _hook(self, name: str):
        return getattr(self.handlers, name, None) if self.handlers is not None else None

    def _loop(self) -> None:
        reason, detail = "error", "loop ended unexpectedly"
        try:
            reason, detail = self._run()
        except BaseException as e:  # never die silently: report what and where
            self.error = e
            reason, detail = "error", f"vCPU {self.index}: {type(e).__name__}: {e}"
        finally:
            with self._kick_lock:
                self._alive = False
            self.stop_reason, self.stop_detail = reason, detail
            with self._cond:
                self._cond.notify_all()
            on_stop = self._hook("on_stop")
            if on_stop is not None:
                try:
                    on_stop(self, reason, detail)
                except Exception as e:
                    self.error = self.error or e

    def _requests_pending(self) -> bool:
        return self._stop_req or self._pause_req or self._samples_requested != self._samples_served

    def _run(self) -> tuple[str, str]:
        fd, pio, mmio, counts = self.fd, self.pio, self.mmio, self.exit_counts
        poll = self._hook("on_exit_poll")
        perf = time.perf_counter
        t_out = perf()
        while True:
            if self._requests_pending():
                # Enter KVM_RUN once with immediate_exit so pending I/O completes, then act on an Interrupted exit.
                fd.immediate_exit = True
            t_in = perf()
            self.time_in_vmm += t_in - t_out
            ex = fd.run()
            t_out = perf()
            self.time_in_guest += t_out - t_in
            counts[type(ex).__name__] += 1
            if poll is not None:
                poll(self)
            cls = type(ex)
            if cls is IoOut:
                port, size, data = ex.port, ex.size, ex.data
                if ex.count == 1:
                    pio.write(port, data)
                else:
                    for i in range(0, len(data), size):
                        pio.write(port, data[i:i + size])
            elif cls is IoIn:
                if ex.count == 1:
                    fd.complete_io(pio.read(ex.port, ex.size))
                else:
                    fd.complete_io(b"".join(pio.read(ex.port, ex.size) for _ in range(ex.count)))
            elif cls is MmioWrite:
                mmio.write(ex.addr, ex.data)
            elif cls is MmioRead:
                fd.complete_io(mmio.read(ex.addr, ex.size))
            elif cls is Interrupted:
                fd.immediate_exit = False
                n = self._samples_requested - self._samples_served
                if n:
                    self.samples.extend([fd.get_regs().rip] * n)
                    self._samples_served += n
                if self._stop_req:
                    return "stopped", f"vCPU {self.index}: stop() was called"
                if self._pause_req:
                    self._park()
                    t_out = perf()
            elif cls is Hlt:
                hook = self._hook("on_hlt")
                if hook is None or not hook(self):
                    return "halt", f"vCPU {self.index}: guest executed HLT with no in-kernel irqchip to wake it"
            elif cls is InternalError:
                hook = self._hook("on_internal_error")
                if hook is None or not hook(self, ex):
                    return "error", f"vCPU {self.index}: {describe_internal_error(ex)}"
            elif cls is Debug:
                hook = self._hook("on_debug")
                if hook is None or not hook(self, ex):
                    return "error", (f"vCPU {self.index}: unhandled KVM_EXIT_DEBUG exception {ex.exception} at "
                                     f"rip {ex.pc:#x} (dr6 {ex.dr6:#x}, dr7 {ex.dr7:#x})")
            elif cls is Shutdown:
                return "shutdown", f"vCPU {self.index}: KVM_EXIT_SHUTDOWN (triple fault) at rip {fd.get_regs().rip:#x}"
            elif cls is SystemEvent:
                name = {abi.KVM_SYSTEM_EVENT_SHUTDOWN: "shutdown", abi.KVM_SYSTEM_EVENT_RESET: "reset",
                        abi.KVM_SYSTEM_EVENT_CRASH: "crash"}.get(ex.type, f"type {ex.type}")
                if ex.type == abi.KVM_SYSTEM_EVENT_RESET:
                    return "reset", f"vCPU {self.index}: KVM_EXIT_SYSTEM_EVENT reset (flags {ex.flags:#x})"
                return "system-event", f"vCPU {self.index}: KVM_EXIT_SYSTEM_EVENT {name} (flags {ex.flags:#x})"
            elif cls is FailEntry:
                return "error", (f"vCPU {self.index}: KVM_EXIT_FAIL_ENTRY, hardware entry failure reason "
                                 f"{ex.reason:#x} on cpu {ex.cpu}")
            else:
                assert cls is Unknown
                return "error", (f"vCPU {self.index}: unhandled exit KVM_EXIT_"
                                 f"{abi.EXIT_REASON_NAMES.get(ex.reason, ex.reason)} (hardware reason "
                                 f"{ex.hardware_reason:#x})")

    def _park(self) -> None:
        with self._cond:
            self._parked = True
            self._cond.notify_all()
            while self._pause_req and not self._stop_req:
                self._cond.wait()
            self._parked = False


def describe_internal_error(ex: InternalError) -> str:
    """One line for a KVM_EXIT_INTERNAL_ERROR: suberror name, instruction bytes (if given) and data words."""
    names = {abi.KVM_INTERNAL_ERROR_EMULATION: "emulation failure", abi.KVM_INTERNAL_ERROR_SIMUL_EX:
             "simultaneous exceptions", abi.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed",
             abi.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected exit reason"}
    s = f"KVM_EXIT_INTERNAL_ERROR suberror {ex.suberror} ({names.get(ex.suberror, 'unknown')})"
    if ex.insn_bytes is not None:
        s += f", instruction bytes {ex.insn_bytes.hex(' ') or '(none)'}"
    if ex.data:
        s += ", data " + " ".join(f"{d:#x}" for d in ex.data)
    return s
