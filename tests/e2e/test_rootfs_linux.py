"""End to end, the Debian root file system (`popek image build --rootfs debian`) booted by the microvm kernel from
/dev/vda with no initramfs: Debian's userland runs the command under popek-init and its status comes back; a PATH
image keeps the guest's writes across power-offs (and the host reads the same bytes); `popek start --rootfs debian`
boots a private copy that `popek exec` reaches through the guest agent and `popek rm` removes. Three boots of
~1-2 min each on an emulating KVM (Debian's dynamically linked tools make many system calls, each repaired by the
VMM): run with ``--run-slow``."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from test_many_vms import host  # noqa: F401 (the fixture: short runtime paths, cleaned up)
from test_virtio import popek_run, sections

from popek.images.rootfs import build_rootfs
from popek.rootfs import detached_copy_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def debian_rootfs():
    """The cached Debian root file system (built on first use: ~30 s to a few minutes with debootstrap)."""
    if os.geteuid() != 0:
        pytest.skip("building the Debian root file system needs root (debootstrap)")
    return build_rootfs("debian", progress=False)


@pytest.fixture
def rootfs_copy(debian_rootfs, tmp_path):
    """A private sparse copy of the image, booted as a PATH (in place)."""
    dest = tmp_path / "root.ext4"
    subprocess.run(["cp", "--sparse=always", str(debian_rootfs.path), str(dest)], check=True)
    return dest


def debugfs_cat(image: Path, path: str) -> bytes:
    debugfs = shutil.which("debugfs", path="/usr/sbin:/sbin:" + os.environ["PATH"])
    return subprocess.run([debugfs, "-R", f"cat {path}", str(image)], capture_output=True, check=True).stdout


FIRST_BOOT = r"""
echo "== os-release =="; cat /etc/os-release
echo "== init =="; tr '\0' ' ' < /proc/1/cmdline; echo
echo "== root =="; grep ' / ' /proc/mounts
echo "== write =="; head -c 65536 /dev/urandom > /root/data && sha256sum /root/data
echo "== end =="
exit 7
"""


def test_debian_userland_boots_from_vda_and_a_path_image_keeps_writes_across_power_off(rootfs_copy):
    first = popek_run("--rootfs", str(rootfs_copy), "--", "sh", "-c", FIRST_BOOT)
    assert first.returncode == 7, first.stderr[-3000:]
    s = sections(first.stdout)
    assert re.search(r"^ID=debian$", s["os-release"], re.M), s["os-release"]
    assert "VERSION_CODENAME=" in s["os-release"]
    assert s["init"].split()[-1] == "/sbin/popek-init", s["init"]
    assert re.match(r"/dev/(vda|root) / ext4 rw[, ]", s["root"]), s["root"]
    written = s["write"].split()[0]

    second = popek_run("--rootfs", str(rootfs_copy), "--", "sha256sum", "/root/data")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{written}  /root/data" in second.stdout
    # powered off cleanly (synced, remounted read-only): the host reads the same bytes from the image
    assert hashlib.sha256(debugfs_cat(rootfs_copy, "/root/data")).hexdigest() == written


def test_start_rootfs_debian_runs_exec_on_a_private_copy_that_rm_removes(debian_rootfs, host):  # noqa: F811
    name = host.name("rootfs")
    before = hashlib.sha256(debian_rootfs.path.read_bytes()).hexdigest()
    try:
        host.start(name, "--rootfs", "debian", "--", "sleep", "3600")
        copy = detached_copy_path(name)
        assert copy.is_file()
        p = host.run("exec", "--timeout", "800", name, "--", "sh", "-c",
                     "grep ^ID= /etc/os-release; echo hi > /root/f; cat /root/f", timeout=900)
        assert p.stdout.split() == ["ID=debian", "hi"], p.stdout
        host.run("stop", name)
        assert copy.is_file(), "the stopped VM's entry stays until rm, and so does its disk"
        host.run("rm", name)
        assert not copy.exists(), "popek rm left the VM's root disk copy"
        assert hashlib.sha256(debian_rootfs.path.read_bytes()).hexdigest() == before, "the cached image changed"
    finally:
        detached_copy_path(name).unlink(missing_ok=True)
    assert host.leftovers() == []
