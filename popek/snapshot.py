"""Snapshot files: the state file (header, tagged-JSON payload, CRC-32) and the memory file (sparse RAM, diffs)."""

# State file (all integers little-endian):
#   magic b"POPEKSNP" | format version u32 | payload length u64 | payload | CRC-32 u32
# The CRC is zlib.crc32 (CRC-32/ISO-HDLC, the zip/PNG polynomial 0x04C11DB7 reflected) over magic..payload. The
# payload is UTF-8 JSON of one object {config, cpu, vm, vcpus, devices, memory}; bytes anywhere are tagged as
# {"$bytes": "<base64>"} (keys starting with "$" are reserved), tuples become lists. No pickle: a snapshot file
# may come from elsewhere and loading it must not run code.
#
# Memory file: the RAM regions' bytes back to back from offset 0 (region i at the sum of the sizes before it, in
# MemoryInfo.regions order) so it can be mmap()ed straight into a GuestMemory; all-zero pages are holes (sparse).
# Then, for a diff, the dirty bitmaps (one per region, KVM_GET_DIRTY_LOG layout: bit p of little-endian u64 words
# = page p; ceil(pages/64)*8 bytes each) padded to a page; then a 4096-byte trailer: magic b"POPEKMEM", version
# u32, kind u32 (0 full, 1 diff), RAM bytes u64, bitmap bytes u64, snapshot id (16 bytes), base id (16 bytes, diff
# only), region count u32, (gpa u64, size u64) per region, zero padding, CRC-32 of the trailer's first 4092 bytes.
# A diff holds only the pages its bitmap names (zero ones as holes); the rest come from its base, the memory file
# whose id is the diff's base id.
#
# Writing is atomic per file: a temporary file in the target directory, fsync, rename over the target, fsync the
# directory (so the rename itself is durable). A failure (ENOSPC, crash) leaves the previous file as it was and
# removes the temporary. Write the memory file first and the state file second: the state file records the memory
# file's id, so a crash between the two renames is detected at load ("belongs to another snapshot") instead of
# pairing new memory with old vCPU state.
#
# Diff snapshots (Firecracker's design): register every RAM slot with KVM_MEM_LOG_DIRTY_PAGES (slot i = region i,
# as popek.vm does), call dirty_bitmaps() once when the base snapshot is taken (it also resets KVM's log), and at
# the next snapshot dirty_bitmaps() again, passing the pages the VMM itself wrote (device DMA, e.g. virtio used
# rings and read buffers): KVM logs only guest writes. popek.persist.save(diff=True) does this, with the VMM's
# writes from GuestMemory's host-write log (GuestMemory.take_host_dirty; virtqueues and GuestMemory.write feed it).

from __future__ import annotations

import base64
import contextlib
import json
import os
import struct
import tempfile
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from popek.kvm.abi import kvm_cpuid_entry2
from popek.kvm.system import VmFd
from popek.memory import PAGE_SIZE, GuestMemory, GuestMemoryError
from popek.state import StateError, VcpuState, VmState

MAGIC = b"POPEKSNP"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIQ")  # magic, format version, payload length
_CRC = struct.Struct("<I")
#: A state file is a few KiB per vCPU; refuse to read anything implausibly large.
MAX_STATE_FILE = 64 << 20

MEM_MAGIC = b"POPEKMEM"
MEM_FORMAT_VERSION = 1
TRAILER_SIZE = PAGE_SIZE
_TRAILER = struct.Struct("<8sIIQQ16s16sI")
_REGION = struct.Struct("<QQ")
MAX_REGIONS = (TRAILER_SIZE - _TRAILER.size - _CRC.size) // _REGION.size
_KINDS = {"full": 0, "diff": 1}
_CHUNK = 256 * PAGE_SIZE  # zero test granularity before looking at single pages
_ZERO_CHUNK = bytes(_CHUNK)
_ZERO_PAGE = bytes(PAGE_SIZE)


