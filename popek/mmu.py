"""Guest virtual to guest physical address translation by walking the guest's x86 page tables in guest memory."""

from __future__ import annotations

from popek.memory import PAGE_SIZE, GuestMemory

# Control register and EFER bits (Intel SDM Vol. 3A §2.5, §2.2.1).
CR0_PE = 1 << 0
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
CR4_SMEP = 1 << 20
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

# Page-fault error code bits (Intel SDM Vol. 3A §4.7, Figure 4-12).
PF_P = 1 << 0  # 0: not-present page; 1: protection violation
PF_W = 1 << 1  # the access was a write
PF_U = 1 << 2  # the access was a user-mode access
PF_RSVD = 1 << 3  # a reserved bit was set in a paging-structure entry
PF_I = 1 << 4  # the access was an instruction fetch

_P, _RW, _US, _A, _D, _PS = 1, 1 << 1, 1 << 2, 1 << 5, 1 << 6, 1 << 7
_XD = 1 << 63
_ADDR_MASK = 0x000F_FFFF_FFFF_F000  # physical address bits 51:12 of a 64-bit entry
_M64 = (1 << 64) - 1


class PageFault(Exception):
    """A guest access that the guest's paging raises #PF for (Intel SDM Vol. 3A §4.7).

    :ivar vaddr: the faulting linear address (what the processor loads into CR2)
    :ivar error_code: the architectural #PF error code (``PF_P | PF_W | PF_U | PF_RSVD | PF_I`` bits)
    """

    def __init__(self, vaddr: int, error_code: int):
        self.vaddr = vaddr
        self.error_code = error_code
        bits = [n for n, b in (("P", PF_P), ("W", PF_W), ("U", PF_U), ("RSVD", PF_RSVD), ("I", PF_I)) if error_code & b]
        names = "|".join(bits) or "0"
        super().__init__(f"page fault at linear address {vaddr:#x} (error code {error_code:#x} {names})")


class NonCanonicalAddress(Exception):
    """A 64-bit linear address not canonical for the paging mode: #GP(0) or #SS(0), not #PF (SDM Vol. 3A §4.5)."""

    def __init__(self, vaddr: int, bits: int):
        self.vaddr = vaddr
        super().__init__(f"linear address {vaddr:#x} is not canonical for {bits}-bit linear addresses")


def _canonical(vaddr: int, bits: int) -> bool:
    top = vaddr >> (bits - 1)
    return top == 0 or top == (1 << (65 - bits)) - 1


