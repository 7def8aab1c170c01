"""Tests for popek.boot.mptable: MP floating pointer and configuration table layout, checksums and entries."""

import struct

import pytest

from popek.boot import layout
from popek.boot.mptable import MpTableError, write_mptable
from popek.memory import GuestMemory

ENTRY_SIZE = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}  # MP spec 1.4 table 4-3


@pytest.fixture
def mem():
    with GuestMemory.x86(16 << 20) as m:
        yield m


def parse(mem):
    """(floating pointer bytes, table header bytes, [(type, entry bytes)]) read back from guest memory."""
    fp = mem.read(layout.EBDA_START, 16)
    assert fp[:4] == b"_MP_"
    table_addr = struct.unpack_from("<I", fp, 4)[0]
    length = struct.unpack_from("<H", mem.read(table_addr + 4, 2))[0]
    table = mem.read(table_addr, length)
    assert table[:4] == b"PCMP"
    count = struct.unpack_from("<H", table, 34)[0]
    entries, pos = [], 44
    for _ in range(count):
        etype = table[pos]
        entries.append((etype, table[pos:pos + ENTRY_SIZE[etype]]))
        pos += ENTRY_SIZE[etype]
    assert pos == length, "entry count and base table length disagree"
    return fp, table, entries


@pytest.mark.parametrize("cpus", [1, 4])
def test_checksums_sum_to_zero_and_table_length_matches_entries(mem, cpus):
    size = write_mptable(mem, cpus, ioapic_id=cpus)
    fp, table, entries = parse(mem)
    assert sum(fp) % 256 == 0 and fp[8] == 1 and fp[9] == 4
    assert sum(table) % 256 == 0 and table[6] == 4
    assert size == len(table)
    assert struct.unpack_from("<I", table, 36)[0] == layout.LAPIC_BASE


@pytest.mark.parametrize("cpus", [1, 4])
def test_entry_counts_one_processor_per_cpu_two_buses_one_ioapic_16_isa_irqs_two_lints(mem, cpus):
    write_mptable(mem, cpus, ioapic_id=cpus)
    counts = {t: 0 for t in ENTRY_SIZE}
    for etype, _ in parse(mem)[2]:
        counts[etype] += 1
    assert counts == {0: cpus, 1: 2, 2: 1, 3: 16, 4: 2}


def test_processor_entries_flag_only_cpu0_as_bsp_and_all_enabled(mem):
    write_mptable(mem, 4, ioapic_id=4)
    procs = [e for t, e in parse(mem)[2] if t == 0]
    assert [(e[1], e[2], e[3]) for e in procs] == [(0, 0x14, 3), (1, 0x14, 1), (2, 0x14, 1), (3, 0x14, 1)]


def test_buses_ioapic_and_isa_routing_identity_as_kvm_default_gsi_routing(mem):
    write_mptable(mem, 2, ioapic_id=5, ioapic_addr=0xFEC00000)
    entries = parse(mem)[2]
    assert sorted(e[2:8] for t, e in entries if t == 1) == [b"ISA   ", b"PCI   "]
    (ioapic,) = [e for t, e in entries if t == 2]
    assert ioapic[1] == 5 and ioapic[3] & 1 and struct.unpack_from("<I", ioapic, 4)[0] == 0xFEC00000
    isa_bus = next(e[1] for t, e in entries if t == 1 and e[2:8] == b"ISA   ")
    routes = {e[5]: e[7] for t, e in entries if t == 3 and e[4] == isa_bus}
    assert all(e[6] == 5 for t, e in entries if t == 3)
    assert routes == {i: i for i in range(16)}


def test_local_interrupts_extint_on_lint0_nmi_on_lint1_for_all_apics(mem):
    write_mptable(mem, 1, ioapic_id=1)
    lints = [(e[1], e[6], e[7]) for t, e in parse(mem)[2] if t == 4]
    assert lints == [(3, 0xFF, 0), (1, 0xFF, 1)]


def test_pci_interrupt_entries_encode_device_and_intx_level_low(mem):
    write_mptable(mem, 1, ioapic_id=1, pci_irqs=[(3, 0, 16), (4, 1, 17)])
    entries = parse(mem)[2]
    pci_bus = next(e[1] for t, e in entries if t == 1 and e[2:8] == b"PCI   ")
    pci = [(struct.unpack_from("<H", e, 2)[0], e[5], e[7]) for t, e in entries if t == 3 and e[4] == pci_bus]
    assert pci == [(0xF, 3 << 2 | 0, 16), (0xF, 4 << 2 | 1, 17)]


def test_254_cpus_fit_in_the_bios_area_and_every_processor_is_listed(mem):
    length = write_mptable(mem, 254, ioapic_id=254, pci_irqs=[(s, 0, 16 + s % 8) for s in range(1, 32)])
    fp, table, entries = parse(mem)
    assert struct.unpack_from("<I", fp, 4)[0] == layout.MP_TABLE
    assert layout.MP_TABLE + length <= layout.MP_TABLE_END
    assert [e[1] for t, e in entries if t == 0] == list(range(254))


@pytest.mark.parametrize("cpus, ioapic_id, message", [
    (0, 1, "1..254"), (255, 255, "1..254"), (4, 2, "clear of the CPUs"), (1, 255, "must be in"),
])
def test_rejects_out_of_range_cpu_counts_and_colliding_ioapic_ids(mem, cpus, ioapic_id, message):
    with pytest.raises(MpTableError, match=message):
        write_mptable(mem, cpus, ioapic_id=ioapic_id)


def test_rejects_isa_irq_above_15(mem):
    with pytest.raises(MpTableError, match="ISA IRQ 16"):
        write_mptable(mem, 1, ioapic_id=1, isa_irqs=[16])


def test_guest_without_ebda_ram_gets_a_clear_error():
    with GuestMemory([(0, 0x80000)]) as small, pytest.raises(MpTableError, match="cannot write the MP table"):
        write_mptable(small, 1, ioapic_id=1)
