"""MC146818 CMOS real-time clock: index/data ports, time and date from a host clock, registers A-D, 128-byte CMOS."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Callable

#: Offsets from base port 0x70: the index port (bit 7 = NMI disable) and the data port (0x71).
INDEX = 0
DATA = 1

# CMOS register numbers (MC146818A datasheet, "Address Map"; century as on PCs).
RTC_SECONDS = 0x00
RTC_SECONDS_ALARM = 0x01
RTC_MINUTES = 0x02
RTC_MINUTES_ALARM = 0x03
RTC_HOURS = 0x04
RTC_HOURS_ALARM = 0x05
RTC_DAY_OF_WEEK = 0x06
RTC_DAY_OF_MONTH = 0x07
RTC_MONTH = 0x08
RTC_YEAR = 0x09
RTC_REG_A = 0x0A
RTC_REG_B = 0x0B
RTC_REG_C = 0x0C
RTC_REG_D = 0x0D
RTC_CENTURY = 0x32

RTC_UIP = 0x80  # register A: update in progress
RTC_REF_CLCK_32KHZ = 0x20  # register A: divider bits 6:4 = 010
RTC_RATE_SELECT = 0x0F

RTC_SET = 0x80  # register B
RTC_PIE = 0x40
RTC_AIE = 0x20
RTC_UIE = 0x10
RTC_SQWE = 0x08
RTC_DM_BINARY = 0x04
RTC_24H = 0x02
RTC_DST_EN = 0x01

RTC_IRQF = 0x80  # register C
RTC_PF = 0x40
RTC_AF = 0x20
RTC_UF = 0x10

RTC_VRT = 0x80  # register D: valid RAM and time

NMI_DISABLE = 0x80
HOURS_PM = 0x80  # in 12-hour mode

TIME_REGISTERS = (RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_DAY_OF_WEEK, RTC_DAY_OF_MONTH, RTC_MONTH, RTC_YEAR,
                  RTC_CENTURY)


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Rtc:
    """An MC146818A RTC with its 128-byte CMOS RAM, on two ports (MC146818A datasheet: registers A-D, address map).

    Time and date registers read the guest clock, which is ``now()`` plus an offset the guest sets the usual way
    (set register B SET, write the registers, clear SET) or by writing a time register directly. They are BCD or
    binary by register B DM (bit 2) and 24- or 12-hour (bit 7 of the hours = PM) by register B bit 1; year 0x09
    holds the two low digits and 0x32 the century. Register A's UIP always reads 0 (an update takes no time here);
    register D reads VRT = 1. Register C reads and clears UF (a second passed since the last read) and PF (a
    periodic interval of register A's rate passed); AF is not modelled, and no interrupt is raised (no IRQ 8).
    The index port's bit 7 (NMI disable) is recorded in ``nmi_disabled`` and not part of the index; reading
    the index port returns 0xFF as on PCs. Other CMOS bytes (alarms, 0x0E-0x7F) are plain memory in ``cmos``.

    :param now: the host clock, returning an aware or naive ``datetime`` (default: UTC wall time).
    """

    def __init__(self, now: Callable[[], datetime] | None = None):
        self._now = now or _utc_now
        self.cmos = bytearray(128)
        self.cmos[RTC_REG_A] = RTC_REF_CLCK_32KHZ | 0x06  # 1024 Hz periodic rate
        self.cmos[RTC_REG_B] = RTC_24H
        self.index = 0
        self.nmi_disabled = False
        self.offset = timedelta(0)
        self._c_mark = self._guest_time()

    # ---- bus interface -------------------------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """Offset 0: 0xFF; offset 1: the CMOS byte the index selects."""
        return bytes(self._read_data() if off == DATA else 0xFF for off in range(offset, offset + size))

    def write(self, offset: int, data: bytes) -> None:
        """Offset 0: select a CMOS byte (bits 6:0) and set NMI disable (bit 7); offset 1: write it."""
        for i, value in enumerate(data):
            if offset + i == INDEX:
                self.index = value & 0x7F
                self.nmi_disabled = bool(value & NMI_DISABLE)
            elif offset + i == DATA:
                self._write_data(value)

    # ---- registers -----------------------------------------------------------------------------------------------

    def _guest_time(self) -> datetime:
        return self._now() + self.offset

    def _read_data(self) -> int:
        r = self.index
        if r in TIME_REGISTERS and not self.cmos[RTC_REG_B] & RTC_SET:
            return self._encode(r, self._guest_time())
        if r == RTC_REG_A:
            return self.cmos[RTC_REG_A] & ~RTC_UIP
        if r == RTC_REG_C:
            return self._read_c()
        if r == RTC_REG_D:
            return RTC_VRT
        return self.cmos[r]

    def _write_data(self, value: int) -> None:
        r = self.index
        b = self.cmos[RTC_REG_B]
        if r in TIME_REGISTERS:
            if b & RTC_SET:
                self.cmos[r] = value
            else:
                self._latch()
                self.cmos[r] = value
                self._commit()
        elif r == RTC_REG_A:
            self.cmos[r] = value & ~RTC_UIP
        elif r == RTC_REG_B:
            if value & RTC_SET:
                value &= ~RTC_UIE  # SET clears UIE (datasheet, register B)
            self.cmos[r] = value
            if value & RTC_SET and not b & RTC_SET:
                self._latch()
            elif b & RTC_SET and not value & RTC_SET:
                self._commit()
        elif r not in (RTC_REG_C, RTC_REG_D):  # C and D are read-only
            self.cmos[r] = value

    def _read_c(self) -> int:
        now = self._guest_time()
        flags = 0
        if not self.cmos[RTC_REG_B] & RTC_SET and int(now.timestamp()) != int(self._c_mark.timestamp()):
            flags |= RTC_UF
        rs = self.cmos[RTC_REG_A] & RTC_RATE_SELECT
        if rs:
            hz = 256 if rs == 1 else 128 if rs == 2 else 32768 >> (rs - 1)
            if (now - self._c_mark).total_seconds() * hz >= 1:
                flags |= RTC_PF
        b = self.cmos[RTC_REG_B]
        if flags & ((RTC_UF if b & RTC_UIE else 0) | (RTC_PF if b & RTC_PIE else 0)):
            flags |= RTC_IRQF
        self._c_mark = now
        return flags

    def _encode(self, r: int, t: datetime) -> int:
        b = self.cmos[RTC_REG_B]
        pm = 0
        if r == RTC_SECONDS:
            v = t.second
        elif r == RTC_MINUTES:
            v = t.minute
        elif r == RTC_HOURS:
            v = t.hour
            if not b & RTC_24H:
                v, pm = (v % 12) or 12, HOURS_PM if v >= 12 else 0
        elif r == RTC_DAY_OF_WEEK:
            v = t.isoweekday() % 7 + 1  # 1 = Sunday
        elif r == RTC_DAY_OF_MONTH:
            v = t.day
        elif r == RTC_MONTH:
            v = t.month
        elif r == RTC_YEAR:
            v = t.year % 100
        else:
            v = t.year // 100
        return (v if b & RTC_DM_BINARY else (v // 10) << 4 | v % 10) | pm

    def _decode(self, r: int) -> int:
        v = self.cmos[r]
        if r == RTC_HOURS:
            v &= ~HOURS_PM
        if not self.cmos[RTC_REG_B] & RTC_DM_BINARY:
            v = (v >> 4) * 10 + (v & 0x0F)
        if r == RTC_HOURS and not self.cmos[RTC_REG_B] & RTC_24H:
            v = v % 12 + (12 if self.cmos[RTC_HOURS] & HOURS_PM else 0)
        return v

    def _latch(self) -> None:
        """Freeze the current guest time into the time registers (entering SET mode)."""
        t = self._guest_time()
        for r in TIME_REGISTERS:
            self.cmos[r] = self._encode(r, t)

    def _commit(self) -> None:
        """Make the time registers the guest clock (leaving SET mode); an impossible date leaves the clock as it was."""
        now = self._now()
        try:
            t = datetime(self._decode(RTC_CENTURY) * 100 + self._decode(RTC_YEAR), self._decode(RTC_MONTH),
                         self._decode(RTC_DAY_OF_MONTH), self._decode(RTC_HOURS), self._decode(RTC_MINUTES),
                         self._decode(RTC_SECONDS), tzinfo=now.tzinfo)
        except ValueError:
            return
        self.offset = t - now

    # ---- snapshots -----------------------------------------------------------------------------------------------

    def state(self) -> dict:
        """CMOS bytes, index, NMI-disable bit and the guest clock's offset from the host clock (float seconds)."""
        return {"cmos": bytes(self.cmos), "index": self.index, "nmi_disabled": self.nmi_disabled,
                "offset": self.offset.total_seconds()}

    def restore(self, d: dict) -> None:
        """Load a dict from ``state()``. :raises ValueError: if a key is missing or ``cmos`` is not 128 bytes."""
        missing = [k for k in ("cmos", "index", "nmi_disabled", "offset") if k not in d]
        if missing:
            raise ValueError(f"rtc state lacks {', '.join(missing)}")
        if len(d["cmos"]) != 128:
            raise ValueError(f"rtc state has {len(d['cmos'])} CMOS bytes, not 128")
        self.cmos = bytearray(d["cmos"])
        self.index, self.nmi_disabled = d["index"] & 0x7F, bool(d["nmi_disabled"])
        self.offset = timedelta(seconds=d["offset"])
        self._c_mark = self._guest_time()
