"""Tests for popek.boot.payload: every bzImage payload compression round-trips, with the kernel's size trailer."""

import bz2
import gzip
import lzma
import os
import struct

import lz4.block
import pytest
import zstandard

from popek.boot.payload import LZ4_LEGACY_BLOCK, PayloadError, decompress_payload, detect_compression


def lz4_legacy(data: bytes) -> bytes:
    """The kernel's `lz4 -l` output: magic 0x184C2102, then <u32 size><raw block> per 8 MiB of input."""
    out = [struct.pack("<I", 0x184C2102)]
    for i in range(0, len(data), LZ4_LEGACY_BLOCK):
        block = lz4.block.compress(data[i:i + LZ4_LEGACY_BLOCK], store_size=False)
        out += [struct.pack("<I", len(block)), block]
    return b"".join(out)


COMPRESSORS = {
    "gzip": lambda d: gzip.compress(d, 6),  # the kernel build appends nothing: gzip's ISIZE is the size
    "xz": lambda d: lzma.compress(d, format=lzma.FORMAT_XZ),
    "lz4": lz4_legacy,
    "zstd": lambda d: zstandard.ZstdCompressor(level=3, write_content_size=False).compress(d),
    "bzip2": bz2.compress,
    "lzma": lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE),
}


def kernel_payload(kind: str, data: bytes) -> bytes:
    """A payload as arch/x86/boot/compressed builds it: compressed data plus the le32 size (size_append)."""
    packed = COMPRESSORS[kind](data)
    return packed if kind == "gzip" else packed + struct.pack("<I", len(data))


# 9 MiB so LZ4 legacy needs two blocks; half random so it does not compress to nothing.
DATA = b"\x7fELF" + os.urandom(1 << 20) + bytes(8 << 20) + b"tail"


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_payload_round_trips_with_size_trailer(kind):
    payload = kernel_payload(kind, DATA)
    assert detect_compression(payload) == kind
    expected = struct.unpack_from("<I", payload, len(payload) - 4)[0]
    assert decompress_payload(memoryview(payload), expected_size=expected) == DATA


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_wrong_size_trailer_is_reported(kind):
    payload = kernel_payload(kind, DATA)
    with pytest.raises(PayloadError, match="size trailer"):
        decompress_payload(payload, expected_size=len(DATA) - 1)
    with pytest.raises(PayloadError, match="size trailer"):
        decompress_payload(payload, expected_size=len(DATA) + 1)


def test_lz4_legacy_continues_across_a_second_frame_magic():
    a, b = b"A" * 1000 + os.urandom(100), os.urandom(5000)
    assert decompress_payload(lz4_legacy(a) + lz4_legacy(b)) == a + b


@pytest.mark.parametrize("kind", ["xz", "lz4", "zstd", "bzip2", "lzma", "gzip"])
def test_truncated_payload_is_an_error(kind):
    payload = COMPRESSORS[kind](DATA)
    with pytest.raises(PayloadError, match="truncated|runs past|corrupt"):
        decompress_payload(payload[:len(payload) // 2])


def test_unknown_and_lzo_compressions_are_rejected_by_name():
    with pytest.raises(PayloadError, match="unknown payload compression.*00 11 22 33"):
        detect_compression(b"\x00\x11\x22\x33rest")
    assert detect_compression(b"\x89LZO\x00\r\n") == "lzo"
    with pytest.raises(PayloadError, match="lzo payloads are not supported"):
        decompress_payload(b"\x89LZO\x00\r\n\x1a\n" + bytes(32))


def test_corrupt_lz4_block_is_reported_with_its_offset():
    bad = struct.pack("<II", 0x184C2102, 8) + b"\xff" * 8
    with pytest.raises(PayloadError, match="LZ4 legacy block at offset 4 is corrupt"):
        decompress_payload(bad)
