"""Debug port: exit status at offset 0, boot events at offset 1, reads of zero."""

import pytest

from popek.devices.debugport import EVENT_INIT_STARTED, DebugPort


def make():
    calls = []
    dev = DebugPort(on_exit_status=lambda c: calls.append(("exit", c)), on_event=lambda n: calls.append(("event", n)))
    return dev, calls


def test_offset_0_reports_the_exit_status_and_offset_1_the_event():
    dev, calls = make()
    dev.write(1, bytes([EVENT_INIT_STARTED]))
    dev.write(0, b"\x00")
    dev.write(0, b"\xff")
    assert calls == [("event", 1), ("exit", 0), ("exit", 255)]


def test_word_write_at_offset_0_reaches_both_registers_in_order():
    dev, calls = make()
    dev.write(0, b"\x07\x01")
    assert calls == [("exit", 7), ("event", 1)]


def test_reads_return_zero_and_call_nothing():
    dev, calls = make()
    assert dev.read(0, 1) == b"\x00"
    assert dev.read(0, 2) == b"\x00\x00"
    assert calls == []


def test_state_records_events_and_exit_status_and_restore_replays_the_events_only():
    dev, _ = make()
    dev.write(1, bytes([EVENT_INIT_STARTED]))
    dev.write(1, bytes([EVENT_INIT_STARTED]))  # recorded once
    dev.write(0, b"\x03")
    state = dev.state()
    assert state == {"events": [EVENT_INIT_STARTED], "exit_status": 3}
    new, calls = make()
    new.restore(state)
    assert calls == [("event", EVENT_INIT_STARTED)] and new.state() == state


def test_restore_refuses_a_malformed_state():
    dev, calls = make()
    for bad in ({}, {"events": [], "exit_status": None, "x": 1}, {"events": [256], "exit_status": None},
                {"events": [], "exit_status": -1}):
        with pytest.raises(ValueError, match="debug port"):
            dev.restore(bad)
    assert calls == []
