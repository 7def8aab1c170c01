"""Where a VM's virtio-vsock comes from: snapshots record it (and restore it elsewhere), detached VMs get one in
their runtime directory, and `popek exec` fails clearly when there is nothing to reach."""

import socket
import threading
from pathlib import Path

from click.testing import CliRunner

from popek.cli import main
from popek.cli_vms import detached_vsock
from popek.persist import _config_of, _config_record
from popek.runtime import RuntimeDir
from popek.snapshot import VmSummary
from popek.vm import VmConfig, VsockConfig


def _summary(cfg: VmConfig) -> VmSummary:
    return VmSummary([(0, cfg.memory)], cfg.cpus, cfg.cmdline, _config_record(cfg))


def test_snapshot_config_records_the_vsock_cid_and_socket_and_reads_them_back(tmp_path):
    cfg = VmConfig(kernel=tmp_path / "k", cmdline="quiet", vsock=VsockConfig(9, tmp_path / "v.sock"))
    assert _config_of(_summary(cfg), "state").vsock == VsockConfig(9, tmp_path / "v.sock")
    no_vsock = VmConfig(kernel=tmp_path / "k", cmdline="quiet")
    assert _config_of(_summary(no_vsock), "state").vsock is None
    older = _summary(no_vsock)
    del older.extra["vsock"]  # a snapshot from before vsock was recorded
    assert _config_of(older, "state").vsock is None


def test_detached_vm_gets_cid_3_and_the_socket_in_its_runtime_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert detached_vsock("web") == {"guest_cid": 3, "uds_path": str(tmp_path / "popek" / "web" / "vsock.sock")}


def _live_vm(tmp_path, monkeypatch, name="vm1") -> RuntimeDir:
    """A runtime directory owned by this (live) process, as a VMM would have it."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    return RuntimeDir.create(name, {})


def test_exec_into_no_such_vm_exits_1_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    r = CliRunner().invoke(main, ["exec", "ghost", "--", "true"])
    assert r.exit_code == 1 and "no VM named 'ghost'" in r.output


def test_exec_into_a_vm_without_vsock_socket_exits_1(tmp_path, monkeypatch):
    _live_vm(tmp_path, monkeypatch)
    r = CliRunner().invoke(main, ["exec", "vm1", "--", "true"])
    assert r.exit_code == 1 and "has no vsock socket" in r.output


def test_exec_when_the_agent_never_answers_exits_2_saying_so(tmp_path, monkeypatch):
    rd = _live_vm(tmp_path, monkeypatch)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # the device: it drops CONNECTs nobody listens for
    srv.bind(str(rd.vsock_socket))
    srv.listen()

    def drop():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.recv(64)
            c.close()

    threading.Thread(target=drop, daemon=True).start()
    try:
        r = CliRunner().invoke(main, ["exec", "--timeout", "0.5", "vm1", "--", "true"])
    finally:
        srv.close()
    assert r.exit_code == 2 and "guest agent did not answer within 0.5 s" in r.output
    assert r.output.count("\n") == 1


def test_exec_into_a_paused_vm_says_so_and_exits_1(tmp_path, monkeypatch):
    _live_vm(tmp_path, monkeypatch).set_state("paused")
    r = CliRunner().invoke(main, ["exec", "vm1", "--", "true"])
    assert r.exit_code == 1 and "is paused" in r.output


def test_exec_env_must_be_key_value(tmp_path, monkeypatch):
    _live_vm(tmp_path, monkeypatch)
    r = CliRunner().invoke(main, ["exec", "-e", "NOEQUALS", "vm1", "--", "true"])
    assert r.exit_code == 2 and "not KEY=VALUE" in r.output


def test_run_detached_refuses_vsock_path(tmp_path):
    r = CliRunner().invoke(main, ["run", "-d", "--vsock", str(tmp_path / "v.sock"), "--", "true"])
    assert r.exit_code == 2 and "runtime directory" in r.output and not Path(tmp_path / "v.sock").exists()
