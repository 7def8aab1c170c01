"""Guest image builds without building: cache keys, atomic cache entries, initramfs layout, init and config files."""

import lzma
import shutil
import stat
import subprocess
import threading

import pytest
import zstandard

from popek.images import build, cache, debian, microvm
from popek.images.build import ImageError, image_key, make_initramfs


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    """Private copies of the config fragment and init, fixed package versions, and a private cache root."""
    fragment, init = tmp_path / "microvm.config", tmp_path / "init"
    fragment.write_text(microvm.FRAGMENT.read_text())
    init.write_text(build.INIT.read_text())
    monkeypatch.setattr(microvm, "FRAGMENT", fragment)
    monkeypatch.setattr(build, "INIT", init)
    monkeypatch.setattr(microvm, "source_version", lambda: "6.1.99-1")
    monkeypatch.setattr(debian, "resolve_kernel_package", lambda update=True: "linux-image-6.1.0-9-cloud-amd64")
    versions = {"busybox-static": "1:1.35.0-4", "linux-image-6.1.0-9-cloud-amd64": "6.1.99-1"}
    monkeypatch.setattr(debian, "candidate_version", lambda package, update=True: versions[package])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return fragment, init


def test_cache_root_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.cache_root() == tmp_path / "popek"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_root() == tmp_path / "home" / ".cache" / "popek"


def test_keys_name_the_input_versions(inputs):
    assert image_key("microvm").startswith("microvm-6.1.99-1-")
    assert image_key("debian").startswith("debian-6.1.0-9-cloud-amd64-6.1.99-1-1_1.35.0-4-")


def test_key_is_stable_for_unchanged_inputs(inputs):
    assert image_key("microvm") == image_key("microvm")
    assert image_key("debian") == image_key("debian")


def test_microvm_key_changes_when_config_fragment_changes(inputs):
    fragment, _ = inputs
    before = image_key("microvm")
    fragment.write_text(fragment.read_text() + "CONFIG_SCHED_DEBUG=y\n")
    assert image_key("microvm") != before


def test_keys_change_when_init_changes(inputs):
    _, init = inputs
    before = image_key("microvm"), image_key("debian")
    init.write_text(init.read_text() + "# changed\n")
    after = image_key("microvm"), image_key("debian")
    assert after[0] != before[0] and after[1] != before[1]


def test_unknown_kind_is_an_image_error(inputs):
    with pytest.raises(ImageError, match="unknown guest image kind"):
        image_key("windows")


