"""Guest page-table walks (popek.mmu) over page tables built in a GuestMemory."""

from types import SimpleNamespace

import pytest

from popek.memory import GuestMemory
from popek.mmu import (CR0_PE, CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, CR4_PSE, CR4_SMEP, EFER_LMA, EFER_NXE, PF_I, PF_P,
                       PF_RSVD, PF_U, PF_W, NonCanonicalAddress, PageFault, read_virt, translate, write_virt)

P, RW, US, A, D, PS, XD = 1, 2, 4, 0x20, 0x40, 0x80, 1 << 63


class Tables:
    """Builds x86-64 4- or 5-level page tables in guest memory, allocating table pages from ``next_table``."""

    def __init__(self, mem, levels=4, base=0x10_0000):
        self.mem, self.levels, self.next_table = mem, levels, base
        self.root = self._alloc()

    def _alloc(self):
        gpa = self.next_table
        self.next_table += 0x1000
        self.mem.write(gpa, bytes(0x1000))
        return gpa

    def map(self, vaddr, paddr, page=0x1000, flags=P | RW, table_flags=P | RW | US):
        leaf_shift = {0x1000: 12, 0x20_0000: 21, 0x4000_0000: 30}[page]
        table = self.root
        for shift in [48, 39, 30, 21, 12][5 - self.levels:]:
            slot = table + ((vaddr >> shift) & 0x1FF) * 8
            if shift == leaf_shift:
                self.mem.write_u64(slot, paddr | flags | (PS if shift != 12 else 0))
                return slot
            entry = self.mem.read_u64(slot)
            if not entry & P:
                entry = self._alloc() | table_flags
                self.mem.write_u64(slot, entry)
            table = entry & 0x000F_FFFF_FFFF_F000


def sregs(cr3, cr0=CR0_PE | CR0_PG | CR0_WP, cr4=CR4_PAE, efer=EFER_LMA | EFER_NXE | 0x100):
    return SimpleNamespace(cr0=cr0, cr3=cr3, cr4=cr4, efer=efer)


@pytest.fixture
def mem():
    with GuestMemory([(0, 0x100_0000)]) as m:
        yield m


def test_4k_page_translates_with_offset(mem):
    t = Tables(mem)
    t.map(0xFFFF_8880_0000_3000, 0x40_5000)
    assert translate(mem, sregs(t.root), 0xFFFF_8880_0000_3ABC) == 0x40_5ABC


def test_2m_page_translates_with_21_bit_offset(mem):
    t = Tables(mem)
    t.map(0x4000_0000, 0x60_0000, page=0x20_0000)
    assert translate(mem, sregs(t.root), 0x4012_3456) == 0x72_3456


def test_1g_page_translates_with_30_bit_offset(mem):
    t = Tables(mem)
    t.map(0xFFFF_FFFF_8000_0000, 0x4000_0000, page=0x4000_0000)
    assert translate(mem, sregs(t.root), 0xFFFF_FFFF_8123_4567) == 0x4123_4567


def test_5_level_paging_uses_pml5_index(mem):
    t = Tables(mem, levels=5)
    t.map(0x0080_0000_0000_1000, 0x30_0000)
    s = sregs(t.root, cr4=CR4_PAE | CR4_LA57)
    assert translate(mem, s, 0x0080_0000_0000_1010) == 0x30_0010
    with pytest.raises(PageFault):  # the same address without its PML5 index bits is unmapped
        translate(mem, s, 0x0000_0000_0000_1010)


def test_not_present_page_faults_with_p_clear_and_access_bits(mem):
    t = Tables(mem)
    t.map(0x1000, 0x20_0000)
    with pytest.raises(PageFault) as e:
        translate(mem, sregs(t.root), 0x5008, write=True, user=True)
    assert (e.value.vaddr, e.value.error_code) == (0x5008, PF_W | PF_U)


def test_user_access_to_supervisor_page_is_a_protection_fault(mem):
    t = Tables(mem)
    t.map(0x1000, 0x20_0000, flags=P | RW)
    assert translate(mem, sregs(t.root), 0x1000) == 0x20_0000
    with pytest.raises(PageFault) as e:
        translate(mem, sregs(t.root), 0x1000, user=True)
    assert e.value.error_code == PF_P | PF_U


def test_supervisor_bit_in_an_upper_level_denies_user_access(mem):
    t = Tables(mem)
    t.map(0x1000, 0x20_0000, flags=P | RW | US, table_flags=P | RW)
    with pytest.raises(PageFault) as e:
        translate(mem, sregs(t.root), 0x1000, user=True)
    assert e.value.error_code == PF_P | PF_U


def test_write_to_read_only_page_faults_for_supervisor_only_with_cr0_wp(mem):
    t = Tables(mem)
    t.map(0x1000, 0x20_0000, flags=P | US)
    with pytest.raises(PageFault) as e:
        translate(mem, sregs(t.root), 0x1000, write=True)
    assert e.value.error_code == PF_P | PF_W
    assert translate(mem, sregs(t.root, cr0=CR0_PE | CR0_PG), 0x1000, write=True) == 0x20_0000
    with pytest.raises(PageFault) as e:
        translate(mem, sregs(t.root, cr0=CR0_PE | CR0_PG), 0x1000, write=True, user=True)
    assert e.value.error_code == PF_P | PF_W | PF_U


def test_fetch_from_nx_page_faults_with_instruction_bit(mem):
    t = Tables(mem)
    t.map(0x1000, 0x20_0000, flags=P | RW | XD)
    assert translate(mem, sregs(t.root), 0x1000) == 0x20_0000
    with pytest.raises(PageFault) as e:
        translate(mem, sregs(t.root), 0x1000, fetch=True)
    assert e.value.error_code == PF_P | PF_I


