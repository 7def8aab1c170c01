"""newc cpio writer: round trips through the system's cpio, alignment, device nodes, symlinks, name rules."""

import os
import shutil
import stat
import subprocess

import pytest

from popek.images.cpio import CpioEntry, CpioError, CpioWriter, write_newc

needs_cpio = pytest.mark.skipif(shutil.which("cpio") is None, reason="system cpio not installed (apt-get install cpio)")


def _sample() -> bytes:
    w = CpioWriter()
    w.add_dir("bin")
    w.add_file("bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
    w.add_symlink("bin/sh", "tool")
    w.add_dir("dev")
    w.add_device("dev/console", "c", 5, 1)
    w.add_dir("data")
    w.add_file("data/odd", b"x" * 5)
    w.add_file("data/empty", b"")
    return w.finish()


def _parse(archive: bytes) -> list[tuple[int, str, dict, bytes]]:
    """Minimal independent newc reader: (header offset, name, fields, data) per entry, checking the 4-byte padding."""
    keys = ("ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check").split()
    out, pos = [], 0
    while True:
        assert archive[pos:pos + 6] == b"070701"
        fields = {k: int(archive[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i, k in enumerate(keys)}
        name_end = pos + 110 + fields["namesize"]
        name = archive[pos + 110:name_end - 1].decode()
        assert archive[name_end - 1] == 0
        data_start = name_end + (-name_end % 4)
        assert archive[name_end:data_start] == b"\0" * (data_start - name_end)
        data = archive[data_start:data_start + fields["filesize"]]
        out.append((pos, name, fields, data))
        pos = data_start + fields["filesize"]
        pos += -pos % 4
        if name == "TRAILER!!!":
            assert pos == len(archive)
            return out


def test_headers_names_and_data_are_4_byte_aligned_and_trailer_closes():
    archive = _sample()
    entries = _parse(archive)
    assert len(archive) % 4 == 0
    assert all(offset % 4 == 0 for offset, *_ in entries)
    assert [name for _, name, _, _ in entries][-1] == "TRAILER!!!"
    by_name = {name: (fields, data) for _, name, fields, data in entries}
    assert by_name["data/odd"][1] == b"xxxxx"
    assert by_name["data/odd"][0]["filesize"] == 5


def test_device_node_carries_type_and_rdev_numbers():
    fields = {name: f for _, name, f, _ in _parse(_sample())}["dev/console"]
    assert stat.S_ISCHR(fields["mode"])
    assert (fields["rdevmajor"], fields["rdevminor"]) == (5, 1)
    assert fields["filesize"] == 0


def test_symlink_stores_target_as_data():
    fields, data = {name: (f, d) for _, name, f, d in _parse(_sample())}["bin/sh"]
    assert stat.S_ISLNK(fields["mode"])
    assert data == b"tool"


def test_regular_files_get_unique_inodes_and_nlink_1_so_kernel_makes_no_hard_links():
    entries = [(n, f) for _, n, f, _ in _parse(_sample()) if n != "TRAILER!!!"]
    assert len({f["ino"] for _, f in entries}) == len(entries)
    assert all(f["nlink"] == (2 if stat.S_ISDIR(f["mode"]) else 1) for _, f in entries)


@needs_cpio
def test_system_cpio_lists_every_entry():
    listing = subprocess.run(["cpio", "-t"], input=_sample(), capture_output=True, check=True).stdout.decode()
    assert listing.split() == ["bin", "bin/tool", "bin/sh", "dev", "dev/console", "data", "data/odd", "data/empty"]


@needs_cpio
def test_round_trip_through_system_cpio_extract(tmp_path):
    proc = subprocess.run(["cpio", "-idv", "--no-absolute-filenames"], input=_sample(), cwd=tmp_path,
                          capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    assert (tmp_path / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((tmp_path / "bin/tool").stat().st_mode) == 0o755
    assert os.readlink(tmp_path / "bin/sh") == "tool"
    assert (tmp_path / "data/odd").read_bytes() == b"xxxxx"
    assert (tmp_path / "data/empty").stat().st_size == 0
    console = tmp_path / "dev/console"
    if os.geteuid() == 0:  # only root can mknod
        st = console.lstat()
        assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (5, 1)


def test_leading_slash_is_dropped_and_write_newc_matches_writer():
    entries = [CpioEntry("/etc", stat.S_IFDIR | 0o755), CpioEntry("/etc/hostname", stat.S_IFREG | 0o644, b"popek\n")]
    names = [name for _, name, _, _ in _parse(write_newc(entries))]
    assert names == ["etc", "etc/hostname", "TRAILER!!!"]


@pytest.mark.parametrize("name", ["", "../etc", "a/../b", "a//b", "."])
def test_bad_names_are_rejected(name):
    with pytest.raises(CpioError):
        CpioWriter().add_file(name, b"")


def test_entry_before_its_parent_directory_is_rejected():
    with pytest.raises(CpioError, match="parent directory"):
        CpioWriter().add_file("lib/modules/x.ko", b"")


def test_duplicate_entry_is_rejected():
    w = CpioWriter()
    w.add_file("a", b"1")
    with pytest.raises(CpioError, match="duplicate"):
        w.add_file("a", b"2")


def test_no_entry_after_finish():
    w = CpioWriter()
    w.finish()
    with pytest.raises(CpioError, match="finished"):
        w.add_dir("late")
