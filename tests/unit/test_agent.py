"""The guest agent's protocol (popek/agent.py) and the compiled agent (popek/images/agent.c) served over a Unix
socket on the host (``popek-agent --unix PATH``), so no KVM is needed."""

import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

from popek import agent
from popek.agent import (AgentClient, AgentNotReady, AgentProtocolError, AgentTimeout, FrameDecoder, encode_exec,
                         encode_frame, encode_refresh)
from popek.images.agent import build_agent
from popek.images.cache import ImageError

# ---- framing (no agent) ---------------------------------------------------------------------------------------------


def test_frames_split_at_every_byte_boundary_decode_to_the_same_frames():
    stream = encode_frame(agent.STDOUT, b"hello") + encode_frame(agent.STDERR, b"") + \
        encode_frame(agent.EXIT, struct.pack("<I", 7))
    for cut in range(len(stream) + 1):
        dec = FrameDecoder()
        frames = dec.feed(stream[:cut]) + dec.feed(stream[cut:])
        assert frames == [(agent.STDOUT, b"hello"), (agent.STDERR, b""), (agent.EXIT, b"\x07\0\0\0")]
        assert dec.pending == 0


def test_decoder_refuses_an_over_long_length_as_soon_as_the_header_arrives():
    dec = FrameDecoder()
    with pytest.raises(AgentProtocolError, match="longer than"):
        dec.feed(struct.pack("<BI", agent.STDOUT, agent.MAX_PAYLOAD + 1))
    assert FrameDecoder().feed(struct.pack("<BI", agent.STDOUT, agent.MAX_PAYLOAD)) == []  # the limit itself is fine


def test_decoder_refuses_a_frame_type_that_is_not_a_response():
    with pytest.raises(AgentProtocolError, match="unexpected frame type 0x01"):
        FrameDecoder().feed(encode_frame(agent.EXEC, b""))


def test_exit_frame_must_carry_exactly_a_u32():
    with pytest.raises(AgentProtocolError, match="not a u32"):
        agent.decode_u32(agent.EXIT, b"\0\0\0")


def test_encoders_refuse_what_the_protocol_cannot_carry():
    with pytest.raises(ValueError, match="non-empty list"):
        encode_exec([])
    with pytest.raises(ValueError, match="non-empty list"):
        encode_exec("echo hi")
    with pytest.raises(ValueError, match="NUL"):
        encode_exec(["echo", "a\0b"])
    with pytest.raises(ValueError, match="contains '='"):
        encode_exec(["env"], env={"A=B": "c"})
    with pytest.raises(ValueError, match="longer than"):
        encode_frame(agent.STDIN, b"x" * (agent.MAX_PAYLOAD + 1))
    with pytest.raises(ValueError, match="longer than 64"):
        encode_refresh(hostname="h" * 65)


def test_exec_frame_layout_flags_counts_then_length_prefixed_strings():
    frame = encode_exec(["ls", "-l"], env={"A": "1"}, cwd="/tmp", stdin=True)
    type_, length = struct.unpack_from("<BI", frame)
    payload = frame[5:]
    assert type_ == agent.EXEC and length == len(payload)
    assert struct.unpack_from("<III", payload) == (agent.EXEC_STDIN | agent.EXEC_CWD, 2, 1)
    assert payload[12:] == b"\x02\0\0\0ls" + b"\x02\0\0\0-l" + b"\x03\0\0\0A=1" + b"\x04\0\0\0/tmp"


def test_vsock_argument_true_makes_a_private_socket_directory_none_gives_no_device(tmp_path):
    cfg, d = agent.vsock_config(True)
    try:
        assert cfg.guest_cid == agent.DEFAULT_GUEST_CID and cfg.uds_path.parent == d
        assert d.is_dir() and (d.stat().st_mode & 0o777) == 0o700 and not cfg.uds_path.exists()
    finally:
        shutil.rmtree(d)
    assert agent.vsock_config(tmp_path / "v.sock")[0].uds_path == tmp_path / "v.sock"
    assert agent.vsock_config(None) == (None, None) and agent.vsock_config(False) == (None, None)
    with pytest.raises(TypeError):
        agent.vsock_config(3)


# ---- the compiled agent over a Unix socket ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def agent_binary(tmp_path_factory):
    return build_agent(tmp_path_factory.mktemp("agent") / "popek-agent")


