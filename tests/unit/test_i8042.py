"""i8042: status without data, the controller commands of Linux's i8042 driver, reset by 0xFE and the output port."""

import pytest

from popek.devices.i8042 import (COMMAND, CTR_AUXDIS, CTR_KBDDIS, DATA, STATUS, STR_AUXDATA, STR_CMDDAT, STR_OBF,
                                 STR_SYS, I8042)


@pytest.fixture
def kbc():
    resets = []
    dev = I8042(on_reset=lambda: resets.append(1))
    dev.resets = resets
    return dev


def status(dev):
    return dev.read(STATUS, 1)[0]


def command(dev, cmd, *data):
    dev.write(COMMAND, bytes([cmd]))
    for d in data:
        dev.write(DATA, bytes([d]))


def reply(dev):
    assert status(dev) & STR_OBF, "no reply waiting"
    return dev.read(DATA, 1)[0]


def test_status_reports_no_data_so_the_flush_loop_ends(kbc):
    assert status(kbc) & STR_OBF == 0
    assert status(kbc) & STR_SYS


def test_self_test_answers_0x55_once_then_the_buffer_is_empty(kbc):
    command(kbc, 0xAA)
    assert reply(kbc) == 0x55
    assert status(kbc) & STR_OBF == 0


def test_command_byte_read_and_write_round_trip(kbc):
    command(kbc, 0x60, 0x47)
    command(kbc, 0x20)
    assert reply(kbc) == 0x47


def test_port_enable_disable_commands_flip_the_command_byte_bits(kbc):
    command(kbc, 0xA7)
    command(kbc, 0xAD)
    command(kbc, 0x20)
    assert reply(kbc) & (CTR_AUXDIS | CTR_KBDDIS) == CTR_AUXDIS | CTR_KBDDIS
    command(kbc, 0xA8)
    command(kbc, 0xAE)
    command(kbc, 0x20)
    assert reply(kbc) & (CTR_AUXDIS | CTR_KBDDIS) == 0


def test_interface_tests_report_no_error(kbc):
    command(kbc, 0xAB)
    assert reply(kbc) == 0x00
    command(kbc, 0xA9)
    assert reply(kbc) == 0x00


def test_aux_loop_echoes_with_auxdata_and_kbd_loop_without(kbc):
    command(kbc, 0xD3, 0x5A)
    assert status(kbc) & STR_AUXDATA
    assert reply(kbc) == 0x5A
    assert status(kbc) & STR_AUXDATA == 0
    command(kbc, 0xD2, 0xA5)
    assert status(kbc) & STR_AUXDATA == 0
    assert reply(kbc) == 0xA5


def test_cmddat_status_bit_follows_the_port_last_written(kbc):
    command(kbc, 0x60)
    assert status(kbc) & STR_CMDDAT
    kbc.write(DATA, b"\x44")
    assert status(kbc) & STR_CMDDAT == 0


def test_command_0xfe_pulses_reset(kbc):
    command(kbc, 0xFE)
    assert kbc.resets == [1]
    command(kbc, 0xFF)  # pulses no line
    assert kbc.resets == [1]


def test_output_port_write_clearing_bit_0_resets_and_setting_it_does_not(kbc):
    command(kbc, 0xD1, 0x03)
    assert kbc.resets == []
    command(kbc, 0xD0)
    assert reply(kbc) == 0x03
    command(kbc, 0xD1, 0x02)
    assert kbc.resets == [1]


def test_keyboard_bytes_without_a_keyboard_produce_nothing(kbc):
    kbc.write(DATA, b"\xf2")  # atkbd GETID
    command(kbc, 0xD4, 0xF4)  # to the mouse
    assert status(kbc) & STR_OBF == 0
    assert kbc.resets == []


def test_ports_0x61_to_0x63_are_not_the_controllers(kbc):
    assert kbc.read(1, 3) == b"\xff\xff\xff"


def test_state_round_trip(kbc):
    command(kbc, 0x60, 0x65)
    command(kbc, 0xAA)
    other = I8042(on_reset=lambda: None)
    other.restore(kbc.state())
    assert other.state() == kbc.state()
    assert reply(other) == 0x55
    assert other.ctr == 0x65
