"""PCI configuration mechanism #1, bus 0 slots, type-0 header masks, BAR sizing and mapping, capability chains."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popek.devices.pci import (PCI_BASE_ADDRESS_0, PCI_CAPABILITY_LIST, PCI_COMMAND, PCI_COMMAND_IO,
                               PCI_COMMAND_MEMORY, PCI_HEADER_TYPE, PCI_INTERRUPT_LINE, PCI_STATUS,
                               PCI_STATUS_CAP_LIST, PciBus, PciConfigIo, PciDevice, PciError)


def cfg_addr(bus, dev, fn, reg, enable=True):
    return (1 << 31 if enable else 0) | bus << 16 | dev << 11 | fn << 8 | reg


def setup():
    bus = PciBus()
    return bus, PciConfigIo(bus)


def select(io, *a, **kw):
    io.write(0, struct.pack("<I", cfg_addr(*a, **kw)))


def read_data(io, k, size):
    return int.from_bytes(io.read(4 + k, size), "little")


def virtio_like():
    return PciDevice(0x1AF4, 0x1041, 0x020000, interrupt_pin=1)


def test_host_bridge_at_00_00_0_reads_its_ids_and_class():
    _, io = setup()
    select(io, 0, 0, 0, 0x00)
    assert read_data(io, 0, 4) == 0x29C0_8086
    select(io, 0, 0, 0, 0x08)
    assert read_data(io, 0, 4) >> 8 == 0x060000
    select(io, 0, 0, 0, 0x0C)
    assert (read_data(io, 0, 4) >> 16) & 0xFF == 0  # header type 0


def test_config_address_reads_back_without_reserved_and_low_bits():
    _, io = setup()
    io.write(0, struct.pack("<I", 0xFFFF_FFFF))
    assert io.read(0, 4) == struct.pack("<I", 0x80FF_FFFC)


@given(st.integers(0, 31), st.integers(0, 7), st.integers(0, 63))
def test_address_decoding_reaches_the_right_function_and_register(dev_no, fn, dword):
    bus, io = setup()
    if (dev_no, fn) != (0, 0):
        d = virtio_like()
        bus.add(d, dev_no, fn)
    else:
        d = bus.host_bridge
    d.config[dword * 4:dword * 4 + 4] = struct.pack("<I", 0x1234_5678 ^ dword)
    select(io, 0, dev_no, fn, dword * 4)
    assert read_data(io, 0, 4) == 0x1234_5678 ^ dword
    select(io, 1, dev_no, fn, dword * 4)  # same slot on bus 1: nothing there
    assert read_data(io, 0, 4) == 0xFFFF_FFFF


def test_byte_and_word_accesses_use_the_lane_of_the_data_port_offset():
    bus, io = setup()
    select(io, 0, 0, 0, 0x00)  # vendor 8086, device 29c0
    assert [read_data(io, k, 1) for k in range(4)] == [0x86, 0x80, 0xC0, 0x29]
    assert read_data(io, 0, 2) == 0x8086
    assert read_data(io, 2, 2) == 0x29C0
    select(io, 0, 0, 0, PCI_INTERRUPT_LINE)
    io.write(4, b"\x0b")
    assert bus.host_bridge.config[PCI_INTERRUPT_LINE] == 0x0B
    io.write(4 + 1, b"\x07")  # interrupt pin is read-only
    assert bus.host_bridge.config[PCI_INTERRUPT_LINE + 1] == 0


def test_disabled_config_address_reads_all_ones_and_drops_writes():
    bus, io = setup()
    select(io, 0, 0, 0, PCI_INTERRUPT_LINE, enable=False)
    assert read_data(io, 0, 4) == 0xFFFF_FFFF
    io.write(4, b"\x0b")
    assert bus.host_bridge.config[PCI_INTERRUPT_LINE] == 0


def test_absent_slot_reads_all_ones_for_every_size():
    _, io = setup()
    select(io, 0, 5, 0, 0)
    assert (read_data(io, 0, 4), read_data(io, 2, 2), read_data(io, 3, 1)) == (0xFFFF_FFFF, 0xFFFF, 0xFF)
    io.write(4, b"\x00\x00\x00\x00")  # must not fail


def test_non_dword_access_to_config_address_is_not_an_address_write():
    _, io = setup()
    select(io, 0, 0, 0, 0)
    io.write(1, b"\x06")  # e.g. a byte write to 0xCF9
    assert io.read(0, 4) == struct.pack("<I", cfg_addr(0, 0, 0, 0))
    assert io.read(1, 1) == b"\xff"


def test_identity_and_class_fields_are_read_only():
    d = virtio_like()
    before = bytes(d.config[:0x10])
    for off in (0x00, 0x08):
        d.config_write(off, 4, 0xFFFF_FFFF)
    d.config_write(PCI_HEADER_TYPE, 1, 0x7F)
    assert bytes(d.config[:0x04]) == before[:0x04]
    assert bytes(d.config[0x08:0x0F]) == before[0x08:0x0F]


def test_command_register_keeps_only_its_writable_bits_and_status_errors_clear_on_write_one():
    d = virtio_like()
    d.config_write(PCI_COMMAND, 2, 0xFFFF)
    assert d.config_read(PCI_COMMAND, 2) == 0x0547
    d.config[PCI_STATUS + 1] = 0xF9  # error bits set by "hardware"
    d.config_write(PCI_STATUS, 2, 0x0800)  # clear one of them
    assert d.config_read(PCI_STATUS, 2) == 0xF100


@pytest.mark.parametrize("kind,size,flags",
                         [("mem32", 0x1000, 0x0), ("io", 0x20, 0x1), ("mem32", 0x10, 0x0), ("mem32", 0x10, 0x8)])
def test_bar_sizing_reads_back_the_size_mask_with_type_bits(kind, size, flags):
    d = virtio_like()
    d.add_bar(2, size, kind, prefetchable=bool(flags & 0x8))
    off = PCI_BASE_ADDRESS_0 + 8
    d.config_write(off, 4, 0xFFFF_FFFF)
    v = d.config_read(off, 4)
    type_bits = 0x3 if kind == "io" else 0xF
    assert v & type_bits == flags
    assert (~(v & ~type_bits) + 1) & 0xFFFF_FFFF == size


def test_64bit_prefetchable_bar_sizes_across_both_registers():
    d = virtio_like()
    d.add_bar(4, 1 << 33, "mem64", prefetchable=True)
    d.config_write(0x20, 4, 0xFFFF_FFFF)
    d.config_write(0x24, 4, 0xFFFF_FFFF)
    lo, hi = d.config_read(0x20, 4), d.config_read(0x24, 4)
    assert lo == 0x0000_000C  # 64-bit, prefetchable; no low address bits for 8 GiB
    assert hi == 0xFFFF_FFFE
    assert (~((hi << 32) | (lo & ~0xF)) + 1) & ((1 << 64) - 1) == 1 << 33


def test_undeclared_bars_read_zero_and_ignore_writes():
    d = virtio_like()
    d.config_write(PCI_BASE_ADDRESS_0, 4, 0xFFFF_FFFF)
    assert d.config_read(PCI_BASE_ADDRESS_0, 4) == 0


def test_bad_bars_are_rejected():
    d = virtio_like()
    d.add_bar(0, 0x1000)
    with pytest.raises(PciError, match="in use"):
        d.add_bar(0, 0x1000)
    with pytest.raises(PciError, match="power of two"):
        d.add_bar(1, 0x1800)
    with pytest.raises(PciError, match="0-5"):
        d.add_bar(5, 0x1000, "mem64")


def test_bar_mapping_follows_command_enable_and_ignores_the_sizing_value():
    d = virtio_like()
    d.add_bar(0, 0x1000)
    changes = []
    d.on_bar_change = lambda i, old, new: changes.append((i, old, new))
    d.set_bar_address(0, 0xE000_0000)
    assert d.bar_mapping(0) is None  # memory decoding still off
    d.config_write(PCI_COMMAND, 2, PCI_COMMAND_MEMORY)
    assert d.bar_mapping(0) == 0xE000_0000
    d.config_write(PCI_BASE_ADDRESS_0, 4, 0xFFFF_FFFF)
    assert d.bar_mapping(0) is None
    d.config_write(PCI_BASE_ADDRESS_0, 4, 0xE000_1000)
    d.config_write(PCI_COMMAND, 2, PCI_COMMAND_IO)
    assert changes == [(0, None, 0xE000_0000), (0, 0xE000_0000, None), (0, None, 0xE000_1000), (0, 0xE000_1000, None)]


def test_set_bar_address_rejects_misaligned_addresses():
    d = virtio_like()
    d.add_bar(0, 0x1000)
    with pytest.raises(PciError, match="aligned"):
        d.set_bar_address(0, 0xE000_0800)


def test_capability_chain_links_in_order_and_sets_the_status_bit():
    d = virtio_like()
    assert d.config_read(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST == 0
    a = d.add_capability(bytes([0x09, 0xEE, 16]) + bytes(13))
    b = d.add_capability(bytes([0x11, 0xEE, 0x00, 0x00]) + bytes(7))  # 11 bytes: next one stays dword aligned
    c = d.add_capability(bytes([0x05, 0x00]), wmask=b"\x00\xff")
    assert d.config_read(PCI_STATUS, 2) & PCI_STATUS_CAP_LIST
    assert d.config[PCI_CAPABILITY_LIST] == a == 0x40
    walk, ptr = [], d.config[PCI_CAPABILITY_LIST]
    while ptr:
        walk.append((ptr, d.config[ptr]))
        ptr = d.config[ptr + 1]
    assert walk == [(a, 0x09), (b, 0x11), (c, 0x05)]
    assert b == 0x50 and c % 4 == 0 and c >= b + 11
    d.config_write(c + 1, 1, 0x40)  # the next pointer stays read-only despite the caller's mask
    assert d.config[c + 1] == 0


def test_capability_write_mask_applies_only_to_its_bytes():
    d = virtio_like()
    off = d.add_capability(bytes([0x11, 0, 0x00, 0x00]), wmask=bytes([0, 0, 0xFF, 0xC0]))
    d.config_write(off, 4, 0xFFFF_FFFF)
    assert d.config_read(off, 4) == 0xC0FF_0011


def test_capability_that_does_not_fit_is_rejected():
    d = virtio_like()
    d.add_capability(bytes([0x09, 0]) + bytes(180))
    with pytest.raises(PciError, match="no room"):
        d.add_capability(bytes([0x09, 0]) + bytes(20))


def test_second_function_marks_the_slot_multifunction():
    bus, _ = setup()
    f0, f1 = virtio_like(), virtio_like()
    assert bus.add(f0) == (1, 0)
    assert f0.config[PCI_HEADER_TYPE] & 0x80 == 0
    bus.add(f1, 1, 1)
    assert f0.config[PCI_HEADER_TYPE] & 0x80
    with pytest.raises(PciError, match="taken"):
        bus.add(virtio_like(), 1, 1)


def test_bus_state_round_trip_restores_config_and_reports_bar_mappings():
    bus, io = setup()
    d = virtio_like()
    d.add_bar(1, 0x4000)
    bus.add(d, 3)
    d.set_bar_address(1, 0xD000_0000)
    d.config_write(PCI_COMMAND, 2, PCI_COMMAND_MEMORY)
    select(io, 0, 3, 0, 0x14)
    saved, saved_io = bus.state(), io.state()

    bus2, io2 = setup()
    d2 = virtio_like()
    d2.add_bar(1, 0x4000)
    bus2.add(d2, 3)
    seen = []
    d2.on_bar_change = lambda i, old, new: seen.append((i, new))
    bus2.restore(saved)
    io2.restore(saved_io)
    assert bus2.state() == saved
    assert seen == [(1, 0xD000_0000)]
    assert read_data(io2, 0, 4) == 0xD000_0000
    with pytest.raises(PciError, match="no such function"):
        bus2.restore({"07.0": saved["03.0"]})
