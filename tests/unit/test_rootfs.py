"""Root file system images without the network: apt source parsing, sizes, trimming, the build's error paths and
a build from a fake debootstrap tree (real mkfs.ext4), and the run-time disk: path checks, private copies, locks."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from test_cli import assert_refused, kvm_usable, popek_run, tiny_vmlinux

from popek.guestcmd import build_cmdline
from popek.images import agent, build, cache, rootfs
from popek.images.cache import ImageError
from popek.rootfs import (EXT4_MAGIC, EXT4_MAGIC_OFFSET, ROOT_ARGS, check_boot_inputs, check_image_path,
                          open_root_disk, remove_stale_copies, root_append)
from popek.vm import VmError

MiB = 1 << 20
needs_mkfs = pytest.mark.skipif(shutil.which("mkfs.ext4", path="/usr/sbin:/sbin:" + os.environ["PATH"]) is None,
                                reason="mkfs.ext4 (e2fsprogs) is not installed")


# ---- apt sources and the host's suite ---------------------------------------------------------------------------

def _etc_apt(tmp_path, sources_list="", **files):
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list").write_text(sources_list)
    for name, text in files.items():
        (etc / "sources.list.d" / name.replace("_", ".")).write_text(text)
    return etc


def test_mirror_comes_from_a_deb822_stanza_serving_the_suite_with_main(tmp_path):
    etc = _etc_apt(tmp_path, debian_sources=(
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\nComponents: main\n\n"
        "Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nComponents: main\nEnabled: no\n\n"
        "Types: deb\n# a comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main contrib\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"))
    assert rootfs.apt_mirror("bookworm", etc) == "http://mirror.example/debian"


def test_mirror_comes_from_a_one_line_source_with_options(tmp_path):
    etc = _etc_apt(tmp_path, "# deb http://commented.example/debian bookworm main\n"
                             "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main non-free\n")
    assert rootfs.apt_mirror("bookworm", etc) == "http://one.example/debian"


def test_no_source_for_the_suite_is_an_image_error_naming_it(tmp_path):
    etc = _etc_apt(tmp_path, "deb http://one.example/debian bullseye main\n")
    with pytest.raises(ImageError, match="suite bookworm"):
        rootfs.apt_mirror("bookworm", etc)


def test_host_suite_is_os_release_version_codename(tmp_path):
    (tmp_path / "os-release").write_text('NAME="Debian GNU/Linux"\nVERSION_CODENAME=bookworm\nID=debian\n')
    assert rootfs.host_suite(tmp_path / "os-release") == "bookworm"
    (tmp_path / "os-release").write_text('NAME="Something"\n')
    with pytest.raises(ImageError, match="VERSION_CODENAME"):
        rootfs.host_suite(tmp_path / "os-release")


# ---- keys, sizes, trimming --------------------------------------------------------------------------------------

@pytest.fixture
def private_inputs(tmp_path, monkeypatch):
    """A private cache, init and agent source; a fixed suite and mirror."""
    init, source = tmp_path / "init", tmp_path / "agent.c"
    init.write_text(build.INIT.read_text())
    source.write_text("int main(void) { return 0; }\n")
    monkeypatch.setattr(build, "INIT", init)
    monkeypatch.setattr(agent, "SOURCE", source)
    monkeypatch.setattr(rootfs, "host_suite", lambda: "bookworm")
    monkeypatch.setattr(rootfs, "apt_mirror", lambda suite: "http://mirror.example/debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return init, source


def test_rootfs_key_names_suite_and_size_and_changes_with_init_and_agent(private_inputs):
    init, source = private_inputs
    key = rootfs.rootfs_key("debian")
    assert key.startswith("rootfs-debian-bookworm-auto-") and key == rootfs.rootfs_key("debian")
    assert rootfs.rootfs_key("debian", 2048 * MiB).startswith("rootfs-debian-bookworm-2048M-")
    init.write_text(init.read_text() + "# changed\n")
    assert rootfs.rootfs_key("debian") != key
    after_init = rootfs.rootfs_key("debian")
    source.write_text("int main(void) { return 1; }\n")
    assert rootfs.rootfs_key("debian") != after_init


def test_unknown_rootfs_kind_is_an_image_error(private_inputs):
    with pytest.raises(ImageError, match="unknown root file system 'ubuntu'"):
        rootfs.rootfs_key("ubuntu")


def test_default_size_is_content_plus_a_tenth_plus_headroom_in_whole_mib():
    assert rootfs.image_size(100 * MiB) == 110 * MiB + rootfs.DEFAULT_HEADROOM
    assert rootfs.image_size(100 * MiB + 1) % MiB == 0
    assert rootfs.image_size(100 * MiB, 1024 * MiB) == 1024 * MiB


def test_requested_size_too_small_for_the_files_is_refused():
    with pytest.raises(ImageError, match="cannot hold 100 MiB"):
        rootfs.image_size(100 * MiB, 105 * MiB)


def test_trim_removes_docs_caches_and_dev_but_keeps_the_system_and_symlink_targets(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    for d in ("usr/share/doc/bash", "usr/share/man/man1", "var/cache/apt/archives", "var/lib/apt/lists",
              "usr/share/locale/de", "dev", "usr/bin", "etc"):
        (root / d).mkdir(parents=True)
    (root / "usr/share/doc/bash/copyright").write_text("c")
    (root / "var/cache/apt/archives/bash.deb").write_bytes(b"deb")
    (root / "var/lib/apt/lists/Packages").write_text("p")
    (root / "dev/null").write_text("")
    (root / "usr/bin/dash").write_bytes(b"\x7fELF")
    (root / "etc/os-release").write_text("ID=debian\n")
    (root / "usr/share/locale/link").symlink_to(outside)
    assert rootfs.trim_tree(root) > 0
    assert list((root / "usr/share/doc").iterdir()) == [] and list((root / "var/cache/apt").iterdir()) == []
    assert list((root / "dev").iterdir()) == [] and list((root / "usr/share/locale").iterdir()) == []
    assert (root / "usr/bin/dash").exists() and (root / "etc/os-release").exists()
    assert (outside / "keep").exists()


# ---- the build: errors and a build from a fake debootstrap ------------------------------------------------------

FAKE_DEBOOTSTRAP = """#!/bin/sh
# fake debootstrap: args are --variant=minbase --include=... SUITE TARGET MIRROR
echo "I: Retrieving InRelease"
[ -n "$FAKE_DEBOOTSTRAP_FAIL" ] && { echo "E: Failed getting release file $5/dists/$3/Release"; exit 1; }
t=$4
mkdir -p $t/usr/bin $t/etc $t/usr/share/doc/base-files $t/var/cache/apt/archives $t/dev $t/proc $t/tmp
echo 'ID=debian' > $t/etc/os-release
echo "$3 from $5" > $t/etc/fake-suite
head -c 100000 /dev/urandom > $t/usr/bin/big
echo doc > $t/usr/share/doc/base-files/copyright
echo deb > $t/var/cache/apt/archives/base-files.deb
echo "I: Base system installed successfully."
"""


@pytest.fixture
def fake_tools(tmp_path, monkeypatch, private_inputs):
    """A fake debootstrap first on PATH, a fake agent build, TMPDIR private, euid root."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "debootstrap").write_text(FAKE_DEBOOTSTRAP)
    (bindir / "debootstrap").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}:/usr/sbin:/sbin")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(agent, "build_agent", lambda dest: (Path(dest).write_bytes(b"\x7fELF agent"), Path(dest))[1])
    monkeypatch.setattr(rootfs.os, "geteuid", lambda: 0)
    return tmp_path


