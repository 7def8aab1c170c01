"""popek.warm without KVM: which runs start warm, the template key, the store (publish, discard, leftovers)."""

import os
from pathlib import Path

import pytest

from popek import warm

KEY_ARGS = dict(image="microvm-6.1-abc", memory=256 << 20, cpus=1, cmdline="console=ttyS0 popek.warm=1",
                flavor="kvm_pvm", cpu={"vendor": "GenuineIntel", "family": 6}, state_version=1, memory_version=1)


def test_a_command_with_the_default_guest_starts_warm():
    assert warm.cold_reason(command=("true",), environ={}) is None
    assert warm.cold_reason(command=("true",), kernel="debian", environ={}) is None


@pytest.mark.parametrize("options, why", [
    (dict(command=()), "no command"),
    (dict(cold=True), "--cold"),
    (dict(environ={"POPEK_NO_WARM": "1"}), "POPEK_NO_WARM"),
    (dict(kernel="/boot/vmlinuz"), "kernel path"),
    (dict(initrd="/tmp/initrd"), "--initrd"),
    (dict(drives=("path=disk.img",)), "--drive"),
    (dict(nets=("",)), "--net"),
    (dict(rootfs="debian"), "--rootfs"),
    (dict(profile=True), "--profile"),
    (dict(no_extract=True), "--no-extract"),
    (dict(no_rng=True), "--no-rng"),
    (dict(vsock="/tmp/v.sock"), "--vsock"),
])
def test_runs_a_template_cannot_honour_boot_cold_and_say_why(options, why):
    options = {"command": ("true",), "environ": {}, **options}
    assert why in warm.cold_reason(**options)


def test_popek_no_warm_0_or_empty_does_not_turn_warm_starts_off():
    assert warm.cold_reason(command=("true",), environ={"POPEK_NO_WARM": "0"}) is None
    assert warm.cold_reason(command=("true",), environ={"POPEK_NO_WARM": ""}) is None


def test_template_cmdline_has_the_warm_argument_and_no_command_before_the_users_append():
    line = warm.template_cmdline(emulating=True, append="loglevel=3")
    assert "popek.cmd=" not in line
    assert line.endswith("popek.warm=1 loglevel=3")
    assert "noxsave" in line and "noxsave" not in warm.template_cmdline(emulating=False)


def test_template_key_is_stable_for_the_same_inputs_and_names_image_memory_and_cpus():
    key = warm.template_key(**KEY_ARGS)
    assert key == warm.template_key(**dict(KEY_ARGS))
    assert key.startswith("microvm-6.1-abc-256m-1c-")


@pytest.mark.parametrize("field, value", [
    ("image", "microvm-6.1-def"), ("memory", 512 << 20), ("cpus", 2), ("cmdline", "console=ttyS0 popek.warm=1 x"),
    ("flavor", "hardware"), ("cpu", {"vendor": "AuthenticAMD", "family": 25}), ("state_version", 2),
    ("memory_version", 2),
])
def test_template_key_changes_with_everything_that_changes_the_saved_guest(field, value):
    assert warm.template_key(**dict(KEY_ARGS, **{field: value})) != warm.template_key(**KEY_ARGS)