def _start(binary: Path, sock: Path, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    proc = subprocess.Popen([*prefix, str(binary), "--unix", str(sock)])
    deadline = time.monotonic() + 10
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the agent did not listen on {sock} (exit {proc.poll()})")
        time.sleep(0.01)
    return proc


@pytest.fixture
def served(agent_binary, tmp_path):
    sock = tmp_path / "agent.sock"
    proc = _start(agent_binary, sock)
    yield AgentClient(sock, hybrid=False)
    proc.kill()
    proc.wait()


def _raw(client: AgentClient) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(client.uds_path)
    return s


def _frames_until_close(s: socket.socket) -> list[tuple[int, bytes]]:
    dec, frames = FrameDecoder(), []
    while data := s.recv(65536):
        frames += dec.feed(data)
    return frames


def test_build_agent_failure_is_an_image_error_and_leaves_no_file(tmp_path):
    bad = tmp_path / "bad.c"
    bad.write_text("int main(void) { return undefined_thing; }\n")
    with pytest.raises(ImageError, match="compiling the guest agent"):
        build_agent(tmp_path / "out" / "popek-agent", source=bad)
    assert list((tmp_path / "out").iterdir()) == []


def test_agent_is_a_static_executable(agent_binary):
    assert os.access(agent_binary, os.X_OK)
    assert b"PT_INTERP" not in agent_binary.read_bytes()[:4096]
    out = subprocess.run(["file", str(agent_binary)], capture_output=True, text=True)
    if out.returncode == 0:
        assert "statically linked" in out.stdout


def test_ping_answers_the_agent_version(served):
    assert served.ping().startswith("popek-agent ")


def test_exec_gives_stdout_stderr_and_exit_status_separately(served):
    r = served.run(["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (r.stdout, r.stderr, r.exit_status, r.error) == (b"out\n", b"err\n", 7, None)


def test_command_killed_by_a_signal_reports_128_plus_the_signal(served):
    assert served.run(["sh", "-c", "kill -TERM $$"]).exit_status == 128 + signal.SIGTERM


def test_command_that_cannot_be_executed_gives_an_error_message_and_127(served):
    r = served.run(["/nonexistent/popek-no-such-command"])
    assert r.exit_status == 127 and "No such file or directory" in r.error
    r = served.run(["pwd"], cwd="/nonexistent-dir")
    assert r.exit_status == 127 and "cannot change directory to /nonexistent-dir" in r.error


def test_env_adds_to_or_replaces_the_environment_and_cwd_sets_the_directory(served, tmp_path):
    r = served.run(["sh", "-c", 'echo "$POPEK_X:$HOME"; pwd'], env={"POPEK_X": "1"}, cwd=str(tmp_path))
    assert r.stdout.decode().splitlines() == [f"1:{os.environ.get('HOME', '')}", str(tmp_path)]
    r = served.run(["/usr/bin/env"], env={"ONLY": "this"}, clear_env=True)
    assert r.stdout == b"ONLY=this\n"


def test_stdin_bytes_reach_the_command_in_order_and_eof_ends_it(served):
    data = os.urandom(3 << 20)  # several frames, and more than a pipe holds
    r = served.run(["sha256sum"], stdin=data)
    import hashlib
    assert r.exit_status == 0 and r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_without_stdin_the_command_reads_dev_null(served):
    assert served.run(["cat"], timeout=10) == agent.ExecResult(b"", b"", 0)


def test_stdin_frames_sent_with_the_exec_frame_in_one_write_are_not_left_unread(served):
    s = _raw(served)
    s.sendall(encode_exec(["cat"], stdin=True) + encode_frame(agent.STDIN, b"abc") + encode_frame(agent.STDIN_EOF))
    assert _frames_until_close(s) == [(agent.STDOUT, b"abc"), (agent.EXIT, b"\0\0\0\0")]


def test_stdin_from_a_pipe_is_forwarded_while_the_command_runs_and_output_streams_before_exit(served):
    r, w = os.pipe()
    seen = []

    def on_stdout(data):
        seen.append(data)
        if b"first" in b"".join(seen) and w not in closed:
            os.write(w, b"go\n")  # only once "first" arrived: unstreamed output would deadlock here
            os.close(w)
            closed.append(w)

    closed = []
    try:
        status = served.exec(["sh", "-c", "echo first; read x; echo second $x"], stdin=r, on_stdout=on_stdout,
                             timeout=20)
    finally:
        os.close(r)
        if not closed:
            os.close(w)
    assert status == 0 and b"".join(seen) == b"first\nsecond go\n"


def test_signal_request_reaches_the_commands_process_group(served):
    s = _raw(served)
    s.sendall(encode_exec(["sh", "-c", 'trap "exit 3" USR1; echo ready; while :; do sleep 0.05; done']))
    dec = FrameDecoder()
    assert dec.feed(s.recv(65536)) == [(agent.STDOUT, b"ready\n")]
    s.sendall(encode_frame(agent.SIGNAL, struct.pack("<I", signal.SIGUSR1)))
    frames = _frames_until_close(s)
    assert frames[-1] == (agent.EXIT, struct.pack("<I", 3))


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


def test_lost_host_connection_kills_the_commands_process_group(served):
    s = _raw(served)
    s.sendall(encode_exec(["sh", "-c", "sleep 60 & echo $!; wait"]))
    pid = int(FrameDecoder().feed(s.recv(65536))[0][1])
    s.close()
    assert _gone(pid), "the command's background child outlived the host connection"


def test_timeout_raises_and_kills_the_command(served):
    pids = []
    with pytest.raises(AgentTimeout, match="did not finish within 0.5 s"):
        served.exec(["sh", "-c", "sleep 60 & echo $!; wait"], on_stdout=lambda d: pids.append(int(d)), timeout=0.5)
    assert pids and _gone(pids[0])


@pytest.mark.parametrize("frame, message", [
    (struct.pack("<BI", agent.EXEC, agent.MAX_PAYLOAD + 1), b"longer than"),
    (encode_frame(0x7F, b""), b"first request must be"),
    (encode_frame(agent.STDIN, b"x"), b"first request must be"),
    (encode_frame(agent.EXEC, struct.pack("<III", 0, 0xFFFFFF, 0)), b"malformed EXEC"),
    (encode_frame(agent.EXEC, struct.pack("<III", 0, 1, 0) + struct.pack("<I", 1000) + b"sh"), b"malformed EXEC"),
    (encode_frame(agent.EXEC, struct.pack("<III", 0x80, 1, 0) + struct.pack("<I", 2) + b"sh"), b"malformed EXEC"),
    (encode_frame(agent.EXEC, struct.pack("<III", 0, 1, 1) + struct.pack("<I", 2) + b"sh" + struct.pack("<I", 1)
                  + b"A"), b"malformed EXEC"),
    (encode_frame(agent.REFRESH, b"\x01"), b"malformed REFRESH"),
])
def test_hostile_requests_get_an_error_and_the_connection_ends(served, frame, message):
    s = _raw(served)
    s.sendall(frame)
    frames = _frames_until_close(s)
    assert [t for t, _ in frames] == [agent.ERROR] and message in frames[0][1]
    assert served.ping()  # the agent itself still serves


def test_unexpected_request_while_a_command_runs_ends_it(served):
    s = _raw(served)
    s.sendall(encode_exec(["sh", "-c", "echo $$; sleep 60"]))
    pid = int(FrameDecoder().feed(s.recv(65536))[0][1])
    s.sendall(encode_frame(agent.PING))
    frames = _frames_until_close(s)
    assert frames[-1][0] == agent.ERROR and b"unexpected request type 0x06" in frames[-1][1]
    assert _gone(pid)


def test_refresh_sets_the_hostname_and_adds_entropy(agent_binary, tmp_path):
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) for a private UTS namespace")
    sock = tmp_path / "agent.sock"
    proc = _start(agent_binary, sock, ("unshare", "--uts"))
    try:
        client = AgentClient(sock, hybrid=False)
        client.refresh(clock=False, entropy=os.urandom(32), hostname="popek-refreshed")  # never the host's clock
        assert client.run(["hostname"]).stdout == b"popek-refreshed\n"
        assert os.uname().nodename != "popek-refreshed"
    finally:
        proc.kill()
        proc.wait()


# ---- the hybrid vsock handshake (no agent: a fake device socket) --------------------------------------------------

def _fake_device(tmp_path, answer: bytes | None):
    """A Unix socket that reads a CONNECT line and answers ``answer`` (None: closes, as the device does when the
    guest resets the connection because nothing listens on the port)."""
    import threading

    path = tmp_path / "v.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen()
    lines = []

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            with c:
                lines.append(c.recv(64))
                if answer is not None:
                    c.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    return path, srv, lines


def test_wait_ready_retries_until_its_timeout_while_the_guest_resets_connect(tmp_path):
    path, srv, lines = _fake_device(tmp_path, None)
    try:
        with pytest.raises(AgentNotReady, match="did not answer within 0.5 s"):
            AgentClient(path).wait_ready(0.5)
        assert len(lines) >= 2 and set(lines) == {b"CONNECT 52\n"}
    finally:
        srv.close()


def test_handshake_answer_other_than_ok_is_a_protocol_error(tmp_path):
    path, srv, _ = _fake_device(tmp_path, b"NO WAY\n")
    try:
        with pytest.raises(AgentProtocolError, match="not 'OK <port>'"):
            AgentClient(path).connect()
    finally:
        srv.close()


def test_missing_socket_is_not_ready(tmp_path):
    with pytest.raises(AgentNotReady, match="cannot reach"):
        AgentClient(tmp_path / "nothing.sock").connect()


def test_stale_private_vsock_dirs_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"{agent.VSOCK_DIR_PREFIX}{dead.pid}-abc"
    live = tmp_path / f"{agent.VSOCK_DIR_PREFIX}{os.getpid()}-def"
    other = tmp_path / "popek-vsock-notapid-x"
    for d in (stale, live, other):
        d.mkdir()
        (d / "vsock.sock").touch()
    assert agent.remove_stale_vsock_dirs(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other.exists()