class SnapshotError(ValueError):
    """A snapshot file that is truncated, corrupt, of another format version, or incompatible with this host/VM."""


# --- tagged JSON -------------------------------------------------------------------------------------------------
def _encode(obj: object, path: str) -> object:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, (list, tuple)):
        return [_encode(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise SnapshotError(f"{path}: key {k!r} is a {type(k).__name__}; snapshot dict keys must be strings")
            if k.startswith("$"):
                raise SnapshotError(f"{path}: key {k!r} starts with '$', which the snapshot format reserves")
            out[k] = _encode(v, f"{path}.{k}")
        return out
    raise SnapshotError(f"{path}: a {type(obj).__name__} cannot be stored in a snapshot (use None, bool, int, float, "
                        f"str, bytes, list or dict)")


def _decode(obj: object) -> object:
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    if isinstance(obj, dict):
        if "$bytes" in obj:
            if len(obj) != 1 or not isinstance(obj["$bytes"], str):
                raise SnapshotError("malformed bytes value in the payload")
            try:
                return base64.b64decode(obj["$bytes"], validate=True)
            except ValueError as e:
                raise SnapshotError(f"malformed base64 in the payload: {e}") from None
        if any(k.startswith("$") for k in obj):
            raise SnapshotError(f"unknown tag {next(k for k in obj if k.startswith('$'))!r} in the payload")
        return {k: _decode(v) for k, v in obj.items()}
    return obj


def encode_payload(obj: object) -> bytes:
    """``obj`` (None/bool/int/float/str/bytes/list/tuple/dict with str keys) as tagged JSON (UTF-8).

    :raises SnapshotError: naming the path of a value that cannot be stored.
    """
    return json.dumps(_encode(obj, "$"), separators=(",", ":"), allow_nan=True).encode()


def decode_payload(data: bytes) -> object:
    """The inverse of ``encode_payload``. :raises SnapshotError: for invalid JSON or a malformed tag."""
    try:
        return _decode(json.loads(data))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SnapshotError(f"payload is not valid JSON: {e}") from None


# --- CPU fingerprint ---------------------------------------------------------------------------------------------
#: CPUID words that hold feature flags: (leaf, subleaf, register) (Intel SDM vol. 2A, CPUID; AMD APM vol. 3).
FEATURE_WORDS = ((0x1, 0, "ecx"), (0x1, 0, "edx"), (0x7, 0, "ebx"), (0x7, 0, "ecx"), (0x7, 0, "edx"),
                 (0x7, 1, "eax"), (0xD, 0, "eax"), (0xD, 1, "eax"), (0x80000001, 0, "ecx"),
                 (0x80000001, 0, "edx"), (0x80000007, 0, "edx"), (0x80000008, 0, "ebx"))


def cpu_fingerprint(entries: list[kvm_cpuid_entry2]) -> dict:
    """Vendor, family/model/stepping (CPUID leaf 1 EAX, display family/model per SDM vol. 2A) and the feature
    words of ``entries`` (``Kvm.supported_cpuid()``): ``{"vendor", "family", "model", "stepping", "features":
    {"0x7.0.ebx": int, ...}}``."""
    leaves = {(e.function, e.index): e for e in entries}

    def leaf(fn: int, sub: int = 0):
        return leaves.get((fn, sub)) or (leaves.get((fn, 0)) if sub == 0 else None)

    l0, l1 = leaf(0), leaf(1)
    vendor = struct.pack("<III", l0.ebx, l0.edx, l0.ecx).decode("ascii", "replace") if l0 else ""
    eax = l1.eax if l1 else 0
    base_family, base_model = (eax >> 8) & 0xF, (eax >> 4) & 0xF
    family = base_family + ((eax >> 20) & 0xFF if base_family == 0xF else 0)
    model = base_model | (((eax >> 16) & 0xF) << 4 if base_family in (0x6, 0xF) else 0)
    features = {}
    for fn, sub, reg in FEATURE_WORDS:
        e = leaf(fn, sub)
        if e is not None:
            features[f"{fn:#x}.{sub}.{reg}"] = getattr(e, reg)
    return {"vendor": vendor, "family": family, "model": model, "stepping": eax & 0xF, "features": features}


def check_cpu(saved: dict, here: dict) -> None:
    """Refuse to restore on a CPU unlike the one the snapshot was taken on.

    Vendor, family and model must be equal; every feature bit the saved host had must be present here (extra
    bits are fine: the guest keeps the CPUID it was saved with).
    :raises SnapshotError: listing each difference (feature words with the missing bit numbers).
    """
    problems = [f"{k} {saved.get(k)!r} here {here.get(k)!r}" for k in ("vendor", "family", "model")
                if saved.get(k) != here.get(k)]
    for word, bits in sorted(saved.get("features", {}).items()):
        missing = bits & ~here.get("features", {}).get(word, 0)
        if missing:
            problems.append(f"CPUID {word} lacks bits {', '.join(str(b) for b in range(32) if missing >> b & 1)}")
    if problems:
        raise SnapshotError("the snapshot was taken on another kind of CPU: " + "; ".join(problems))


# --- the state file ---------------------------------------------------------------------------------------------
@dataclass
class VmSummary:
    """What the VM was built with: ``memory_regions`` [(gpa, size)] in bytes, ``vcpu_count``, kernel ``cmdline``;
    ``extra`` for anything else the VM records (plain values)."""

    memory_regions: list[tuple[int, int]]
    vcpu_count: int
    cmdline: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class MemoryInfo:
    """Which memory file goes with a state file: ``kind`` "full" or "diff", ``id`` (32 hex digits), ``base_id``
    (a diff's base, else None), ``regions`` [(gpa, size)] in file order."""

    kind: str
    id: str
    base_id: str | None
    regions: list[tuple[int, int]]

    @property
    def ram_size(self) -> int:
        return sum(size for _, size in self.regions)


@dataclass
class Snapshot:
    """Everything a state file holds. ``cpu`` is ``cpu_fingerprint(kvm.supported_cpuid())`` of the saving host;
    ``devices`` maps a device name to its ``state()`` dict (plain values, bytes allowed)."""

    config: VmSummary
    cpu: dict
    vm: VmState
    vcpus: list[VcpuState]
    devices: dict[str, dict]
    memory: MemoryInfo


def pack_state(snap: Snapshot) -> bytes:
    """The state file bytes for ``snap``. :raises SnapshotError: if a device state holds an unstorable value."""
    c, m = snap.config, snap.memory
    payload = encode_payload({
        "config": {"memory_regions": [list(r) for r in c.memory_regions], "vcpu_count": c.vcpu_count,
                   "cmdline": c.cmdline, "extra": c.extra},
        "cpu": snap.cpu, "vm": snap.vm.to_dict(), "vcpus": [v.to_dict() for v in snap.vcpus],
        "devices": snap.devices,
        "memory": {"kind": m.kind, "id": m.id, "base_id": m.base_id, "regions": [list(r) for r in m.regions]}})
    body = _HEADER.pack(MAGIC, FORMAT_VERSION, len(payload)) + payload
    return body + _CRC.pack(zlib.crc32(body))


def _regions(v: object, what: str) -> list[tuple[int, int]]:
    if not isinstance(v, list) or not all(isinstance(r, list) and len(r) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in r) for r in v):
        raise SnapshotError(f"{what}: expected a list of [gpa, size] pairs")
    return [(r[0], r[1]) for r in v]


def _get(d: object, key: str, types: type | tuple, what: str):
    if not isinstance(d, dict) or key not in d:
        raise SnapshotError(f"{what} lacks {key!r}")
    if not isinstance(d[key], types) or (isinstance(d[key], bool) and types is int):
        raise SnapshotError(f"{what}.{key}: unexpected {type(d[key]).__name__}")
    return d[key]


def unpack_state(data: bytes, source: str = "state file") -> Snapshot:
    """Validate and decode state file bytes: magic, version, length, CRC, then every field and struct size (before
    anything touches KVM).

    :raises SnapshotError: saying what is wrong with ``source``.
    """
    n = len(data)
    if n < _HEADER.size:
        raise SnapshotError(f"{source}: truncated: {n} bytes, a state file header is {_HEADER.size}")
    magic, version, length = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotError(f"{source}: not a Popek snapshot state file (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise SnapshotError(f"{source}: format version {version}; this Popek reads version {FORMAT_VERSION}")
    want = _HEADER.size + length + _CRC.size
    if n < want:
        raise SnapshotError(f"{source}: truncated: {n} bytes, its header says {want}")
    if n > want:
        raise SnapshotError(f"{source}: {n - want} bytes of unexpected data after the CRC")
    stored, computed = _CRC.unpack_from(data, want - _CRC.size)[0], zlib.crc32(data[:want - _CRC.size])
    if stored != computed:
        raise SnapshotError(f"{source}: CRC-32 mismatch (stored {stored:#010x}, computed {computed:#010x}): corrupt")
    try:
        p = decode_payload(data[_HEADER.size:want - _CRC.size])
        cfg, mem = _get(p, "config", dict, "payload"), _get(p, "memory", dict, "payload")
        config = VmSummary(_regions(_get(cfg, "memory_regions", list, "config"), "config.memory_regions"),
                           _get(cfg, "vcpu_count", int, "config"), _get(cfg, "cmdline", str, "config"),
                           _get(cfg, "extra", dict, "config"))
        kind = _get(mem, "kind", str, "memory")
        if kind not in _KINDS:
            raise SnapshotError(f"memory.kind {kind!r} is neither 'full' nor 'diff'")
        base_id = mem.get("base_id")
        _check_id(mem.get("id"), "memory.id")
        if base_id is not None or kind == "diff":
            _check_id(base_id, "memory.base_id")
        memory = MemoryInfo(kind, _get(mem, "id", str, "memory"), base_id,
                            _regions(_get(mem, "regions", list, "memory"), "memory.regions"))
        vcpus = [VcpuState.from_dict(v, f"vcpus[{i}]") for i, v in enumerate(_get(p, "vcpus", list, "payload"))]
        devices = _get(p, "devices", dict, "payload")
        if not all(isinstance(v, dict) for v in devices.values()):
            raise SnapshotError("devices: every device state must be a dict")
        snap = Snapshot(config, _get(p, "cpu", dict, "payload"), VmState.from_dict(_get(p, "vm", dict, "payload")),
                        vcpus, devices, memory)
    except (StateError, SnapshotError) as e:
        raise SnapshotError(f"{source}: {e}") from None
    if len(vcpus) != config.vcpu_count:
        raise SnapshotError(f"{source}: {len(vcpus)} vCPU states for a VM of {config.vcpu_count} vCPUs")
    if memory.regions != config.memory_regions:
        raise SnapshotError(f"{source}: memory regions {memory.regions} differ from the VM's {config.memory_regions}")
    return snap


def write_state(path: str | os.PathLike, snap: Snapshot) -> None:
    """Write the state file atomically (module comment). :raises SnapshotError: for an unstorable device value;
    OSError if writing fails (the previous file is then unchanged)."""
    data = pack_state(snap)
    with _atomic_file(path) as fd:
        _write_all(fd, data)


def read_state(path: str | os.PathLike) -> Snapshot:
    """Read and validate a state file. :raises SnapshotError: see ``unpack_state``; OSError if it cannot be read."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_STATE_FILE:
            raise SnapshotError(f"{path}: {size} bytes is far more than a state file holds ({MAX_STATE_FILE} max)")
        return unpack_state(f.read(), str(path))


def check_host(snap: Snapshot, supported_cpuid: list[kvm_cpuid_entry2]) -> None:
    """``check_cpu`` of the snapshot against this host's ``Kvm.supported_cpuid()``. :raises SnapshotError:"""
    check_cpu(snap.cpu, cpu_fingerprint(supported_cpuid))


# --- atomic files ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike) -> Iterator[int]:
    """Yield the fd of a temporary file next to ``path``; on success fsync it, rename it to ``path`` and fsync the
    directory; on any exception remove it and leave ``path`` alone."""
    path = os.path.abspath(os.fspath(path))
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    try:
        try:
            yield fd
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"writing {path} failed: {e.strerror or e}; the previous file is unchanged") from e
        raise
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# --- memory files -------------------------------------------------------------------------------------------------
def _bitmap_len(size: int) -> int:
    return (size // PAGE_SIZE + 63) // 64 * 8


def _dirty(bitmap: bytes, page: int) -> bool:
    return bool(bitmap[page >> 3] >> (page & 7) & 1)


def _runs(bitmap: bytes, npages: int) -> Iterator[tuple[int, int]]:
    """(first page, count) runs of set bits in a KVM dirty bitmap of ``npages`` pages."""
    start = prev = -2
    for w, word in enumerate(struct.unpack(f"<{len(bitmap) // 8}Q", bitmap)):
        while word:
            low = word & -word
            page = w * 64 + low.bit_length() - 1
            word ^= low
            if page >= npages:
                raise SnapshotError(f"dirty bitmap marks page {page} of a region of {npages} pages")
            if page != prev + 1:
                if start >= 0:
                    yield start, prev - start + 1
                start = page
            prev = page
    if start >= 0:
        yield start, prev - start + 1


def _write_sparse(fd: int, offset: int, data: bytes) -> None:
    """Write ``data`` at file ``offset``, leaving all-zero pages as holes (``data`` is whole pages)."""
    for c in range(0, len(data), _CHUNK):
        chunk = data[c:c + _CHUNK]
        if chunk == _ZERO_CHUNK[:len(chunk)]:
            continue
        view, run = memoryview(chunk), None
        for p in range(0, len(chunk) + PAGE_SIZE, PAGE_SIZE):
            nonzero = p < len(chunk) and chunk[p:p + PAGE_SIZE] != _ZERO_PAGE  # bytes compare: memcmp
            if nonzero and run is None:
                run = p
            elif not nonzero and run is not None:
                os.lseek(fd, offset + c + run, os.SEEK_SET)
                _write_all(fd, view[run:p])
                run = None


def _check_id(v: object, what: str) -> None:
    if not (isinstance(v, str) and len(v) == 32 and all(c in "0123456789abcdef" for c in v)):
        raise SnapshotError(f"{what}: {v!r} is not a snapshot id (32 lowercase hex digits)")


def _trailer(kind: str, ram: int, bitmap_bytes: int, id_: str, base_id: str | None,
             regions: list[tuple[int, int]]) -> bytes:
    _check_id(id_, "memory id")
    if base_id is not None:
        _check_id(base_id, "base memory id")
    if len(regions) > MAX_REGIONS:
        raise SnapshotError(f"{len(regions)} memory regions; the memory file trailer holds at most {MAX_REGIONS}")
    body = _TRAILER.pack(MEM_MAGIC, MEM_FORMAT_VERSION, _KINDS[kind], ram, bitmap_bytes, bytes.fromhex(id_),
                         bytes.fromhex(base_id) if base_id else bytes(16), len(regions))
    body = (body + b"".join(_REGION.pack(g, s) for g, s in regions)).ljust(TRAILER_SIZE - _CRC.size, b"\0")
    return body + _CRC.pack(zlib.crc32(body))


@dataclass
class _MemFile:
    info: MemoryInfo
    bitmap_bytes: int
    fd: int


def _open_memory(path: str | os.PathLike) -> _MemFile:
    """Open a memory file and validate its trailer (magic, CRC, version, sizes). The caller closes ``fd``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size < TRAILER_SIZE:
            raise SnapshotError(f"{path}: {size} bytes, too short for a Popek memory file (truncated?)")
        t = os.pread(fd, TRAILER_SIZE, size - TRAILER_SIZE)
        magic, version, kind, ram, bitmap_bytes, id_, base_id, n = _TRAILER.unpack_from(t)
        if magic != MEM_MAGIC:
            raise SnapshotError(f"{path}: no Popek memory trailer at its end (not a memory file, or truncated)")
        if _CRC.unpack_from(t, TRAILER_SIZE - _CRC.size)[0] != zlib.crc32(t[:TRAILER_SIZE - _CRC.size]):
            raise SnapshotError(f"{path}: memory file trailer CRC-32 mismatch: corrupt")
        if version != MEM_FORMAT_VERSION:
            raise SnapshotError(f"{path}: memory format version {version}; this Popek reads {MEM_FORMAT_VERSION}")
        kinds = {v: k for k, v in _KINDS.items()}
        if kind not in kinds or n > MAX_REGIONS:
            raise SnapshotError(f"{path}: memory file trailer has kind {kind}, {n} regions: corrupt")
        regions = [_REGION.unpack_from(t, _TRAILER.size + i * _REGION.size) for i in range(n)]
        if sum(s for _, s in regions) != ram or size != ram + bitmap_bytes + TRAILER_SIZE:
            raise SnapshotError(f"{path}: {size} bytes, but its trailer describes {ram} bytes of RAM, "
                                f"{bitmap_bytes} of bitmaps and the trailer (truncated or corrupt)")
        info = MemoryInfo(kinds[kind], id_.hex(), base_id.hex() if kinds[kind] == "diff" else None, regions)
        return _MemFile(info, bitmap_bytes, fd)
    except BaseException:
        os.close(fd)
        raise


def _pread(fd: int, n: int, offset: int) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise SnapshotError(f"short read: {len(data)} of {n} bytes at offset {offset}")
    return data


def _bitmaps(m: _MemFile) -> list[bytes]:
    lens = [_bitmap_len(s) for _, s in m.info.regions]
    if sum(lens) > m.bitmap_bytes:
        raise SnapshotError(f"diff memory file has {m.bitmap_bytes} bytes of bitmaps, its regions need {sum(lens)}")
    blob, out, off = _pread(m.fd, sum(lens), m.info.ram_size), [], 0
    for n in lens:
        out.append(blob[off:off + n])
        off += n
    return out


def read_memory_info(path: str | os.PathLike) -> MemoryInfo:
    """The kind, id, base id and regions of a memory file (trailer validated). :raises SnapshotError:"""
    m = _open_memory(path)
    os.close(m.fd)
    return m.info


def write_memory(path: str | os.PathLike, mem: GuestMemory) -> MemoryInfo:
    """Write a full memory file of every region of ``mem`` (all-zero pages as holes), atomically.

    Take it with the vCPUs paused (and device DMA stopped). :returns: its MemoryInfo, for the Snapshot.
    :raises OSError: if writing fails (the previous file is unchanged).
    """
    info = MemoryInfo("full", uuid.uuid4().hex, None, [(r.gpa, r.size) for r in mem.regions])
    with _atomic_file(path) as fd:
        off = 0
        for r in mem.regions:
            for start, end in _data_ranges(r):
                for c in range(start, end, _CHUNK):
                    _write_sparse(fd, off + c, r.map[c:min(c + _CHUNK, end)])
            off += r.size
        os.lseek(fd, off, os.SEEK_SET)
        _write_all(fd, _trailer("full", off, 0, info.id, None, info.regions))
    return info


def _data_ranges(r) -> Iterator[tuple[int, int]]:
    """[start, end) byte ranges of region ``r`` that may hold non-zero data, page aligned. For RAM in its own memfd
    (shared, the file exactly the region) the holes lseek(2) SEEK_HOLE finds are zero and are skipped without
    reading them (reading would allocate shmem pages); any other region is one range."""
    if r.private or os.fstat(r.fd).st_size != r.size:
        yield 0, r.size
        return
    pos = 0
    while pos < r.size:
        try:
            start = os.lseek(r.fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            return
        end = min(os.lseek(r.fd, start, os.SEEK_HOLE), r.size)
        yield start & ~(PAGE_SIZE - 1), -(-end // PAGE_SIZE) * PAGE_SIZE
        pos = end


def dirty_bitmaps(vm: VmFd, mem: GuestMemory, host_dirty: Iterable[int] = ()) -> list[bytes]:
    """One dirty bitmap per region of ``mem``: KVM_GET_DIRTY_LOG of slot i for region i (which also resets KVM's
    log), OR the pages holding the guest physical addresses in ``host_dirty`` (pages the VMM wrote; KVM does not
    log those). The slots must have been registered with KVM_MEM_LOG_DIRTY_PAGES.

    :raises KvmError: KVM_GET_DIRTY_LOG fails (ENOENT: the slot does not log dirty pages); GuestMemoryError for a
        ``host_dirty`` address outside RAM.
    """
    maps = [bytearray(vm.get_dirty_log(slot, r.size // PAGE_SIZE)) for slot, r in enumerate(mem.regions)]
    for gpa in host_dirty:
        r = mem.region_of(gpa)
        page = (gpa - r.gpa) // PAGE_SIZE
        maps[next(i for i, x in enumerate(mem.regions) if x is r)][page >> 3] |= 1 << (page & 7)
    return [bytes(m) for m in maps]


def write_diff_memory(path: str | os.PathLike, mem: GuestMemory, bitmaps: list[bytes], base: MemoryInfo) -> MemoryInfo:
    """Write a diff memory file: the pages of ``mem`` set in ``bitmaps`` (one per region, ``dirty_bitmaps``
    layout) on top of the memory file described by ``base``, atomically.

    :raises SnapshotError: if ``base`` has other regions or a bitmap has the wrong length; OSError on write failure.
    """
    regions = [(r.gpa, r.size) for r in mem.regions]
    if base.regions != regions:
        raise SnapshotError(f"base memory file has regions {base.regions}, this memory {regions}")
    if len(bitmaps) != len(regions):
        raise SnapshotError(f"{len(bitmaps)} dirty bitmaps for {len(regions)} memory regions")
    for (gpa, size), bm in zip(regions, bitmaps):
        if len(bm) != _bitmap_len(size):
            raise SnapshotError(f"dirty bitmap of region {gpa:#x} is {len(bm)} bytes, expected {_bitmap_len(size)}")
    info = MemoryInfo("diff", uuid.uuid4().hex, base.id, regions)
    with _atomic_file(path) as fd:
        off = 0
        for r, bm in zip(mem.regions, bitmaps):
            for first, count in _runs(bm, r.size // PAGE_SIZE):
                _write_sparse(fd, off + first * PAGE_SIZE, r.map[first * PAGE_SIZE:(first + count) * PAGE_SIZE])
            off += r.size
        blob = b"".join(bitmaps)
        blob += bytes(-len(blob) % PAGE_SIZE)
        os.lseek(fd, off, os.SEEK_SET)
        _write_all(fd, blob + _trailer("diff", off, len(blob), info.id, base.id, regions))
    return info


def _check_base(base: _MemFile, diff: _MemFile, base_path, diff_path) -> None:
    if base.info.kind != "full":
        raise SnapshotError(f"{base_path} is itself a diff; merge it onto its own base first (merge_diff)")
    if base.info.id != diff.info.base_id:
        raise SnapshotError(f"{diff_path} is a diff on memory {diff.info.base_id}, but {base_path} is memory "
                            f"{base.info.id}")
    if base.info.regions != diff.info.regions:
        raise SnapshotError(f"{base_path} has regions {base.info.regions}, {diff_path} {diff.info.regions}")


def merge_diff(base_path: str | os.PathLike, diff_path: str | os.PathLike, out_path: str | os.PathLike) -> MemoryInfo:
    """Write the full memory file ``out_path`` = ``base_path`` with the diff's pages applied, atomically (``out_path``
    may be ``base_path``). It keeps the diff's id, so the diff's state file loads it as its memory.

    :raises SnapshotError: if the files do not belong together or are corrupt; OSError on write failure.
    """
    base, diff = _open_memory(base_path), _open_memory(diff_path)
    try:
        _check_base(base, diff, base_path, diff_path)
        bitmaps = _bitmaps(diff)
        info = MemoryInfo("full", diff.info.id, None, diff.info.regions)
        with _atomic_file(out_path) as fd:
            off = 0
            for (_, size), bm in zip(info.regions, bitmaps):
                for c in range(0, size, _CHUNK):
                    chunk = bytearray(_pread(base.fd, min(_CHUNK, size - c), off + c))
                    for p in range(0, len(chunk), PAGE_SIZE):
                        if _dirty(bm, (c + p) // PAGE_SIZE):
                            chunk[p:p + PAGE_SIZE] = _pread(diff.fd, PAGE_SIZE, off + c + p)
                    _write_sparse(fd, off + c, bytes(chunk))
                off += size
            os.lseek(fd, off, os.SEEK_SET)
            _write_all(fd, _trailer("full", off, 0, info.id, None, info.regions))
        return info
    finally:
        os.close(base.fd)
        os.close(diff.fd)


def load_memory(path: str | os.PathLike, info: MemoryInfo, base_path: str | os.PathLike | None = None,
                private: bool = True) -> GuestMemory:
    """Guest RAM for a restore: the memory file ``path`` mapped with ``GuestMemory.from_file`` (``private``:
    MAP_PRIVATE, lazy and copy-on-write, so clones share pages). A diff needs ``base_path``: the base is mapped
    privately and the diff's pages copied over it.

    :raises SnapshotError: if the file is not the one ``info`` (from the state file) names, is corrupt, or a diff
        lacks its base (or is asked for a shared mapping).
    """
    m = _open_memory(path)
    try:
        if m.info.id != info.id:
            raise SnapshotError(f"{path} is memory {m.info.id}; the state file belongs to memory {info.id} (the "
                                f"two files are from different snapshots)")
        if m.info.regions != info.regions:
            raise SnapshotError(f"{path} has regions {m.info.regions}, the state file {info.regions}")
        if m.info.kind == "full":
            return GuestMemory.from_file(path, info.regions, private=private)
        if base_path is None:
            raise SnapshotError(f"{path} is a diff on memory {m.info.base_id}: give its base memory file")
        if not private:
            raise SnapshotError(f"{path} is a diff: only a private mapping can apply it without changing the base")
        base = _open_memory(base_path)
        try:
            _check_base(base, m, base_path, path)
        finally:
            os.close(base.fd)
        mem = GuestMemory.from_file(base_path, info.regions, private=True)
        try:
            off = 0
            for (gpa, size), bm in zip(info.regions, _bitmaps(m)):
                for first, count in _runs(bm, size // PAGE_SIZE):
                    a = first * PAGE_SIZE
                    mem.write(gpa + a, _pread(m.fd, count * PAGE_SIZE, off + a))
                off += size
        except BaseException:
            mem.close()
            raise
        return mem
    except GuestMemoryError as e:
        raise SnapshotError(f"{path}: {e}") from None
    finally:
        os.close(m.fd)