def test_store_is_popek_warm_dir_when_set(monkeypatch, tmp_path):
    monkeypatch.setenv("POPEK_WARM_DIR", str(tmp_path / "w"))
    assert warm.warm_root() == tmp_path / "w"
    monkeypatch.delenv("POPEK_WARM_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    assert warm.warm_root() == tmp_path / "c" / "popek" / "warm"


class FakeVm:
    """Stands in for popek.vm.Vm in persist.save (patched): counts saves, can fail."""

    def __init__(self, fail: bool = False):
        self.fail, self.saves = fail, 0


@pytest.fixture
def fake_save(monkeypatch):
    def save(vm, state_path, memory_path):
        vm.saves += 1
        Path(memory_path).write_bytes(b"m" * 10)
        if vm.fail:
            raise OSError(28, "No space left on device")
        Path(state_path).write_bytes(b"s")

    import popek.persist

    monkeypatch.setattr(popek.persist, "save", save)


def test_publish_renames_a_complete_template_into_place(tmp_path, fake_save):
    path = tmp_path / "key1"
    assert warm.publish(FakeVm(), path) is True
    assert (path / "state").read_bytes() == b"s"
    assert warm.list_templates(tmp_path) == [path]
    assert [p.name for p in tmp_path.iterdir()] == ["key1"]


def test_a_failed_publish_leaves_no_template_and_no_temporary_directory(tmp_path, fake_save):
    with pytest.raises(OSError, match="No space"):
        warm.publish(FakeVm(fail=True), tmp_path / "key1")
    assert list(tmp_path.iterdir()) == []


def test_a_second_publisher_of_the_same_key_keeps_the_first_template(tmp_path, fake_save):
    path = tmp_path / "key1"
    warm.publish(FakeVm(), path)
    (path / "state").write_bytes(b"first")
    assert warm.publish(FakeVm(), path) is False
    assert (path / "state").read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["key1"]


def test_leftovers_of_a_dead_writer_are_removed_and_a_live_writers_are_kept(tmp_path, fake_save):
    dead = tmp_path / ".tmp-999999999-abc"
    live = tmp_path / f".tmp-{os.getpid()}-xyz"
    dead.mkdir()
    live.mkdir()
    warm.publish(FakeVm(), tmp_path / "key1")
    assert not dead.exists() and live.exists()


def test_discard_and_forget_all_remove_templates(tmp_path, fake_save):
    for k in ("a", "b"):
        warm.publish(FakeVm(), tmp_path / k)
    warm.discard(tmp_path / "a")
    assert warm.list_templates(tmp_path) == [tmp_path / "b"]
    warm.discard(tmp_path / "a")  # already gone: nothing to do
    assert warm.forget_all(tmp_path) == 1
    assert list(tmp_path.iterdir()) == []


def test_refresh_restored_leaves_a_guest_without_an_agent_alone_and_says_why(tmp_path):
    import socket
    import threading

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "closes.sock"))
    listener.listen(1)
    # a vsock device with nothing on the agent's port closes the connection: AgentNotReady
    def close_each():
        while True:
            try:
                listener.accept()[0].close()
            except OSError:
                return

    threading.Thread(target=close_each, daemon=True).start()
    try:
        problems = warm.refresh_restored([tmp_path / "missing.sock", tmp_path / "closes.sock"], timeout=5.0)
    finally:
        listener.close()
    assert len(problems) == 2
    assert "missing.sock: no vsock socket" in problems[0] or "missing.sock: no vsock socket" in problems[1]


@pytest.fixture
def cli(monkeypatch):
    """`popek run` through click's runner, with popek.warm.run and popek.cli.VM replaced by recorders."""
    from click.testing import CliRunner

    import popek.cli

    calls = []

    def fake_run(command, **kwargs):
        calls.append(("warm", command, kwargs))
        kwargs["on_stdout"](b"out\n")
        return warm.WarmRun(7, True, False, "k", {"exec": 0.1}, {"wall_s": 1.0})

    def fake_vm(command, **kwargs):
        calls.append(("cold", command, kwargs))
        raise ValueError("cold boot asked")

    monkeypatch.setattr(warm, "run", fake_run)
    monkeypatch.setattr(popek.cli, "VM", fake_vm)
    monkeypatch.delenv("POPEK_NO_WARM", raising=False)

    def invoke(*args):
        r = CliRunner().invoke(popek.cli.main, ["run", *args])
        return r, calls

    return invoke


def test_popek_run_with_a_command_starts_warm_and_exits_with_the_commands_status(cli):
    r, calls = cli("--memory", "512M", "--stats-json", "--", "sh", "-c", "exit 7")
    assert r.exit_code == 7, r.output
    assert [c[0] for c in calls] == ["warm"] and calls[0][1] == ["sh", "-c", "exit 7"]
    assert calls[0][2]["memory"] == "512M"
    assert '"warm": true' in r.output


@pytest.mark.parametrize("args", [("--cold", "--", "true"), ("--no-rng", "--", "true"), ()])
def test_popek_run_cold_interactive_or_with_options_a_template_lacks_boots(cli, args):
    r, calls = cli(*args)
    assert [c[0] for c in calls] == ["cold"], r.output
    assert "cold boot asked" in r.output