def _debugfs(image: Path, request: str) -> str:
    debugfs = shutil.which("debugfs", path="/usr/sbin:/sbin:" + os.environ["PATH"])
    return subprocess.run([debugfs, "-R", request, str(image)], capture_output=True, text=True, check=True).stdout


@needs_mkfs
def test_build_makes_a_sparse_labelled_ext4_with_init_agent_and_no_docs(fake_tools):
    img = rootfs.build_rootfs("debian", progress=False)
    assert img.path.is_file() and img.suite == "bookworm"
    with open(img.path, "rb") as f:
        f.seek(EXT4_MAGIC_OFFSET)
        assert f.read(2) == EXT4_MAGIC
    st = img.path.stat()
    assert st.st_size == img.size and st.st_blocks * 512 < st.st_size // 2, "the image is not sparse"
    label = subprocess.run([shutil.which("e2label", path="/usr/sbin:/sbin"), str(img.path)], capture_output=True,
                           text=True).stdout.strip()
    assert label == "popek-root"
    assert _debugfs(img.path, "cat /sbin/popek-init") == build.INIT.read_text()
    assert _debugfs(img.path, "cat /usr/sbin/popek-agent") == "\x7fELF agent"
    assert _debugfs(img.path, "cat /etc/fake-suite").strip() == "bookworm from http://mirror.example/debian"
    assert "copyright" not in _debugfs(img.path, "ls /usr/share/doc/base-files")
    assert "base-files.deb" not in _debugfs(img.path, "ls /var/cache/apt/archives")
    assert "0755" in _debugfs(img.path, "stat /sbin/popek-init").split("Mode:")[1][:12]
    assert rootfs.find_rootfs("debian") == img
    assert list((fake_tools / "tmp").iterdir()) == [], "the build left its work tree"


