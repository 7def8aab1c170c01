"""Decompressors for the compressed vmlinux in a bzImage payload (gzip, xz, LZ4 legacy, zstd, bzip2, lzma)."""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib

import lz4.block

#: Leading magic bytes of each format the kernel build can use for vmlinux.bin.* (arch/x86/boot/compressed/Makefile).
MAGICS = (
    ("gzip", b"\x1f\x8b"),
    ("xz", b"\xfd7zXZ\x00"),
    ("lz4", b"\x02\x21\x4c\x18"),  # LZ4 legacy frame magic 0x184C2102, little endian
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("bzip2", b"BZh"),
    ("lzma", b"\x5d\x00\x00"),  # lzma "alone" header: properties byte 0x5d, dictionary size < 16 MiB
    ("lzo", b"\x89LZO"),
)
SUPPORTED = ("gzip", "xz", "lz4", "zstd", "bzip2", "lzma")

LZ4_LEGACY_MAGIC = 0x184C2102
#: Uncompressed size of every block but the last in an LZ4 legacy frame (lz4 -l; lib/decompress_unlz4.c).
LZ4_LEGACY_BLOCK = 8 << 20


class PayloadError(ValueError):
    """A payload in an unknown or unsupported format, or one that fails to decompress."""


def detect_compression(data: bytes | memoryview) -> str:
    """Name of the compression format of ``data`` from its leading magic bytes.

    :returns: one of ``"gzip" "xz" "lz4" "zstd" "bzip2" "lzma" "lzo"`` (LZO is recognised but cannot be decompressed).
    :raises PayloadError: if no known magic matches.
    """
    head = bytes(data[:8])
    for name, magic in MAGICS:
        if head.startswith(magic):
            return name
    raise PayloadError(f"unknown payload compression (first bytes {head.hex(' ')}); "
                       f"supported: {', '.join(SUPPORTED)}")


def _lz4_legacy(data: memoryview, limit: int) -> bytes:
    # Legacy frame: magic, then blocks of <u32 LE compressed size><raw LZ4 block>, each decoding to at most 8 MiB.
    # Like the kernel's unlz4, a repeated magic starts a new frame; the input ends the stream. Exactly 4 trailing
    # bytes are the size the kernel build appends (scripts/Makefile.lib size_append), not a block.
    out, pos, n, total = [], 4, len(data), 0
    while n - pos > 4:
        (size,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if size == LZ4_LEGACY_MAGIC:
            continue
        if size > n - pos:
            raise PayloadError(f"LZ4 legacy block of {size} bytes at offset {pos - 4} runs past the end of the "
                               f"{n}-byte payload")
        try:
            out.append(lz4.block.decompress(data[pos:pos + size], uncompressed_size=LZ4_LEGACY_BLOCK))
            total += len(out[-1])
        except lz4.block.LZ4BlockError as e:
            raise PayloadError(f"LZ4 legacy block at offset {pos - 4} is corrupt: {e}") from None
        pos += size
        if 0 <= limit < total:
            break
    return b"".join(out)


def _stream(decoder, data: memoryview, limit: int, name: str, errors: tuple[type[Exception], ...] = ()) -> bytes:
    try:
        out = decoder.decompress(data, limit) if limit >= 0 else decoder.decompress(data)
    except (zlib.error, lzma.LZMAError, OSError, EOFError, *errors) as e:
        raise PayloadError(f"{name} payload is corrupt: {e}") from None
    if not decoder.eof and not (limit >= 0 and len(out) >= limit):  # hitting the limit is a size error, below
        raise PayloadError(f"{name} payload is truncated: the stream ends before its end marker")
    return out


def decompress_payload(data: bytes | memoryview, *, expected_size: int | None = None) -> bytes:
    """Decompress a bzImage payload (``payload_offset``/``payload_length``, boot protocol 2.08+) into the vmlinux ELF.

    The input is read in place (a memoryview is not copied). Bytes after the end of the compressed stream are
    ignored: the kernel build appends the uncompressed size as a little-endian u32 (gzip's own ISIZE trailer for
    gzip); pass it as ``expected_size`` to bound the output and check it.

    :param data: the compressed payload.
    :param expected_size: uncompressed length in bytes, or None (zstd output is checked but not bounded by it).
    :returns: the decompressed bytes.
    :raises PayloadError: unknown/unsupported format (LZO), corrupt or truncated data, or a size other than
        ``expected_size``.
    """
    view = memoryview(data).cast("B")
    kind = detect_compression(view)
    limit = -1 if expected_size is None else expected_size + 1
    if kind == "lz4":
        out = _lz4_legacy(view, limit)
    elif kind == "gzip":
        out = _stream(zlib.decompressobj(wbits=16 + zlib.MAX_WBITS), view, limit, kind)
    elif kind in ("xz", "lzma"):
        fmt = lzma.FORMAT_XZ if kind == "xz" else lzma.FORMAT_ALONE
        out = _stream(lzma.LZMADecompressor(format=fmt), view, limit, kind)
    elif kind == "bzip2":
        out = _stream(bz2.BZ2Decompressor(), view, limit, kind)
    elif kind == "zstd":
        import zstandard  # here, not at the top: it costs every VMM process ~0.7 MiB (benchmarks/density.py)

        out = _stream(zstandard.ZstdDecompressor().decompressobj(), view, -1, kind, (zstandard.ZstdError,))
    else:
        raise PayloadError(f"{kind} payloads are not supported (no decompressor); supported: {', '.join(SUPPORTED)}")
    if expected_size is not None and len(out) != expected_size:
        got = f"more than {expected_size}" if len(out) > expected_size else str(len(out))
        raise PayloadError(f"{kind} payload decompressed to {got} bytes but its size trailer says {expected_size}")
    return out
