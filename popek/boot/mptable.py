"""Intel MultiProcessor Specification 1.4 tables: the MP floating pointer (EBDA) and configuration table (BIOS area)."""

from __future__ import annotations

import struct
from collections.abc import Iterable

from popek.boot import layout
from popek.memory import GuestMemory, GuestMemoryError

MP_SPEC_REV = 4  # version 1.4
LAPIC_VERSION = 0x14  # integrated xAPIC, as KVM's local APIC reports
IOAPIC_VERSION = 0x11  # 82093AA, as KVM's IOAPIC reports
#: CPU signature (family 6) and feature flags (CPUID.1:EDX FPU | APIC) in processor entries (MP spec 4.3.1).
CPU_SIGNATURE = 0x600
CPU_FEATURES = (1 << 0) | (1 << 9)
BUS_PCI, BUS_ISA = 0, 1  # PCI bus IDs must equal PCI bus numbers, so ISA gets the next one (MP spec 4.3.2, D.3)
MAX_CPUS = 254
#: Entry types (MP spec table 4-3) and interrupt types (table 4-8).
PROCESSOR, BUS, IOAPIC, IO_INTERRUPT, LOCAL_INTERRUPT = range(5)
MP_INT, MP_NMI, MP_SMI, MP_EXTINT = range(4)
#: Interrupt entry flags (table 4-10): polarity bits 0-1 and trigger bits 2-3; 0 = "conforms to the bus".
PCI_FLAGS = 0x3 | (0x3 << 2)  # PCI INTx: active low, level triggered

_FLOATING = struct.Struct("<4sIBBBB4s")  # 16 bytes, MP spec 4.1
_HEADER = struct.Struct("<4sHBB8s12sIHHIHBB")  # 44 bytes, MP spec 4.2
_PROCESSOR = struct.Struct("<BBBBII8s")  # 20 bytes
_ENTRY8 = struct.Struct("<BBHBBBB")  # I/O and local interrupt entries, 8 bytes


class MpTableError(ValueError):
    """MP table parameters out of range, or a table that does not fit in the EBDA."""


def _checksum(data: bytes) -> int:
    return -sum(data) & 0xFF


def write_mptable(mem: GuestMemory, num_cpus: int, *, ioapic_id: int, ioapic_addr: int = layout.IOAPIC_BASE,
                  isa_irqs: Iterable[int] = range(16), pci_irqs: Iterable[tuple[int, int, int]] = ()) -> int:
    """Write the MP floating pointer ("_MP_") at layout.EBDA_START and the MP configuration table ("PCMP") at
    layout.MP_TABLE (0xF0000, the BIOS area; MP spec 4: the table may be anywhere the pointer's PHYSICAL ADDRESS
    POINTER names). Both lie in the legacy hole that the e820 map reports reserved.

    Linux finds the floating pointer by scanning the last KiB of base memory (0x9FC00, MP spec 4 / appendix D).
    Entries: one processor per CPU (local APIC IDs 0..num_cpus-1, CPU 0 flagged BSP), buses "PCI   " (ID 0) and
    "ISA   " (ID 1), one IOAPIC, I/O interrupt entries, then ExtINT on LINT0 and NMI on LINT1 of every local APIC
    (virtual wire mode, MP spec 3.6.2.2). ISA IRQ n goes to IOAPIC pin n (identity, as Firecracker's table does), which
    matches KVM's default GSI routing for the in-kernel irqchip (GSI n -> IOAPIC pin n, so the in-kernel PIT's GSI 0
    reaches pin 0); the ISA bus's default polarity/trigger.

    :param num_cpus: 1..254.
    :param ioapic_id: APIC ID of the IOAPIC, 0..254 and not one of the CPUs' IDs.
    :param ioapic_addr: IOAPIC MMIO base (guest physical).
    :param isa_irqs: ISA IRQ numbers (0..15) that get entries.
    :param pci_irqs: ``(device, intx, ioapic_pin)`` for PCI bus 0: device 0..31, intx 0..3 for INTA#..INTD#;
        active low, level triggered.
    :returns: the configuration table's length in bytes.
    :raises MpTableError: parameters out of range, or guest RAM that does not hold the EBDA and BIOS area.
    """
    if not 1 <= num_cpus <= MAX_CPUS:
        raise MpTableError(f"{num_cpus} CPUs: the MP table describes 1..{MAX_CPUS}")
    if not 0 <= ioapic_id <= 254 or ioapic_id < num_cpus:
        raise MpTableError(f"IOAPIC ID {ioapic_id} must be in {num_cpus}..254, clear of the CPUs' APIC IDs "
                           f"0..{num_cpus - 1}")
    entries = [_PROCESSOR.pack(PROCESSOR, cpu, LAPIC_VERSION, 1 | (2 if cpu == 0 else 0), CPU_SIGNATURE,
                               CPU_FEATURES, bytes(8)) for cpu in range(num_cpus)]
    entries += [struct.pack("<BB6s", BUS, BUS_PCI, b"PCI   "), struct.pack("<BB6s", BUS, BUS_ISA, b"ISA   "),
                struct.pack("<BBBBI", IOAPIC, ioapic_id, IOAPIC_VERSION, 1, ioapic_addr)]
    for irq in isa_irqs:
        if not 0 <= irq <= 15:
            raise MpTableError(f"ISA IRQ {irq} is not in 0..15")
        entries.append(_ENTRY8.pack(IO_INTERRUPT, MP_INT, 0, BUS_ISA, irq, ioapic_id, irq))
    for device, intx, pin in pci_irqs:
        if not (0 <= device <= 31 and 0 <= intx <= 3 and 0 <= pin <= 255):
            raise MpTableError(f"PCI interrupt (device {device}, INT{'ABCD'[intx] if 0 <= intx <= 3 else intx}#, "
                               f"pin {pin}) is out of range")
        entries.append(_ENTRY8.pack(IO_INTERRUPT, MP_INT, PCI_FLAGS, BUS_PCI, device << 2 | intx, ioapic_id, pin))
    entries += [_ENTRY8.pack(LOCAL_INTERRUPT, MP_EXTINT, 0, BUS_ISA, 0, 0xFF, 0),
                _ENTRY8.pack(LOCAL_INTERRUPT, MP_NMI, 0, BUS_ISA, 0, 0xFF, 1)]

    body = b"".join(entries)
    table_addr = layout.MP_TABLE
    length = _HEADER.size + len(body)
    assert table_addr + length <= layout.MP_TABLE_END  # 254 CPUs and 32 PCI devices need ~5.6 KiB
    header = _HEADER.pack(b"PCMP", length, MP_SPEC_REV, 0, b"POPEK   ", b"POPEK VM    ", 0, 0, len(entries),
                          layout.LAPIC_BASE, 0, 0, 0)
    table = bytearray(header + body)
    table[7] = _checksum(table)
    floating = bytearray(_FLOATING.pack(b"_MP_", table_addr, 1, MP_SPEC_REV, 0, 0, bytes(4)))
    floating[10] = _checksum(floating)
    try:
        mem.write(layout.EBDA_START, bytes(floating))
        mem.write(table_addr, bytes(table))
    except GuestMemoryError as e:
        raise MpTableError(f"cannot write the MP table at {layout.EBDA_START:#x} and {table_addr:#x}: {e}") from None
    return length