@needs_mkfs
def test_failed_debootstrap_is_one_image_error_and_leaves_no_entry_or_tree(fake_tools, monkeypatch):
    monkeypatch.setenv("FAKE_DEBOOTSTRAP_FAIL", "1")
    with pytest.raises(ImageError, match="Failed getting release file") as e:
        rootfs.build_rootfs("debian", progress=False)
    assert "debian root file system failed" in str(e.value)
    assert rootfs.find_rootfs("debian") is None
    assert [p.name for p in cache.cache_root().iterdir() if not p.name.endswith(".lock")] == []
    assert list((fake_tools / "tmp").iterdir()) == []


def test_building_as_non_root_is_refused_saying_why(fake_tools, monkeypatch):
    monkeypatch.setattr(rootfs.os, "geteuid", lambda: 1000)
    with pytest.raises(ImageError, match="needs root"):
        rootfs.build_rootfs("debian", progress=False)
    assert rootfs.find_rootfs("debian") is None


def test_cli_image_build_rootfs_as_non_root_is_one_error_line_with_status_2(fake_tools, monkeypatch):
    from click.testing import CliRunner

    from popek.cli import main

    monkeypatch.setattr(rootfs.os, "geteuid", lambda: 1000)
    r = CliRunner().invoke(main, ["image", "build", "--rootfs", "debian"])
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("popek: error: ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert "needs root" in r.stderr
    assert not cache.cache_root().exists() or [p for p in cache.cache_root().iterdir()] == []


# ---- the disk a VM boots ----------------------------------------------------------------------------------------

def fake_ext4(path: Path, size: int = 64 * MiB) -> Path:
    """A sparse file with ext4's superblock magic (enough for the checks; nothing boots it)."""
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(EXT4_MAGIC_OFFSET)
        f.write(EXT4_MAGIC)
        f.seek(8 * MiB)
        f.write(b"data" * 1024)
    return path


def test_rootfs_path_checks_name_what_is_wrong(tmp_path):
    with pytest.raises(VmError, match="does not exist"):
        check_image_path(tmp_path / "missing.img")
    with pytest.raises(VmError, match="neither a regular file"):
        check_image_path(tmp_path)
    (tmp_path / "zeros.img").write_bytes(bytes(4096))
    with pytest.raises(VmError, match="not an ext4"):
        check_image_path(tmp_path / "zeros.img")
    assert check_image_path(fake_ext4(tmp_path / "root.img")) == tmp_path / "root.img"


def test_initrd_and_the_debian_kernel_are_refused_with_a_rootfs(tmp_path):
    image = fake_ext4(tmp_path / "root.img")
    with pytest.raises(VmError, match="not both"):
        check_boot_inputs(image, None, tmp_path / "initrd")
    with pytest.raises(VmError, match="virtio-blk as a module"):
        check_boot_inputs(image, "debian", None)
    check_boot_inputs(image, "microvm", None)


def test_root_arguments_select_vda_ext4_and_popek_init_before_the_users(tmp_path):
    cmdline = build_cmdline(emulating=False, command=["true"], append=root_append("init=/bin/sh"))
    words = cmdline.split()
    assert ROOT_ARGS == ("root=/dev/vda", "rw", "rootfstype=ext4", "init=/sbin/popek-init")
    assert all(a in words for a in ROOT_ARGS)
    assert words.index("init=/sbin/popek-init") < words.index("init=/bin/sh"), "the user's argument must win"


def test_a_path_is_booted_in_place_and_locked_against_a_second_vm(tmp_path):
    image = fake_ext4(tmp_path / "root.img")
    with open_root_disk(image) as disk:
        assert disk.path == image and not disk.private and disk.drive.path == image and not disk.drive.readonly
        with pytest.raises(VmError, match="in use by another VM"):
            open_root_disk(image)
    open_root_disk(image).close()  # released
    assert image.exists()


@pytest.fixture
def named_image(tmp_path, monkeypatch):
    """``build_rootfs`` returns a fake cached image; the cache is private."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    image = fake_ext4(tmp_path / "cached.ext4")
    monkeypatch.setattr(rootfs, "build_rootfs", lambda kind, size=None, progress=False: rootfs.RootfsImage(
        "rootfs-debian-test", image, "bookworm", image.stat().st_size))
    return image


def test_a_named_image_boots_as_a_private_sparse_copy_removed_on_close(named_image):
    before = named_image.read_bytes()
    disk = open_root_disk("debian")
    try:
        assert disk.private and disk.path != named_image and disk.source == named_image
        assert disk.path.parent == cache.cache_root() / "rootfs-run"
        assert disk.path.read_bytes() == before
        st = disk.path.stat()
        assert st.st_blocks * 512 < st.st_size // 4, "the copy is not sparse"
        with open(disk.path, "r+b") as f:
            f.seek(16 * MiB)
            f.write(b"guest wrote this")
        assert named_image.read_bytes() == before, "a run modified the cached image"
    finally:
        disk.close()
    assert not disk.path.exists()
    assert list((cache.cache_root() / "rootfs-run").iterdir()) == []


def test_persist_boots_the_named_image_itself(named_image):
    with open_root_disk("debian", persist=True) as disk:
        assert disk.path == named_image and not disk.private
    assert named_image.exists()


def test_copies_left_by_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f"{dead.pid}-aaaa.ext4").write_bytes(b"x")
    (tmp_path / f"{os.getpid()}-bbbb.ext4").write_bytes(b"x")
    (tmp_path / "vm-detached.ext4").write_bytes(b"x")
    assert remove_stale_copies(tmp_path) == [tmp_path / f"{dead.pid}-aaaa.ext4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{os.getpid()}-bbbb.ext4", "vm-detached.ext4"]


@pytest.mark.parametrize("args, words", [
    (["--rootfs", "/nonexistent/root.ext4"], ["root file system", "does not exist"]),
    (["--rootfs", "/dev/null"], ["neither a regular file"]),
    (["--persist"], ["--persist and --rootfs-size go with --rootfs"]),
    (["--rootfs", "debian", "--initrd", "/dev/null"], ["not both"]),
    (["--rootfs", "debian", "--kernel", "debian"], ["virtio-blk as a module"]),
])
def test_bad_rootfs_input_is_refused_before_building_anything(tmp_path, args, words):
    assert_refused(popek_run(tmp_path, *args), *words)


# ---- popek.VM(rootfs=...) (builds a VM on KVM with a tiny kernel; never runs it) --------------------------------

@kvm_usable
def test_vm_with_a_named_rootfs_gets_its_private_copy_as_vda_no_initrd_and_close_removes_it(tmp_path, named_image):
    from popek.runner import VM

    kernel, extra = tmp_path / "vmlinux", fake_ext4(tmp_path / "extra.img")
    kernel.write_bytes(tiny_vmlinux())
    vm = VM(["true"], kernel=kernel, rootfs="debian", drives=[f"path={extra}"], memory="64M")
    copy = vm.root_disk.path
    try:
        assert vm.config.initrd is None
        assert [d.path for d in vm.config.drives] == [copy, extra] and copy != named_image and copy.exists()
        assert all(a in vm.config.cmdline.split() for a in ROOT_ARGS)
    finally:
        vm.close()
    assert not copy.exists()


@kvm_usable
def test_vm_that_fails_to_build_removes_its_rootfs_copy(tmp_path, named_image):
    from popek.boot.linux import BootError
    from popek.runner import VM

    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(BootError):
        VM(["true"], kernel=junk, rootfs="debian", memory="64M")
    assert list((cache.cache_root() / "rootfs-run").iterdir()) == []
