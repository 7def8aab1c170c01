"""popek.snapshot and popek.state records without KVM: state file format and its validation, atomic writes, sparse
and diff memory files, tagged-JSON device state, CPU compatibility, GuestMemory.from_file."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from popek import snapshot
from popek.kvm import abi
from popek.memory import PAGE_SIZE, GuestMemory
from popek.snapshot import (MAGIC, MemoryInfo, Snapshot, SnapshotError, VmSummary, check_cpu, cpu_fingerprint,
                            decode_payload, encode_payload, load_memory, merge_diff, pack_state, read_memory_info,
                            read_state, unpack_state, write_diff_memory, write_memory, write_state)
from popek.state import StateError, VcpuState, VmState, pack_struct, unpack_struct

REGIONS = [(0, 1 << 20), (0x1_0000_0000, 256 << 10)]


def _filled(cls, seed: int):
    return cls.from_buffer_copy(bytes((seed * 7 + i) & 0xFF for i in range(ctypes.sizeof(cls))))


def _chip(chip_id: int, seed: int) -> abi.kvm_irqchip:
    c = _filled(abi.kvm_irqchip, seed)
    c.chip_id = chip_id
    return c


def _vcpu(seed: int) -> VcpuState:
    return VcpuState(cpuid=[_filled(abi.kvm_cpuid_entry2, seed + i) for i in range(3)], mp_state=seed % 5,
                     regs=_filled(abi.kvm_regs, seed), sregs=_filled(abi.kvm_sregs, seed),
                     xsave=bytes(range(256)) * 16, xcrs=_filled(abi.kvm_xcrs, seed),
                     debugregs=_filled(abi.kvm_debugregs, seed), lapic=_filled(abi.kvm_lapic_state, seed),
                     msrs={0x10: 123456789 + seed, 0xC0000082: 0xFFFF_FFFF_8100_0000, 0x6E0: 0},
                     vcpu_events=_filled(abi.kvm_vcpu_events, seed), tsc_khz=2_600_000)


def _snap(vcpus: int = 2, devices: dict | None = None) -> Snapshot:
    vm = VmState(clock=_filled(abi.kvm_clock_data, 1), pic_master=_chip(0, 2), pic_slave=_chip(1, 3),
                 ioapic=_chip(2, 4), pit=_filled(abi.kvm_pit_state2, 5))
    return Snapshot(VmSummary(REGIONS, vcpus, "console=ttyS0 quiet", {"kernel": "/boot/vmlinux"}),
                    {"vendor": "GenuineIntel", "family": 6, "model": 85, "stepping": 7, "features": {"0x1.0.ecx": 5}},
                    vm, [_vcpu(i) for i in range(vcpus)],
                    devices if devices is not None else {"serial": {"ier": 1, "rx_fifo": b"ab\0", "input": b""}},
                    MemoryInfo("full", "ab" * 16, None, REGIONS))


def _as_dicts(s: Snapshot) -> tuple:
    return (s.config, s.cpu, s.vm.to_dict(), [v.to_dict() for v in s.vcpus], s.devices, s.memory)


def _with_payload(payload: object) -> bytes:
    """A well-formed state file (right header and CRC) around an arbitrary payload."""
    body = snapshot._HEADER.pack(MAGIC, snapshot.FORMAT_VERSION, len(p := encode_payload(payload))) + p
    return body + struct.pack("<I", zlib.crc32(body))


# --- the state file ------------------------------------------------------------------------------------------------
def test_state_file_round_trips_config_cpu_vm_vcpus_devices_and_memory_info(tmp_path):
    snap = _snap()
    write_state(tmp_path / "state", snap)
    back = read_state(tmp_path / "state")
    assert _as_dicts(back) == _as_dicts(snap)
    assert bytes(back.vcpus[1].regs) == bytes(snap.vcpus[1].regs)
    assert list(back.vcpus[0].msrs) == [0x10, 0xC0000082, 0x6E0]  # order kept: TSC first


def test_state_file_starts_with_magic_version_and_length_and_ends_with_crc32():
    data = pack_state(_snap())
    magic, version, length = struct.unpack_from("<8sIQ", data)
    assert (magic, version, len(data)) == (b"POPEKSNP", 1, 20 + length + 4)
    assert struct.unpack_from("<I", data, len(data) - 4)[0] == zlib.crc32(data[:-4])


def test_bad_magic_is_rejected_as_not_a_state_file():
    data = b"XOPEKSNP" + pack_state(_snap())[8:]
    with pytest.raises(SnapshotError, match=r"not a Popek snapshot state file \(magic b'XOPEKSNP'"):
        unpack_state(data)


def test_other_format_version_is_rejected_naming_both_versions():
    data = bytearray(pack_state(_snap()))
    struct.pack_into("<I", data, 8, 2)
    with pytest.raises(SnapshotError, match=r"format version 2; this Popek reads version 1"):
        unpack_state(bytes(data))


@pytest.mark.parametrize("keep", [0, 7, 19, 20, 21, 500, -5, -4, -1])
def test_truncated_state_file_is_rejected_as_truncated(keep):
    data = pack_state(_snap())
    cut = data[:keep] if keep >= 0 else data[:len(data) + keep]
    with pytest.raises(SnapshotError, match=r"truncated: \d+ bytes"):
        unpack_state(cut, "s.state")


@pytest.mark.parametrize("where", [20, 100, 3000, -5])
def test_flipped_byte_is_caught_by_the_crc(where):
    data = bytearray(pack_state(_snap()))
    data[where] ^= 0x10
    with pytest.raises(SnapshotError, match=r"CRC-32 mismatch .*: corrupt"):
        unpack_state(bytes(data))


def test_trailing_bytes_after_the_crc_are_rejected():
    with pytest.raises(SnapshotError, match=r"3 bytes of unexpected data after the CRC"):
        unpack_state(pack_state(_snap()) + b"xyz")


def test_read_state_names_the_file_in_its_error(tmp_path):
    (tmp_path / "s").write_bytes(pack_state(_snap())[:30])
    with pytest.raises(SnapshotError, match=rf"^{tmp_path / 's'}: truncated"):
        read_state(tmp_path / "s")


def test_a_struct_of_another_size_is_rejected_before_any_kvm_call():
    payload = decode_payload(pack_state(_snap())[20:-4])
    payload["vcpus"][1]["regs"]["size"] = 140
    with pytest.raises(SnapshotError, match=r"vcpus\[1\]\.regs: kvm_regs of 140 bytes in the record, this Popek's "
                                            r"is 144 bytes"):
        unpack_state(_with_payload(payload))


def test_a_struct_record_of_another_type_or_short_data_is_rejected():
    rec = pack_struct(_filled(abi.kvm_sregs, 1))
    with pytest.raises(StateError, match=r"sregs: record holds a kvm_sregs, expected kvm_regs"):
        unpack_struct(abi.kvm_regs, rec, "sregs")
    rec["data"] = rec["data"][:-1]
    with pytest.raises(StateError, match=r"kvm_sregs data is 311 bytes, the record says 312"):
        unpack_struct(abi.kvm_sregs, rec, "x")


def test_missing_field_and_vcpu_count_mismatch_are_rejected():
    payload = decode_payload(pack_state(_snap())[20:-4])
    del payload["vcpus"][0]["lapic"]
    with pytest.raises(SnapshotError, match=r"vcpus\[0\] lacks lapic"):
        unpack_state(_with_payload(payload))
    payload = decode_payload(pack_state(_snap())[20:-4])
    payload["config"]["vcpu_count"] = 3
    with pytest.raises(SnapshotError, match=r"2 vCPU states for a VM of 3 vCPUs"):
        unpack_state(_with_payload(payload))


def test_an_irqchip_record_for_the_wrong_chip_is_rejected():
    payload = decode_payload(pack_state(_snap())[20:-4])
    payload["vm"]["ioapic"] = pack_struct(_chip(0, 9))
    with pytest.raises(SnapshotError, match=r"vm\.ioapic: kvm_irqchip has chip_id 0, expected 2"):
        unpack_state(_with_payload(payload))


# --- device state: tagged JSON ---------------------------------------------------------------------------------------
def test_device_state_dicts_with_bytes_nested_lists_none_and_floats_survive(tmp_path):
    devices = {"rtc": {"cmos": bytes(range(128)), "offset": -1.5, "nmi_disabled": False},
               "virtio-blk": {"queues": [{"size": 256, "tag": b"\xff\x00"}], "reset_reason": None},
               "pci": {"config": b"\0" * 256, "bars": [b"", b"\x01"]}}
    write_state(tmp_path / "s", _snap(devices=devices))
    back = read_state(tmp_path / "s").devices
    assert back == devices
    assert type(back["rtc"]["cmos"]) is bytes and back["virtio-blk"]["reset_reason"] is None


@pytest.mark.parametrize("bad, message", [
    ({"x": {1, 2}}, r"\$\.x: a set cannot be stored"),
    ({1: "a"}, r"key 1 is a int; snapshot dict keys must be strings"),
    ({"$bytes": "AA=="}, r"key '\$bytes' starts with '\$', which the snapshot format reserves"),
    ({"d": [object()]}, r"\$\.d\[0\]: a object cannot be stored"),
])
def test_values_json_cannot_carry_faithfully_are_refused_with_their_path(bad, message):
    with pytest.raises(SnapshotError, match=message):
        encode_payload(bad)


_plain = hs.recursive(hs.none() | hs.booleans() | hs.integers() | hs.text() | hs.binary() |
                      hs.floats(allow_nan=False),
                      lambda inner: hs.lists(inner, max_size=4) | hs.dictionaries(
                          hs.text().filter(lambda k: not k.startswith("$")), inner, max_size=4), max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(_plain)
def test_tagged_json_round_trips_any_plain_value(value):
    assert decode_payload(encode_payload(value)) == value


# --- CPU compatibility -----------------------------------------------------------------------------------------------
def _cpuid(vendor=b"GenuineIntel", eax1=0x00050657, ebx7=0b1011, extra=()):
    def e(fn, idx=0, **regs):
        return abi.kvm_cpuid_entry2(function=fn, index=idx, **regs)
    b, d, c = struct.unpack("<III", vendor[0:4] + vendor[4:8] + vendor[8:12])
    return [e(0, eax=0xD, ebx=b, edx=d, ecx=c), e(1, eax=eax1, ecx=0x80202001, edx=0x178BFBFF),
            e(7, 0, ebx=ebx7), e(7, 1, eax=0), *extra]


def test_cpu_fingerprint_decodes_vendor_display_family_model_and_feature_words():
    fp = cpu_fingerprint(_cpuid())
    assert (fp["vendor"], fp["family"], fp["model"], fp["stepping"]) == ("GenuineIntel", 6, 0x55, 7)
    assert fp["features"]["0x7.0.ebx"] == 0b1011 and fp["features"]["0x1.0.edx"] == 0x178BFBFF


def test_same_cpu_or_one_with_more_features_is_accepted():
    check_cpu(cpu_fingerprint(_cpuid()), cpu_fingerprint(_cpuid()))
    check_cpu(cpu_fingerprint(_cpuid(ebx7=0b1011)), cpu_fingerprint(_cpuid(ebx7=0b11111)))


def test_restore_on_a_cpu_lacking_a_feature_bit_is_refused_naming_word_and_bit():
    with pytest.raises(SnapshotError, match=r"CPUID 0x7\.0\.ebx lacks bits 0, 3"):
        check_cpu(cpu_fingerprint(_cpuid(ebx7=0b1011)), cpu_fingerprint(_cpuid(ebx7=0b0010)))


def test_restore_on_another_vendor_or_model_is_refused():
    with pytest.raises(SnapshotError, match=r"vendor 'GenuineIntel' here 'AuthenticAMD'"):
        check_cpu(cpu_fingerprint(_cpuid()), cpu_fingerprint(_cpuid(vendor=b"AuthenticAMD")))
    with pytest.raises(SnapshotError, match=r"model 85 here 106"):
        check_cpu(cpu_fingerprint(_cpuid()), cpu_fingerprint(_cpuid(eax1=0x000606A6)))


# --- atomic writes -------------------------------------------------------------------------------------------------
def _fail_writes_after(monkeypatch, n_ok: int, exc: BaseException):
    real, calls = os.write, []

    def write(fd, data):
        calls.append(len(data))
        if len(calls) > n_ok:
            raise exc
        return real(fd, data[:max(1, len(data) // 2)])  # short writes too
    monkeypatch.setattr(os, "write", write)
    return calls


def test_enospc_mid_state_write_keeps_the_old_state_file_and_removes_the_temporary(tmp_path, monkeypatch):
    old = _snap(1)
    write_state(tmp_path / "state", old)
    before = (tmp_path / "state").read_bytes()
    _fail_writes_after(monkeypatch, 2, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError, match=r"writing .*state failed: No space left on device; the previous file is "
                                      r"unchanged") as e:
        write_state(tmp_path / "state", _snap(2))
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert (tmp_path / "state").read_bytes() == before
    assert os.listdir(tmp_path) == ["state"]
    assert len(read_state(tmp_path / "state").vcpus) == 1


def test_failure_mid_memory_write_keeps_the_old_memory_file_and_removes_the_temporary(tmp_path, monkeypatch):
    mem = GuestMemory(REGIONS)
    mem.write(0x5000, b"old")
    old = write_memory(tmp_path / "mem", mem)
    before = (tmp_path / "mem").read_bytes()
    mem.write(0x5000, b"new")
    mem.write(0x9000, b"more")
    _fail_writes_after(monkeypatch, 1, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        write_memory(tmp_path / "mem", mem)
    monkeypatch.undo()
    assert (tmp_path / "mem").read_bytes() == before and read_memory_info(tmp_path / "mem") == old
    assert os.listdir(tmp_path) == ["mem"]
    mem.close()


def test_a_process_dying_mid_write_leaves_the_previous_snapshot_readable(tmp_path):
    write_state(tmp_path / "state", _snap(1))
    before = (tmp_path / "state").read_bytes()
    pid = os.fork()
    if pid == 0:  # child: die (no cleanup, like SIGKILL) in the middle of writing the new state file
        real = os.write
        os.write = lambda fd, data: os._exit(9) if len(data) > 100 else real(fd, data)
        try:
            write_state(tmp_path / "state", _snap(2))
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9
    assert (tmp_path / "state").read_bytes() == before
    assert len(read_state(tmp_path / "state").vcpus) == 1


# --- memory files --------------------------------------------------------------------------------------------------
def test_full_memory_file_is_sparse_for_mostly_zero_memory_and_maps_back_exactly(tmp_path):
    mem = GuestMemory([(0, 64 << 20)])
    mem.write(0x1000, b"boot")
    mem.write(0x2A_F000, bytes([7]) * PAGE_SIZE)
    mem.write(64 * PAGE_SIZE * 100 - 3, b"end")  # straddles two pages
    info = write_memory(tmp_path / "mem", mem)
    st = os.stat(tmp_path / "mem")
    assert st.st_size == (64 << 20) + PAGE_SIZE  # RAM + trailer
    assert st.st_blocks * 512 <= 64 * PAGE_SIZE, st.st_blocks  # 4 data pages + trailer, far below 64 MiB
    back = load_memory(tmp_path / "mem", info)
    assert back.read(0, 64 << 20) == mem.read(0, 64 << 20)
    back.close()
    mem.close()


def _memory(pattern: int) -> GuestMemory:
    mem = GuestMemory(REGIONS)
    for gpa, size in REGIONS:
        for p in range(0, size, 3 * PAGE_SIZE):
            mem.write(gpa + p, bytes([pattern, p >> 12 & 0xFF]) * 8)
    return mem


def _bitmaps(pages: dict[int, list[int]]) -> list[bytes]:
    out = []
    for i, (_, size) in enumerate(REGIONS):
        bm = bytearray((size // PAGE_SIZE + 63) // 64 * 8)
        for p in pages.get(i, []):
            bm[p >> 3] |= 1 << (p & 7)
        out.append(bytes(bm))
    return out


def _ram(path) -> bytes:
    with open(path, "rb") as f:
        return f.read(sum(s for _, s in REGIONS))


def test_diff_of_the_pages_in_the_bitmap_applied_on_its_base_equals_the_full_snapshot(tmp_path):
    mem = _memory(1)
    base = write_memory(tmp_path / "base", mem)
    changed = {0: [0, 3, 4, 5, 200, 255], 1: [63]}  # incl. a run, the last page, a page in the high region
    for region, pages in changed.items():
        gpa = REGIONS[region][0]
        for p in pages:
            mem.write(gpa + p * PAGE_SIZE, bytes([0xA0 + p % 16]) * PAGE_SIZE)
    mem.write(3 * PAGE_SIZE, bytes(PAGE_SIZE))  # a dirty page the guest zeroed must not come back from the base
    diff = write_diff_memory(tmp_path / "diff", mem, _bitmaps(changed), base)
    full = write_memory(tmp_path / "full", mem)
    merged = merge_diff(tmp_path / "base", tmp_path / "diff", tmp_path / "merged")
    assert _ram(tmp_path / "merged") == _ram(tmp_path / "full")
    assert (merged.kind, merged.id, diff.base_id) == ("full", diff.id, base.id) and full.id != diff.id
    restored = load_memory(tmp_path / "diff", diff, base_path=tmp_path / "base")
    assert all(restored.read(g, s) == mem.read(g, s) for g, s in REGIONS)
    assert _ram(tmp_path / "base") != _ram(tmp_path / "full")  # applying the diff did not touch the base
    restored.close()
    mem.close()


def test_diff_memory_file_holds_only_the_dirty_pages(tmp_path):
    mem = _memory(1)
    base = write_memory(tmp_path / "base", mem)
    write_diff_memory(tmp_path / "diff", mem, _bitmaps({0: [3, 6]}), base)
    with open(tmp_path / "diff", "rb") as f:
        ram = f.read(REGIONS[0][1])
    nonzero = [p for p in range(REGIONS[0][1] // PAGE_SIZE) if ram[p * PAGE_SIZE:(p + 1) * PAGE_SIZE].strip(b"\0")]
    assert nonzero == [3, 6]
    mem.close()


def test_diff_on_another_base_and_a_diff_without_its_base_are_refused(tmp_path):
    mem = _memory(1)
    base = write_memory(tmp_path / "base", mem)
    other = write_memory(tmp_path / "other", mem)
    diff = write_diff_memory(tmp_path / "diff", mem, _bitmaps({0: [1]}), base)
    with pytest.raises(SnapshotError, match=rf"is a diff on memory {base.id}, but .*other is memory {other.id}"):
        merge_diff(tmp_path / "other", tmp_path / "diff", tmp_path / "out")
    with pytest.raises(SnapshotError, match=r"is a diff on memory .*: give its base memory file"):
        load_memory(tmp_path / "diff", diff)
    assert not (tmp_path / "out").exists()
    mem.close()


def test_memory_file_from_another_snapshot_is_refused(tmp_path):
    mem = _memory(1)
    write_memory(tmp_path / "mem", mem)
    stale = MemoryInfo("full", "00" * 16, None, REGIONS)
    with pytest.raises(SnapshotError, match=r"the two files are from different snapshots"):
        load_memory(tmp_path / "mem", stale)
    mem.close()


@pytest.mark.parametrize("damage", ["truncate", "flip-trailer", "not-a-memory-file"])
def test_truncated_or_corrupt_memory_file_is_refused(tmp_path, damage):
    mem = _memory(1)
    info = write_memory(tmp_path / "mem", mem)
    data = bytearray((tmp_path / "mem").read_bytes())
    if damage == "truncate":
        data = data[:-PAGE_SIZE - 1] + data[-PAGE_SIZE:]  # trailer intact, one RAM byte short
        message = r"but its trailer describes .* \(truncated or corrupt\)"
    elif damage == "flip-trailer":
        data[-PAGE_SIZE + 20] ^= 1
        message = r"trailer CRC-32 mismatch: corrupt"
    else:
        data = data[:-PAGE_SIZE]
        message = r"no Popek memory trailer at its end"
    (tmp_path / "mem").write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match=message):
        load_memory(tmp_path / "mem", info)
    mem.close()


def test_dirty_bitmaps_are_kvms_log_per_slot_plus_the_pages_the_vmm_wrote():
    class FakeVm:  # KVM_GET_DIRTY_LOG answers: slot 0 has page 2 dirty
        def __init__(self):
            self.asked = []

        def get_dirty_log(self, slot, npages):
            self.asked.append((slot, npages))
            return _bitmaps({0: [2]})[slot]

    mem, vm = GuestMemory(REGIONS), FakeVm()
    maps = snapshot.dirty_bitmaps(vm, mem, host_dirty=[0x5123, REGIONS[1][0] + 63 * PAGE_SIZE + 8])
    assert vm.asked == [(0, 256), (1, 64)]
    assert maps == _bitmaps({0: [2, 5], 1: [63]})
    mem.close()


def test_a_state_file_naming_a_malformed_memory_id_is_refused():
    payload = decode_payload(pack_state(_snap())[20:-4])
    payload["memory"]["id"] = "ab" * 8
    with pytest.raises(SnapshotError, match=r"memory\.id: 'abababababababab' is not a snapshot id"):
        unpack_state(_with_payload(payload))


def test_wrong_size_bitmap_is_refused(tmp_path):
    mem = _memory(1)
    base = write_memory(tmp_path / "base", mem)
    with pytest.raises(SnapshotError, match=r"dirty bitmap of region 0x0 is 8 bytes, expected 32"):
        write_diff_memory(tmp_path / "diff", mem, [b"\0" * 8, _bitmaps({})[1]], base)
    mem.close()


# --- GuestMemory.from_file -----------------------------------------------------------------------------------------
def test_private_file_mapping_is_copy_on_write_and_clones_do_not_see_each_other(tmp_path):
    path = tmp_path / "ram"
    path.write_bytes(b"A" * PAGE_SIZE + b"B" * 2 * PAGE_SIZE + b"trailer")
    a = GuestMemory.from_file(path, [(0, PAGE_SIZE), (0x10_0000, 2 * PAGE_SIZE)])
    b = GuestMemory.from_file(path, [(0, PAGE_SIZE), (0x10_0000, 2 * PAGE_SIZE)])
    assert a.read(0x10_0000, 2) == b"BB" and a.regions[1].host_address != b.regions[1].host_address
    a.write(0, b"xy")
    assert (a.read(0, 2), b.read(0, 2), path.read_bytes()[:2]) == (b"xy", b"AA", b"AA")
    a.close()
    b.close()


def test_shared_file_mapping_writes_through_and_a_short_file_is_refused(tmp_path):
    path = tmp_path / "ram"
    path.write_bytes(bytes(2 * PAGE_SIZE))
    m = GuestMemory.from_file(path, [(0, 2 * PAGE_SIZE)], private=False)
    m.write(PAGE_SIZE, b"hi")
    m.close()
    assert path.read_bytes()[PAGE_SIZE:PAGE_SIZE + 2] == b"hi"
    with pytest.raises(ValueError, match=r"8192 bytes, the memory regions need 12288"):
        GuestMemory.from_file(path, [(0, 3 * PAGE_SIZE)])


def test_full_memory_file_of_mostly_untouched_ram_reads_only_the_written_pages(tmp_path):
    from popek.snapshot import load_memory, write_memory

    with GuestMemory([(0, 256 << 20)]) as mem:
        mem.write(5 << 20, b"a")
        mem.write((200 << 20) + 4095, b"bc")  # straddles two pages
        info = write_memory(tmp_path / "m", mem)
        r = mem.regions[0]
        assert os.fstat(r.fd).st_blocks * 512 <= 4 * 4096  # the untouched memfd holes were not read (no shmem pages)
        with load_memory(tmp_path / "m", info) as back:
            assert back.read(5 << 20, 1) == b"a" and back.read((200 << 20) + 4095, 2) == b"bc"
            assert back.read(0, 4096) == bytes(4096) and back.read(100 << 20, 4096) == bytes(4096)
    assert os.stat(tmp_path / "m").st_blocks * 512 <= 5 * 4096  # sparse: three data pages and the trailer