def test_user_fetch_of_unmapped_page_has_the_syscall_shaped_error_code(mem):
    t = Tables(mem)
    t.map(0x1000, 0x20_0000, flags=P | RW)  # a supervisor page, like entry_SYSCALL_64
    with pytest.raises(PageFault) as e:
        translate(mem, sregs(t.root), 0x1000, user=True, fetch=True)
    assert e.value.error_code == 0x15  # P | U | I: Linux's "error 15"


def test_smep_blocks_supervisor_fetch_from_user_page(mem):
    t = Tables(mem)
    t.map(0x1000, 0x20_0000, flags=P | RW | US)
    assert translate(mem, sregs(t.root), 0x1000, fetch=True) == 0x20_0000
    with pytest.raises(PageFault) as e:
        translate(mem, sregs(t.root, cr4=CR4_PAE | CR4_SMEP), 0x1000, fetch=True)
    assert e.value.error_code == PF_P | PF_I


def test_non_canonical_address_is_not_a_page_fault(mem):
    t = Tables(mem)
    with pytest.raises(NonCanonicalAddress):
        translate(mem, sregs(t.root), 0x0000_8000_0000_0000)


def test_ps_bit_in_pml4_entry_is_a_reserved_bit_fault(mem):
    t = Tables(mem)
    mem.write_u64(t.root, 0x20_0000 | P | RW | PS)
    with pytest.raises(PageFault) as e:
        translate(mem, sregs(t.root), 0x1000)
    assert e.value.error_code & (PF_P | PF_RSVD) == PF_P | PF_RSVD


def test_set_accessed_sets_a_on_the_walk_and_d_on_written_leaf(mem):
    t = Tables(mem)
    leaf = t.map(0x1000, 0x20_0000)
    translate(mem, sregs(t.root), 0x1000)
    assert mem.read_u64(leaf) & (A | D) == 0  # a plain lookup leaves the tables alone
    translate(mem, sregs(t.root), 0x1000, set_accessed=True)
    assert mem.read_u64(leaf) & (A | D) == A and mem.read_u64(t.root) & A
    translate(mem, sregs(t.root), 0x1000, write=True, set_accessed=True)
    assert mem.read_u64(leaf) & (A | D) == A | D


def test_read_virt_crosses_into_a_discontiguous_physical_page(mem):
    t = Tables(mem)
    t.map(0x7000, 0x30_0000)
    t.map(0x8000, 0x20_0000)
    mem.write(0x30_0FFC, b"abcd")
    mem.write(0x20_0000, b"efgh")
    assert read_virt(mem, sregs(t.root), 0x7FFC, 8) == b"abcdefgh"


def test_write_virt_faulting_on_second_page_writes_nothing(mem):
    t = Tables(mem)
    t.map(0x7000, 0x30_0000)
    with pytest.raises(PageFault) as e:
        write_virt(mem, sregs(t.root), 0x7FFE, b"WXYZ")
    assert e.value.vaddr == 0x8000 and e.value.error_code == PF_W
    assert mem.read(0x30_0FFE, 2) == b"\0\0"


def test_write_virt_crosses_pages(mem):
    t = Tables(mem)
    t.map(0x7000, 0x30_0000)
    t.map(0x8000, 0x20_0000)
    write_virt(mem, sregs(t.root), 0x7FFE, b"WXYZ")
    assert mem.read(0x30_0FFE, 2) == b"WX" and mem.read(0x20_0000, 2) == b"YZ"


def test_paging_off_is_identity_on_32_bit_linear_addresses(mem):
    s = SimpleNamespace(cr0=CR0_PE, cr3=0, cr4=0, efer=0)
    assert translate(mem, s, 0x12_3456) == 0x12_3456
    assert translate(mem, s, 0x1_0000_1000) == 0x1000


def test_32_bit_paging_4k_and_4m_pages(mem):
    pd, pt = 0x10_0000, 0x10_1000
    mem.write_u32(pd + (0x0040_0000 >> 22) * 4, pt | P | RW)
    mem.write_u32(pt + 3 * 4, 0x50_0000 | P | RW)
    mem.write_u32(pd + (0x8000_0000 >> 22) * 4, 0x80_0000 | P | RW | PS)
    s = SimpleNamespace(cr0=CR0_PE | CR0_PG, cr3=pd, cr4=CR4_PSE, efer=0)
    assert translate(mem, s, 0x0040_3123) == 0x50_0123
    assert translate(mem, s, 0x8012_3456) == 0x92_3456


def test_pae_paging_walks_pdpte_then_pd(mem):
    pdpt, pd, pt = 0x10_0000, 0x10_1000, 0x10_2000
    mem.write_u64(pdpt + 2 * 8, pd | P)
    mem.write_u64(pd + 1 * 8, pt | P | RW)
    mem.write_u64(pt + 5 * 8, 0x70_0000 | P | RW | XD)
    s = SimpleNamespace(cr0=CR0_PE | CR0_PG, cr3=pdpt, cr4=CR4_PAE, efer=EFER_NXE)
    assert translate(mem, s, 0x8020_5010) == 0x70_0010
    with pytest.raises(PageFault) as e:
        translate(mem, s, 0x8020_5010, fetch=True)
    assert e.value.error_code == PF_P | PF_I
    with pytest.raises(PageFault) as e:
        translate(mem, s, 0xC000_0000)  # PDPTE 3 not present
    assert e.value.error_code == 0
