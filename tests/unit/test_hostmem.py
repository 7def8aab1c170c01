"""popek.hostmem: smaps parsing and the guest-RAM / VMM split, on smaps texts shaped like the kernel's (proc(5))."""

import mmap
import os

import pytest

from popek.hostmem import anonymous_of_size, is_popek_ram, parse_smaps, read_smaps, split

SMAPS = """\
55ffe7e1d000-55ffe7e1f000 r--p 00000000 fe:00 260386                     /usr/bin/python3.11
Size:                  8 kB
Rss:                   8 kB
Pss:                   4 kB
Shared_Clean:          8 kB
Private_Clean:         0 kB
Private_Dirty:         0 kB
THPeligible:           0
VmFlags: rd mr mw me
7f0000000000-7f0008000000 rw-s 00000000 00:01 1234                       /memfd:popek-ram-0 (deleted)
Size:             131072 kB
Rss:               20480 kB
Pss:               20480 kB
Private_Clean:        12 kB
Private_Dirty:     20468 kB
VmFlags: rd wr sh mr mw me ms sd
7f1000000000-7f1008000000 rw-p 00000000 00:00 0
Size:             131072 kB
Rss:                 400 kB
Pss:                 400 kB
Private_Dirty:       400 kB
7f2000000000-7f2000100000 rw-p 00000000 00:00 0                          [heap]
Size:               1024 kB
Rss:                1000 kB
Pss:                 900 kB
Private_Clean:         0 kB
Private_Dirty:       900 kB
"""


def test_parse_smaps_reads_ranges_perms_paths_and_fields_in_bytes():
    maps = parse_smaps(SMAPS)
    assert [m.path for m in maps] == ["/usr/bin/python3.11", "/memfd:popek-ram-0 (deleted)", "", "[heap]"]
    assert maps[1].start == 0x7f0000000000 and maps[1].size == 128 << 20 and maps[1].perms == "rw-s"
    assert maps[1].get("Rss") == 20480 << 10 and maps[1].uss == 20480 << 10
    assert maps[0].uss == 0 and maps[0].get("Swap") == 0  # absent field: 0; THPeligible (no kB) is skipped


def test_split_takes_popek_ram_out_of_the_vmm_overhead():
    s = split(parse_smaps(SMAPS), is_popek_ram)
    assert s.guest_mappings == 1 and s.guest_size == 128 << 20 and s.guest_rss == 20480 << 10
    assert s.vmm_uss == (400 + 900) << 10  # the anonymous 128 MiB mapping is not Popek's RAM: it stays in
    assert s.vmm_pss == (4 + 400 + 900) << 10 and s.vmm_rss == (8 + 400 + 1000) << 10


def test_anonymous_of_size_matches_only_an_anonymous_rw_mapping_of_that_size():
    maps = parse_smaps(SMAPS)
    s = split(maps, anonymous_of_size(128 << 20))
    assert s.guest_mappings == 1 and s.guest_rss == 400 << 10  # not the memfd of the same size, not the heap
    assert split(maps, anonymous_of_size(64 << 20)).guest_mappings == 0


def test_parse_smaps_refuses_text_that_is_not_smaps():
    with pytest.raises(ValueError, match="not an smaps text"):
        parse_smaps("Name: python\nState: R\n")


def test_read_smaps_sees_a_memfd_mapping_of_this_process_and_its_touched_pages():
    fd = os.memfd_create("popek-ram-test", 0)
    try:
        os.ftruncate(fd, 1 << 20)
        with mmap.mmap(fd, 1 << 20) as m:
            m[: 64 << 10] = b"x" * (64 << 10)  # touch 16 pages
            ram = [x for x in read_smaps(os.getpid()) if is_popek_ram(x)]
            assert len(ram) == 1 and ram[0].size == 1 << 20 and ram[0].get("Rss") == 64 << 10
    finally:
        os.close(fd)
