"""16550A UART (8250 family): its eight registers, 16-byte receive FIFO, interrupt identification, host input."""

from __future__ import annotations

import threading
from collections import deque
from typing import Callable

from popek.irq import IrqLine

# Register offsets (PC16550D datasheet, Table II "Register Summary"). DLAB = LCR bit 7 switches offsets 0 and 1.
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_ERBFI = 0x01  # received data available
IER_ETBEI = 0x02  # transmitter holding register empty
IER_ELSI = 0x04  # receiver line status
IER_EDSSI = 0x08  # modem status

IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_CTI = 0x0C  # character timeout (FIFO mode)
IIR_FIFO_ENABLED = 0xC0

FCR_FE = 0x01
FCR_RFR = 0x02  # receiver FIFO reset
FCR_XFR = 0x04  # transmitter FIFO reset
FCR_DMA = 0x08
FCR_TRIGGER = 0xC0

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10

LSR_DR = 0x01
LSR_OE = 0x02
LSR_PE = 0x04
LSR_FE = 0x08
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

FIFO_SIZE = 16
#: Receiver FIFO trigger levels selected by FCR bits 7:6.
RX_TRIGGER = (1, 4, 8, 14)
#: Host input waiting for room in the receiver FIFO, in bytes; input beyond it is dropped (and counted).
INPUT_LIMIT = 64 * 1024

_STATE_KEYS = ("ier", "fcr", "lcr", "mcr", "lsr", "msr", "scr", "dll", "dlm", "rbr", "thr_ipending", "rx_fifo", "input")