def test_interrupted_microvm_build_leaves_no_cache_entry(inputs, monkeypatch):
    def interrupted(out, *, progress=True):
        (out / "vmlinux").write_bytes(b"half a kernel")
        raise KeyboardInterrupt

    monkeypatch.setattr(microvm, "build_kernel", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build.build_image("microvm", progress=False)
    root = cache.cache_root()
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == []
    assert build.find_image("microvm") is None


def test_failed_build_leaves_no_entry_and_a_later_build_publishes_one(inputs):
    def failing(tmp):
        (tmp / "partial").write_text("x")
        raise ImageError("compiler exploded")

    with pytest.raises(ImageError, match="compiler exploded"):
        cache.get_or_build("thing-1", failing)
    assert cache.lookup("thing-1") is None
    entry = cache.get_or_build("thing-1", lambda tmp: (tmp / "done").write_text("ok"))
    assert entry == cache.lookup("thing-1") and (entry / "done").read_text() == "ok"
    assert not (entry / "partial").exists()


def test_cached_entry_is_reused_unless_forced(inputs):
    calls = []

    def builder(tmp):
        calls.append(1)
        (tmp / "n").write_text(str(len(calls)))

    cache.get_or_build("thing-2", builder)
    assert (cache.get_or_build("thing-2", builder) / "n").read_text() == "1"
    assert (cache.get_or_build("thing-2", builder, force=True) / "n").read_text() == "2"
    assert len(calls) == 2


def test_concurrent_builders_of_one_entry_build_it_once(inputs):
    started, release, calls = threading.Event(), threading.Event(), []

    def slow(tmp):
        calls.append("slow")
        started.set()
        release.wait(10)
        (tmp / "by").write_text("slow")

    first = threading.Thread(target=cache.get_or_build, args=("thing-3", slow))
    first.start()
    assert started.wait(10)
    results = []
    second = threading.Thread(target=lambda: results.append(cache.get_or_build("thing-3", lambda t: calls.append("2"))))
    second.start()
    second.join(0.5)
    assert second.is_alive(), "second builder did not wait for the lock"
    release.set()
    first.join(10)
    second.join(10)
    assert calls == ["slow"] and (results[0] / "by").read_text() == "slow"


def test_stale_temporary_directory_of_a_dead_build_is_removed(inputs):
    root = cache.cache_root()
    root.mkdir(parents=True)
    stale = root / ".thing-4.tmp-dead"
    stale.mkdir()
    cache.get_or_build("thing-4", lambda tmp: None)
    assert not stale.exists()


def test_entry_names_replace_epoch_colon():
    assert cache.entry_name("debian", "1:1.35.0-4+deb12u1") == "debian-1_1.35.0-4+deb12u1"


def test_config_fragment_lines_are_config_assignments():
    options = microvm.parse_fragment(microvm.FRAGMENT.read_text())
    for line in microvm.FRAGMENT.read_text().splitlines():
        assert not line.strip() or line.startswith("#") or line.split("=")[0] in options
    # What the guest init and the VMM rely on:
    for key, value in {"CONFIG_DEVPORT": "y", "CONFIG_DEVTMPFS": "y", "CONFIG_BLK_DEV_INITRD": "y",
                       "CONFIG_SERIAL_8250_CONSOLE": "y", "CONFIG_MODULES": "n", "CONFIG_ACPI": "n",
                       "CONFIG_X86_MPPARSE": "y", "CONFIG_PTP_1588_CLOCK_KVM": "n", "CONFIG_CMDLINE_BOOL": "n",
                       "CONFIG_LOCALVERSION": '"-popek"', "CONFIG_NR_CPUS": "8"}.items():
        assert options[key] == value, key


@pytest.mark.parametrize("line", ["CONFIG_X=maybe", "X=y", "CONFIG_X = y", 'CONFIG_X="unterminated'])
def test_fragment_parser_rejects_malformed_lines(line):
    with pytest.raises(ImageError, match="line 1"):
        microvm.parse_fragment(line + "\n")


def test_dropped_options_reports_what_kconfig_changed():
    fragment = microvm.parse_fragment("CONFIG_A=y\nCONFIG_B=n\nCONFIG_C=8\n# CONFIG_D is not set\n")
    config = microvm.parse_dotconfig("CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n")
    assert microvm.dropped_options(fragment, config) == ["CONFIG_B: asked n, got y", "CONFIG_C: asked 8, got n"]


def _busybox():
    return shutil.which("busybox")


@pytest.mark.skipif(_busybox() is None, reason="busybox not installed")
def test_init_passes_busybox_sh_syntax_check():
    proc = subprocess.run([_busybox(), "sh", "-n", str(build.INIT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert build.INIT.read_text().startswith("#!/bin/sh\n")


@pytest.mark.skipif(shutil.which("dash") is None, reason="dash not installed")
def test_init_passes_dash_syntax_check_for_debian_root_file_systems():
    proc = subprocess.run(["dash", "-n", str(build.INIT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _fake_busybox(tmp_path, applets):
    fake = tmp_path / "busybox"
    fake.write_text("#!/bin/sh\nprintf '%s\\n' " + " ".join(f"'{a}'" for a in applets) + "\n")
    fake.chmod(0o755)
    return fake


def _entries(archive):
    """{name: (mode, rdevmajor, rdevminor, data)} from a newc archive."""
    out, pos = {}, 0
    while True:
        f = [int(archive[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        name_end = pos + 110 + f[11]
        name = archive[pos + 110:name_end - 1].decode()
        start = name_end + (-name_end % 4)
        if name == "TRAILER!!!":
            return out
        out[name] = (f[1], f[9], f[10], archive[start:start + f[6]])
        pos = start + f[6] + (-(start + f[6]) % 4)


def test_initramfs_holds_init_busybox_applets_console_and_empty_dirs(tmp_path):
    archive = make_initramfs(_fake_busybox(tmp_path, build.APPLETS))
    entries = _entries(archive)
    assert entries["init"][3] == build.INIT.read_bytes() and entries["init"][0] & 0o111
    assert entries["bin/busybox"][3] == (tmp_path / "busybox").read_bytes()
    for applet in ("sh", "mount", "base64", "dd", "cttyhack", "setsid", "modprobe", "reboot"):
        mode, _, _, target = entries[f"bin/{applet}"]
        assert stat.S_ISLNK(mode) and target == b"busybox"
    mode, major, minor, _ = entries["dev/console"]
    assert stat.S_ISCHR(mode) and (major, minor) == (5, 1)
    for d in ("proc", "sys", "dev", "tmp", "root"):
        assert stat.S_ISDIR(entries[d][0])
    assert not any(name.startswith("lib") for name in entries)


def test_initramfs_includes_the_modules_tree(tmp_path):
    mods = tmp_path / "modroot" / "lib" / "modules" / "6.1.0-9-cloud-amd64"
    (mods / "kernel" / "drivers").mkdir(parents=True)
    (mods / "kernel" / "drivers" / "virtio.ko").write_bytes(b"\x7fELF module")
    (mods / "modules.dep").write_text("kernel/drivers/virtio.ko:\n")
    entries = _entries(make_initramfs(_fake_busybox(tmp_path, build.APPLETS), tmp_path / "modroot"))
    assert entries["lib/modules/6.1.0-9-cloud-amd64/modules.dep"][3] == b"kernel/drivers/virtio.ko:\n"
    assert entries["lib/modules/6.1.0-9-cloud-amd64/kernel/drivers/virtio.ko"][3] == b"\x7fELF module"


def test_busybox_missing_a_needed_applet_is_an_image_error(tmp_path):
    fake = _fake_busybox(tmp_path, [a for a in build.APPLETS if a != "cttyhack"])
    with pytest.raises(ImageError, match="cttyhack"):
        make_initramfs(fake)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
def test_module_dependencies_come_from_modinfo_depends(tmp_path):
    """A .ko's `depends=` in .modinfo drives which extra modules are copied."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "m.c").write_text('__attribute__((section(".modinfo"))) const char d[] = "license=GPL\\0depends=virtio,virtio_ring";\n')
    subprocess.run(["gcc", "-c", "-o", str(src / "m.ko"), str(src / "m.c")], check=True)
    assert debian._ko_dependencies((src / "m.ko").read_bytes()) == ["virtio", "virtio_ring"]


def test_initramfs_adds_module_directories_before_their_contents(tmp_path):
    mods = tmp_path / "modroot" / "lib" / "a" / "b"
    mods.mkdir(parents=True)
    (mods / "f").write_text("x")
    names = list(_entries(make_initramfs(_fake_busybox(tmp_path, build.APPLETS), tmp_path / "modroot")))
    assert names.index("lib") < names.index("lib/a") < names.index("lib/a/b") < names.index("lib/a/b/f")


def _depmod():
    return shutil.which("depmod") or shutil.which("depmod", path="/sbin:/usr/sbin")


@pytest.mark.skipif(shutil.which("gcc") is None or _depmod() is None, reason="needs gcc and depmod (kmod)")
def test_copy_modules_takes_wanted_modules_and_deps_decompressed_and_runs_depmod(tmp_path):
    release = "6.1.0-9-cloud-amd64"
    mods = tmp_path / "pkg" / "lib" / "modules" / release
    (mods / "kernel" / "drivers").mkdir(parents=True)

    def module(name, depends):
        """An object file with a kernel-module-like .modinfo section (name=, depends=)."""
        c = tmp_path / f"{name}.c"
        c.write_text(f'__attribute__((section(".modinfo"))) const char m[] = "name={name}\\0depends={depends}";\n')
        subprocess.run(["gcc", "-c", "-o", str(tmp_path / f"{name}.o"), str(c)], check=True)
        return (tmp_path / f"{name}.o").read_bytes()

    blk, virtio, unrelated = module("virtio_blk", "virtio"), module("virtio", ""), module("virtio_gpu", "virtio")
    (mods / "kernel" / "drivers" / "virtio_blk.ko.xz").write_bytes(lzma.compress(blk, format=lzma.FORMAT_XZ))
    (mods / "kernel" / "drivers" / "virtio.ko.zst").write_bytes(zstandard.ZstdCompressor().compress(virtio))
    (mods / "kernel" / "drivers" / "virtio_gpu.ko").write_bytes(unrelated)
    kernel = debian.DebianKernel(tmp_path / "vmlinuz", None, release, mods)
    dest = tmp_path / "root"
    assert debian.copy_modules(kernel, dest, wanted=("virtio_blk",)) == ["virtio", "virtio_blk"]
    out = dest / "lib" / "modules" / release
    assert (out / "kernel/drivers/virtio_blk.ko").read_bytes() == blk
    assert (out / "kernel/drivers/virtio.ko").read_bytes() == virtio
    assert not (out / "kernel/drivers/virtio_gpu.ko").exists()
    dep = (out / "modules.dep").read_text()
    assert "kernel/drivers/virtio_blk.ko:" in dep and "kernel/drivers/virtio.ko:" in dep


def test_copy_modules_names_a_missing_wanted_module(tmp_path):
    mods = tmp_path / "lib" / "modules" / "r"
    mods.mkdir(parents=True)
    kernel = debian.DebianKernel(tmp_path / "vmlinuz", None, "r", mods)
    with pytest.raises(ImageError, match="no module 'virtio_pci'"):
        debian.copy_modules(kernel, tmp_path / "root", wanted=("virtio_pci",))


# ---- the guest agent in the images ---------------------------------------------------------------------------------

def test_agent_source_change_rebuilds_the_initramfs_not_the_microvm_kernel(inputs, tmp_path, monkeypatch):
    from popek.images import agent

    source = tmp_path / "agent.c"
    source.write_bytes(agent.SOURCE.read_bytes())
    monkeypatch.setattr(agent, "SOURCE", source)
    before = image_key("microvm"), image_key("debian"), build._microvm_kernel_key()
    source.write_bytes(source.read_bytes() + b"/* changed */\n")
    after = image_key("microvm"), image_key("debian"), build._microvm_kernel_key()
    assert after[0] != before[0] and after[1] != before[1]
    assert after[2] == before[2]


def test_initramfs_holds_the_agent_as_an_executable_bin_popek_agent(tmp_path):
    fake_agent = tmp_path / "popek-agent"
    fake_agent.write_bytes(b"\x7fELF agent")
    entries = _entries(make_initramfs(_fake_busybox(tmp_path, build.APPLETS), agent_binary=fake_agent))
    mode, _, _, data = entries["bin/popek-agent"]
    assert data == b"\x7fELF agent" and stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o755
    assert "bin/popek-agent" not in _entries(make_initramfs(_fake_busybox(tmp_path, build.APPLETS)))