def translate(mem: GuestMemory, sregs, vaddr: int, write: bool = False, user: bool = False,
              fetch: bool = False, set_accessed: bool = False) -> int:
    """Translate a linear address to a guest physical address as the guest's MMU would.

    Handles 4-level and (CR4.LA57) 5-level paging with 4 KiB / 2 MiB / 1 GiB pages, 32-bit PAE paging
    (4 KiB / 2 MiB), 32-bit paging (4 KiB / 4 MiB with CR4.PSE, PSE-36) and paging off (CR0.PG=0: the 32-bit
    linear address is the physical address) — Intel SDM Vol. 3A §4.3–§4.5. Access rights are checked per §4.6:
    U/S, R/W (supervisor writes honour CR0.WP), XD with EFER.NXE, and SMEP; SMAP and protection keys are not
    checked. With ``set_accessed`` the accessed flags of every entry used and the dirty flag of the leaf on a
    write are set after a successful walk (§4.8; plain read-modify-write, not atomic against other vCPUs).

    :param sregs: anything with ``cr0 cr3 cr4 efer`` (e.g. ``kvm_sregs``)
    :param vaddr: linear address (segment base already added)
    :param write, user, fetch: the kind of access (user = CPL 3 access)
    :returns: guest physical address
    :raises PageFault: not present or not permitted, with the architectural error code
    :raises NonCanonicalAddress: a non-canonical address under 4/5-level paging
    :raises popek.memory.GuestMemoryError: a paging structure lies outside guest RAM
    """
    cr0, cr4, efer = sregs.cr0, sregs.cr4, sregs.efer
    if not cr0 & CR0_PG:
        return vaddr & 0xFFFF_FFFF
    long_mode = bool(efer & EFER_LMA)
    pae = long_mode or bool(cr4 & CR4_PAE)
    nxe = pae and bool(efer & EFER_NXE)
    smep = bool(cr4 & CR4_SMEP)
    code = (PF_W if write else 0) | (PF_U if user else 0) | (PF_I if fetch and pae and (nxe or smep) else 0)
    if long_mode:
        bits = 57 if cr4 & CR4_LA57 else 48
        vaddr &= _M64
        if not _canonical(vaddr, bits):
            raise NonCanonicalAddress(vaddr, bits)
        levels = [48, 39, 30, 21, 12] if bits == 57 else [39, 30, 21, 12]
        table, entry_size, large = sregs.cr3 & _ADDR_MASK, 8, (30, 21)
    elif pae:
        vaddr &= 0xFFFF_FFFF
        pdpte_gpa = (sregs.cr3 & 0xFFFF_FFE0) + ((vaddr >> 30) & 3) * 8
        pdpte = mem.read_u64(pdpte_gpa)
        if not pdpte & _P:
            raise PageFault(vaddr, code)
        levels, table, entry_size, large = [21, 12], pdpte & _ADDR_MASK, 8, (21,)
    else:
        vaddr &= 0xFFFF_FFFF
        levels, table, entry_size, large = [22, 12], sregs.cr3 & 0xFFFF_F000, 4, (22,) if cr4 & CR4_PSE else ()

    rw = us = True
    xd = False
    used: list[int] = []
    for shift in levels:
        idx = (vaddr >> shift) & (0x3FF if entry_size == 4 else 0x1FF)
        gpa = table + idx * entry_size
        entry = mem.read_u64(gpa) if entry_size == 8 else mem.read_u32(gpa)
        if not entry & _P:
            raise PageFault(vaddr, code)
        rw, us, xd = rw and bool(entry & _RW), us and bool(entry & _US), xd or (nxe and bool(entry & _XD))
        used.append(gpa)
        if long_mode and shift >= 39 and entry & _PS:
            raise PageFault(vaddr, code | PF_P | PF_RSVD)  # PS is reserved in PML5E/PML4E
        if shift == 12 or (shift in large and entry & _PS):
            break
        table = entry & (_ADDR_MASK if entry_size == 8 else 0xFFFF_F000)
    if entry_size == 8:
        frame = entry & _ADDR_MASK & ~((1 << shift) - 1)
    elif shift == 22:  # 4 MiB page, PSE-36: PDE bits 20:13 are physical address bits 39:32
        frame = (entry & 0xFFC0_0000) | (((entry >> 13) & 0xFF) << 32)
    else:
        frame = entry & 0xFFFF_F000

    if (user and not us) or (write and not rw and (user or cr0 & CR0_WP)) or \
            (fetch and xd) or (fetch and not user and us and smep):
        raise PageFault(vaddr, code | PF_P)
    if set_accessed:
        for i, gpa in enumerate(used):
            flags = _A | (_D if write and i == len(used) - 1 else 0)
            low = mem.read_u8(gpa)
            if low & flags != flags:
                mem.write_u8(gpa, low | flags)
    return frame | (vaddr & ((1 << shift) - 1))


def ranges(mem: GuestMemory, sregs, vaddr: int, n: int, write: bool = False, user: bool = False,
           fetch: bool = False, set_accessed: bool = False) -> list[tuple[int, int]]:
    """Translate ``n`` bytes at linear ``vaddr`` page by page: a list of ``(gpa, length)`` pieces in order.

    Every page is translated before anything is returned, so a fault on a later page leaves nothing half done.
    Arguments and errors as for :func:`translate`.
    """
    out: list[tuple[int, int]] = []
    wrap = _M64 if sregs.efer & EFER_LMA else 0xFFFF_FFFF
    while n > 0:
        chunk = min(n, PAGE_SIZE - (vaddr & (PAGE_SIZE - 1)))
        out.append((translate(mem, sregs, vaddr, write, user, fetch, set_accessed), chunk))
        vaddr, n = (vaddr + chunk) & wrap, n - chunk
    return out


def read_virt(mem: GuestMemory, sregs, vaddr: int, n: int, user: bool = False, fetch: bool = False,
              set_accessed: bool = False) -> bytes:
    """Read ``n`` bytes at linear address ``vaddr`` through the guest's page tables (may cross pages).

    :raises PageFault, NonCanonicalAddress, GuestMemoryError: as for :func:`translate`
    """
    return b"".join(mem.read(gpa, size) for gpa, size in ranges(mem, sregs, vaddr, n, False, user, fetch, set_accessed))


def write_virt(mem: GuestMemory, sregs, vaddr: int, data: bytes, user: bool = False,
               set_accessed: bool = False) -> None:
    """Write ``data`` at linear address ``vaddr`` through the guest's page tables (may cross pages).

    All pages are translated (and checked for write permission) before the first byte is written.

    :raises PageFault, NonCanonicalAddress, GuestMemoryError: as for :func:`translate`
    """
    off = 0
    for gpa, size in ranges(mem, sregs, vaddr, len(data), True, user, False, set_accessed):
        mem.write(gpa, data[off:off + size])
        off += size
