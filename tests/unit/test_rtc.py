"""MC146818 RTC: time from an injected clock in BCD/binary and 12/24 h, registers A-D, NMI bit, CMOS, setting time."""

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popek.devices.rtc import (RTC_24H, RTC_CENTURY, RTC_DAY_OF_MONTH, RTC_DAY_OF_WEEK, RTC_DM_BINARY, RTC_HOURS,
                               RTC_IRQF, RTC_MINUTES, RTC_MONTH, RTC_PF, RTC_REG_A, RTC_REG_B, RTC_REG_C,
                               RTC_REG_D, RTC_SECONDS, RTC_SET, RTC_UF, RTC_UIE, RTC_YEAR, Rtc)


class Clock:
    def __init__(self, t):
        self.t = t

    def __call__(self):
        return self.t


T0 = datetime(2026, 11, 22, 21, 7, 59, tzinfo=timezone.utc)  # a Sunday


@pytest.fixture
def clock():
    return Clock(T0)


def cmos(rtc, reg, index_bits=0):
    rtc.write(0, bytes([reg | index_bits]))
    return rtc.read(1, 1)[0]


def setreg(rtc, reg, value):
    rtc.write(0, bytes([reg]))
    rtc.write(1, bytes([value]))


def test_bcd_24h_time_and_date_from_the_clock(clock):
    rtc = Rtc(now=clock)
    got = [cmos(rtc, r) for r in (RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_DAY_OF_WEEK, RTC_DAY_OF_MONTH,
                                   RTC_MONTH, RTC_YEAR, RTC_CENTURY)]
    assert got == [0x59, 0x07, 0x21, 0x01, 0x22, 0x11, 0x26, 0x20]


def test_binary_mode_by_register_b_bit_2(clock):
    rtc = Rtc(now=clock)
    setreg(rtc, RTC_REG_B, RTC_24H | RTC_DM_BINARY)
    assert [cmos(rtc, r) for r in (RTC_SECONDS, RTC_HOURS, RTC_YEAR, RTC_CENTURY)] == [59, 21, 26, 20]


@pytest.mark.parametrize("hour,bcd,binary", [(0, 0x12, 12), (9, 0x09, 9), (12, 0x92, 0x8C), (21, 0x89, 0x89)])
def test_12_hour_mode_sets_bit_7_for_pm(clock, hour, bcd, binary):
    clock.t = T0.replace(hour=hour)
    rtc = Rtc(now=clock)
    setreg(rtc, RTC_REG_B, 0)
    assert cmos(rtc, RTC_HOURS) == bcd
    setreg(rtc, RTC_REG_B, RTC_DM_BINARY)
    assert cmos(rtc, RTC_HOURS) == binary


def test_time_follows_the_clock(clock):
    rtc = Rtc(now=clock)
    clock.t += timedelta(seconds=2)
    assert (cmos(rtc, RTC_SECONDS), cmos(rtc, RTC_MINUTES)) == (0x01, 0x08)


def test_nmi_disable_bit_is_not_part_of_the_index(clock):
    rtc = Rtc(now=clock)
    assert cmos(rtc, RTC_MINUTES, index_bits=0x80) == 0x07
    assert rtc.nmi_disabled
    cmos(rtc, RTC_MINUTES)
    assert not rtc.nmi_disabled


def test_register_a_never_shows_update_in_progress_and_d_shows_valid_ram(clock):
    rtc = Rtc(now=clock)
    assert cmos(rtc, RTC_REG_A) == 0x26
    setreg(rtc, RTC_REG_A, 0xA6)
    assert cmos(rtc, RTC_REG_A) == 0x26
    assert cmos(rtc, RTC_REG_D) == 0x80
    setreg(rtc, RTC_REG_D, 0)
    assert cmos(rtc, RTC_REG_D) == 0x80


def test_register_c_flags_are_cleared_by_reading(clock):
    rtc = Rtc(now=clock)
    setreg(rtc, RTC_REG_B, RTC_24H | RTC_UIE)
    clock.t += timedelta(seconds=1)
    first = cmos(rtc, RTC_REG_C)
    assert first & RTC_UF and first & RTC_IRQF and first & RTC_PF
    assert cmos(rtc, RTC_REG_C) == 0