class Serial:
    """A 16550A UART on an 8-port range, after the PC16550D datasheet (register summary, Table IV interrupt control).

    The transmitter is infinitely fast: a byte written to THR goes to ``out`` at once (unbuffered), so LSR.THRE and
    LSR.TEMT always read 1 and the THR-empty interrupt becomes pending again right after each THR write (the line
    drops and rises: a fresh edge). The THR-empty interrupt is also raised when IER.ETBEI goes from 0 to 1 (Linux's
    8250 driver tests for that, UART_BUG_THRE); reading IIR clears it when it is the reported source.
    Host input (``enqueue_input``) waits in a bounded buffer and moves into the 16-byte receiver FIFO (1 byte with
    FCR.FE clear) as the guest reads RBR, so it is never overrun; loopback (MCR.LOOP) disconnects it. In FIFO mode
    data below the trigger level reports the character-timeout interrupt at once (no timer is modelled).
    The interrupt output goes to ``irq`` as a level, gated by MCR.OUT2 as on PCs (and off in loopback, where the chip
    forces its OUT2 pin inactive). Modem inputs: CTS, DSR and DCD asserted, RI not; in loopback they follow
    RTS, DTR, OUT2 and OUT1. Thread-safe: registers may be accessed while another thread enqueues input.

    :param irq: the UART's interrupt line (COM1: ISA IRQ 4).
    :param out: called with each chunk of transmitted bytes (guest output), from the accessing vCPU thread.
    :param input_limit: bytes of host input held before further input is dropped.
    """

    def __init__(self, irq: IrqLine, out: Callable[[bytes], None], input_limit: int = INPUT_LIMIT):
        self._irq = irq
        self._out = out
        self.input_limit = input_limit
        self.dropped = 0
        self._lock = threading.RLock()
        self.ier = self.lcr = self.mcr = self.fcr = self.scr = self.dlm = self.rbr = 0
        self.dll = 12  # 9600 baud from the 1.8432 MHz crystal
        self.lsr = LSR_THRE | LSR_TEMT
        self.msr = MSR_DCD | MSR_DSR | MSR_CTS
        self.thr_ipending = False
        self._rx: deque[int] = deque()
        self._input = bytearray()
        self._level = False

    # ---- bus interface -------------------------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """Read ``size`` consecutive registers from ``offset`` (0-7). :raises ValueError: outside the 8 registers."""
        self._check(offset, size)
        with self._lock:
            return bytes(self._read_reg(offset + i) for i in range(size))

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` to consecutive registers from ``offset`` (0-7). :raises ValueError: outside the registers."""
        self._check(offset, len(data))
        tx = bytearray()
        with self._lock:
            for i, value in enumerate(data):
                self._write_reg(offset + i, value, tx)
        if tx:
            self._out(bytes(tx))

    def enqueue_input(self, data: bytes) -> int:
        """Queue host input for the guest (thread-safe). Returns how many bytes were accepted; the rest are dropped
        (counted in ``dropped``) because the buffer already holds ``input_limit`` bytes."""
        with self._lock:
            take = bytes(data[: max(0, self.input_limit - len(self._input))])
            self.dropped += len(data) - len(take)
            self._input += take
            self._fill_rx()
            self._update_irq()
            return len(take)

    # ---- registers -----------------------------------------------------------------------------------------------

    @staticmethod
    def _check(offset: int, size: int) -> None:
        if offset < 0 or offset + size > 8:
            raise ValueError(f"serial: access of {size} bytes at offset {offset} is outside the 8 UART registers")

    def _read_reg(self, reg: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if reg == RBR:
            if dlab:
                return self.dll
            if self._rx:
                self.rbr = self._rx.popleft()
                self._fill_rx()
                self._update_irq()
            return self.rbr
        if reg == IER:
            return self.dlm if dlab else self.ier
        if reg == IIR:
            iid = self._iid()
            if iid == IIR_THRI:
                self.thr_ipending = False
                self._update_irq()
            return iid | (IIR_FIFO_ENABLED if self.fcr & FCR_FE else 0)
        if reg == LCR:
            return self.lcr
        if reg == MCR:
            return self.mcr
        if reg == LSR:
            value = self._lsr()
            self.lsr &= ~LSR_ERRORS
            self._update_irq()
            return value
        if reg == MSR:
            value = self.msr
            self.msr &= 0xF0
            self._update_irq()
            return value
        return self.scr

    def _write_reg(self, reg: int, value: int, tx: bytearray) -> None:
        dlab = self.lcr & LCR_DLAB
        if reg == THR:
            if dlab:
                self.dll = value
                return
            if self.mcr & MCR_LOOP:
                self._push_rx(value)
            else:
                tx.append(value)
            self.thr_ipending = False
            self._update_irq()
            # The byte left the (infinitely fast) transmitter: THR is empty again.
            self.thr_ipending = bool(self.ier & IER_ETBEI)
            self._update_irq()
        elif reg == IER:
            if dlab:
                self.dlm = value
                return
            changed = (self.ier ^ value) & 0x0F
            self.ier = value & 0x0F
            if changed & IER_ETBEI:
                self.thr_ipending = bool(self.ier & IER_ETBEI)
            self._update_irq()
        elif reg == FCR:
            if (self.fcr ^ value) & FCR_FE or value & FCR_RFR:
                self._rx.clear()
            self.fcr = value & (FCR_TRIGGER | FCR_DMA | FCR_FE)
            self._fill_rx()
            self._update_irq()
        elif reg == LCR:
            self.lcr = value
        elif reg == MCR:
            self.mcr = value & 0x1F
            self._update_msr()
            self._fill_rx()
            self._update_irq()
        elif reg == SCR:
            self.scr = value
        # LSR and MSR writes (factory test) are ignored.

    def _lsr(self) -> int:
        return self.lsr | LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0)

    def _rx_capacity(self) -> int:
        return FIFO_SIZE if self.fcr & FCR_FE else 1

    def _push_rx(self, value: int) -> None:
        if len(self._rx) >= self._rx_capacity():
            self.lsr |= LSR_OE
        else:
            self._rx.append(value)

    def _fill_rx(self) -> None:
        if self.mcr & MCR_LOOP or not self._input:
            return
        n = min(len(self._input), self._rx_capacity() - len(self._rx))
        if n > 0:
            self._rx.extend(self._input[:n])
            del self._input[:n]

    def _update_msr(self) -> None:
        m = self.mcr
        if m & MCR_LOOP:
            lines = ((MSR_CTS if m & MCR_RTS else 0) | (MSR_DSR if m & MCR_DTR else 0)
                     | (MSR_RI if m & MCR_OUT1 else 0) | (MSR_DCD if m & MCR_OUT2 else 0))
        else:
            lines = MSR_CTS | MSR_DSR | MSR_DCD
        old = self.msr
        delta = old & 0x0F
        changed = old ^ lines
        delta |= (MSR_DCTS if changed & MSR_CTS else 0) | (MSR_DDSR if changed & MSR_DSR else 0)
        delta |= (MSR_DDCD if changed & MSR_DCD else 0) | (MSR_TERI if old & MSR_RI and not lines & MSR_RI else 0)
        self.msr = (lines & 0xF0) | delta

    def _iid(self) -> int:
        """The highest-priority pending interrupt (Table IV): line status > RX data > THR empty > modem status."""
        if self.ier & IER_ELSI and self.lsr & LSR_ERRORS:
            return IIR_RLSI
        if self.ier & IER_ERBFI and self._rx:
            if self.fcr & FCR_FE and len(self._rx) < RX_TRIGGER[self.fcr >> 6]:
                return IIR_CTI
            return IIR_RDI
        if self.ier & IER_ETBEI and self.thr_ipending:
            return IIR_THRI
        if self.ier & IER_EDSSI and self.msr & 0x0F:
            return IIR_MSI
        return IIR_NO_INT

    def _irq_level(self) -> bool:
        return self._iid() != IIR_NO_INT and (self.mcr & (MCR_OUT2 | MCR_LOOP)) == MCR_OUT2

    def _update_irq(self) -> None:
        level = self._irq_level()
        if level != self._level:
            self._level = level
            self._irq.set_level(level)

    # ---- snapshots -----------------------------------------------------------------------------------------------

    def state(self) -> dict:
        """Every register and buffer as a plain dict: ints, a bool, and bytes for ``rx_fifo`` and ``input``."""
        with self._lock:
            return {"ier": self.ier, "fcr": self.fcr, "lcr": self.lcr, "mcr": self.mcr, "lsr": self._lsr(),
                    "msr": self.msr, "scr": self.scr, "dll": self.dll, "dlm": self.dlm, "rbr": self.rbr,
                    "thr_ipending": self.thr_ipending, "rx_fifo": bytes(self._rx), "input": bytes(self._input)}

    def restore(self, d: dict) -> None:
        """Load a dict from ``state()`` and drive the interrupt line to the restored level.

        :raises ValueError: if a key is missing or the receiver FIFO holds more than 16 bytes.
        """
        missing = [k for k in _STATE_KEYS if k not in d]
        if missing:
            raise ValueError(f"serial state lacks {', '.join(missing)}")
        if len(d["rx_fifo"]) > FIFO_SIZE:
            raise ValueError(f"serial state has {len(d['rx_fifo'])} bytes in a {FIFO_SIZE}-byte receiver FIFO")
        with self._lock:
            self.ier, self.fcr, self.lcr = d["ier"] & 0x0F, d["fcr"], d["lcr"]
            self.mcr, self.lsr, self.msr = d["mcr"] & 0x1F, d["lsr"] & LSR_ERRORS, d["msr"]
            self.scr, self.dll, self.dlm, self.rbr = d["scr"], d["dll"], d["dlm"], d["rbr"]
            self.thr_ipending = bool(d["thr_ipending"])
            self._rx = deque(d["rx_fifo"])
            self._input = bytearray(d["input"])
            self._level = self._irq_level()
            self._irq.set_level(self._level)