def test_register_c_periodic_flag_follows_the_rate_select(clock):
    rtc = Rtc(now=clock)
    setreg(rtc, RTC_REG_A, 0x2F)  # 2 Hz
    cmos(rtc, RTC_REG_C)
    clock.t += timedelta(milliseconds=100)
    assert cmos(rtc, RTC_REG_C) & RTC_PF == 0
    clock.t += timedelta(milliseconds=500)
    assert cmos(rtc, RTC_REG_C) & RTC_PF


def test_cmos_memory_keeps_bytes_and_the_index_wraps_at_128(clock):
    rtc = Rtc(now=clock)
    setreg(rtc, 0x40, 0xAB)
    setreg(rtc, 0x7F, 0xCD)
    assert cmos(rtc, 0x40) == 0xAB
    assert cmos(rtc, 0x7F, index_bits=0x80) == 0xCD
    assert rtc.read(0, 1) == b"\xff"


def test_setting_the_time_with_the_set_bit_moves_the_guest_clock(clock):
    rtc = Rtc(now=clock)
    setreg(rtc, RTC_REG_B, RTC_24H | RTC_SET)
    clock.t += timedelta(seconds=5)
    assert cmos(rtc, RTC_SECONDS) == 0x59  # frozen while SET
    for reg, value in ((RTC_YEAR, 0x99), (RTC_CENTURY, 0x19), (RTC_MONTH, 0x12), (RTC_DAY_OF_MONTH, 0x31),
                       (RTC_HOURS, 0x23), (RTC_MINUTES, 0x59), (RTC_SECONDS, 0x58)):
        setreg(rtc, reg, value)
    setreg(rtc, RTC_REG_B, RTC_24H)
    clock.t += timedelta(seconds=3)
    assert [cmos(rtc, r) for r in (RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_DAY_OF_MONTH, RTC_MONTH, RTC_YEAR,
                                   RTC_CENTURY)] == [0x01, 0x00, 0x00, 0x01, 0x01, 0x00, 0x20]


def test_an_impossible_date_written_by_the_guest_leaves_the_clock_alone(clock):
    rtc = Rtc(now=clock)
    setreg(rtc, RTC_REG_B, RTC_24H | RTC_SET)
    setreg(rtc, RTC_MONTH, 0x13)
    setreg(rtc, RTC_REG_B, RTC_24H)
    assert cmos(rtc, RTC_MONTH) == 0x11


def test_state_round_trip_keeps_cmos_and_clock_offset(clock):
    rtc = Rtc(now=clock)
    setreg(rtc, 0x50, 0x11)
    setreg(rtc, RTC_MINUTES, 0x30)  # direct write: moves the guest clock
    other = Rtc(now=clock)
    other.restore(rtc.state())
    assert cmos(other, 0x50) == 0x11
    assert cmos(other, RTC_MINUTES) == 0x30
    with pytest.raises(ValueError, match="128"):
        other.restore({**rtc.state(), "cmos": b"\0" * 3})


@settings(max_examples=200, deadline=None)
@given(st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2099, 12, 31)), st.booleans(),
       st.booleans())
def test_any_time_written_in_any_mode_reads_back(t, binary, h24):
    t = t.replace(microsecond=0, tzinfo=timezone.utc)
    clock = Clock(T0)
    rtc = Rtc(now=clock)
    mode = (RTC_DM_BINARY if binary else 0) | (RTC_24H if h24 else 0)
    enc = (lambda v: v) if binary else (lambda v: (v // 10) << 4 | v % 10)
    hour = t.hour if h24 else ((t.hour % 12) or 12)
    hours = enc(hour) | (0x80 if not h24 and t.hour >= 12 else 0)
    setreg(rtc, RTC_REG_B, mode | RTC_SET)
    for reg, v in ((RTC_SECONDS, t.second), (RTC_MINUTES, t.minute), (RTC_DAY_OF_MONTH, t.day),
                   (RTC_MONTH, t.month), (RTC_YEAR, t.year % 100), (RTC_CENTURY, t.year // 100)):
        setreg(rtc, reg, enc(v))
    setreg(rtc, RTC_HOURS, hours)
    setreg(rtc, RTC_REG_B, mode)
    assert rtc.offset == t - T0
    assert cmos(rtc, RTC_HOURS) == hours
    assert cmos(rtc, RTC_DAY_OF_WEEK) == t.isoweekday() % 7 + 1
