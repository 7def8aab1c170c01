"""The guest agent's wire protocol and its host client: run commands in a guest and refresh it over vsock.

Transport: the guest agent (popek/images/agent.c, /bin/popek-agent in the default initramfs) listens on
AF_VSOCK port AGENT_PORT (52). The host reaches it through the VM's virtio-vsock Unix socket with Firecracker's
hybrid vsock protocol (popek/devices/virtio/vsock.py): connect to the uds, send ``CONNECT 52\\n``, read
``OK <host port>\\n``; from then on the socket is the stream. If nothing listens on port 52 yet the device resets
the connection, and the host sees EOF instead of ``OK`` (``AgentNotReady``). The agent also listens on a plain
Unix socket (``popek-agent --unix PATH``) so the protocol can be tested on the host (``hybrid=False``).

Frames, both directions: ``type`` u8, ``length`` u32 little endian, then ``length`` bytes of payload, at most
MAX_PAYLOAD (1 MiB); a longer length is a protocol error (the agent answers ERROR and closes, the client raises
``AgentProtocolError``). Integers are little endian; a *string* is u32 length + bytes (no NUL inside).

One request per connection; the first frame the host sends is one of:

- EXEC (0x01): u32 flags, u32 argc (>= 1), u32 envc, then argc strings (argv; argv[0] is looked up in PATH),
  envc strings ``KEY=VALUE``, and a cwd string if flags has EXEC_CWD. Flags: EXEC_STDIN (1) gives the command a
  pipe fed by STDIN frames (else /dev/null), EXEC_CLEAR_ENV (2) starts from an empty environment (else the
  agent's, with the given entries added), EXEC_CWD (4). The command runs in its own session and process group.
  While it runs the host may send STDIN (0x02, payload = bytes for its stdin), STDIN_EOF (0x03, empty: close
  its stdin once the bytes before it are written) and SIGNAL (0x04, u32 signal number: sent to the command's
  process group). The agent streams STDOUT (0x81) and STDERR (0x82) frames (payload = output bytes, at most
  64 KiB each) as the command writes, then one EXIT (0x83, u32 status: the exit code, or 128 + the signal
  that killed it) and closes. A command that cannot start gets ERROR (0x84, UTF-8 message, e.g. "cannot
  execute x: No such file or directory") then EXIT 127. If the host connection ends (EOF or error) before
  EXIT, the agent SIGKILLs the command's process group.
- REFRESH (0x05): u32 flags, u64 wall clock (ns since the Unix epoch), entropy bytes (u32 length + bytes), a
  hostname string. Flags: REFRESH_CLOCK (1) sets CLOCK_REALTIME, REFRESH_ENTROPY (2) adds the bytes to the
  kernel's pool crediting 8 bits each (RNDADDENTROPY, random(4)) and reseeds the CRNG from it (RNDRESEEDCRNG:
  else the CRNG of a restored snapshot's clones would give the same bytes until its next periodic reseed),
  REFRESH_HOSTNAME (4) calls sethostname(2).
  Answer: OK (0x85, empty) or ERROR saying which step failed. (Warm start from a snapshot uses it: the guest's
  clock and entropy pool are the snapshot's.)
- PING (0x06, empty): answered by OK with the agent's version string.

Anything else (an unknown first request, a request type not allowed while a command runs, a malformed payload)
is answered with ERROR and ends the connection.
"""

from __future__ import annotations

import errno
import os
import selectors
import signal as signal_module
import shutil
import socket
import stat
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from popek.vm import VsockConfig

#: The vsock port the guest agent listens on.
AGENT_PORT = 52
#: Largest payload of one frame (bytes), both directions.
MAX_PAYLOAD = 1 << 20
#: Frame header: type u8, length u32 LE.
HEADER = struct.Struct("<BI")

# Requests (host -> agent).
EXEC, STDIN, STDIN_EOF, SIGNAL, REFRESH, PING = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06
# Responses (agent -> host).
STDOUT, STDERR, EXIT, ERROR, OK = 0x81, 0x82, 0x83, 0x84, 0x85
RESPONSES = frozenset((STDOUT, STDERR, EXIT, ERROR, OK))
# EXEC flags.
EXEC_STDIN, EXEC_CLEAR_ENV, EXEC_CWD = 1, 2, 4
# REFRESH flags.
REFRESH_CLOCK, REFRESH_ENTROPY, REFRESH_HOSTNAME = 1, 2, 4
#: Bytes of host stdin per STDIN frame.
STDIN_CHUNK = 64 * 1024
#: Entropy bytes ``refresh`` sends by default (512 bits: more than the kernel's pool needs to be "ready").
REFRESH_ENTROPY_BYTES = 64
#: Longest hostname Linux takes (HOST_NAME_MAX).
HOST_NAME_MAX = 64
#: Seconds between connection attempts in ``wait_ready``.
RETRY_S = 0.1
_U32 = struct.Struct("<I")


class AgentError(RuntimeError):
    """Talking to the guest agent failed (the message says how)."""


class AgentProtocolError(AgentError):
    """The agent (or a peer claiming to be one) sent a frame that breaks the protocol."""


class AgentNotReady(AgentError):
    """Nothing answered on the agent's port within the timeout (the guest is still booting, or has no agent)."""


class AgentTimeout(AgentError):
    """The command did not finish within the timeout; the connection was closed, which kills it in the guest."""


# ---- framing ------------------------------------------------------------------------------------------------------

def encode_frame(type_: int, payload: bytes = b"") -> bytes:
    """One frame: header + payload. :raises ValueError: for a type outside 0-255 or a payload over MAX_PAYLOAD."""
    if not 0 <= type_ <= 0xFF:
        raise ValueError(f"frame type {type_} is not a byte")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes is longer than the {MAX_PAYLOAD} a frame holds")
    return HEADER.pack(type_, len(payload)) + payload


def _string(s: str | bytes, what: str) -> bytes:
    b = os.fsencode(s) if isinstance(s, str) else bytes(s)
    if b"\0" in b:
        raise ValueError(f"{what} {s!r} contains a NUL byte")
    return _U32.pack(len(b)) + b


def encode_exec(argv: list[str | bytes], *, env: dict[str, str] | None = None, clear_env: bool = False,
                cwd: str | None = None, stdin: bool = False) -> bytes:
    """The EXEC frame for ``argv`` (at least one item), ``env`` entries added to (or, with ``clear_env``, making
    up) the command's environment, working directory ``cwd``, and a stdin pipe if ``stdin``.

    :raises ValueError: for an empty argv, a NUL in any string, a '=' in or empty env key, or a frame over
        MAX_PAYLOAD.
    """
    if isinstance(argv, (str, bytes)) or not argv:
        raise ValueError("argv must be a non-empty list of strings (e.g. ['sh', '-c', 'echo hi'])")
    env = env or {}
    for k in env:
        if not k or "=" in k:
            raise ValueError(f"environment variable name {k!r} is empty or contains '='")
    flags = (EXEC_STDIN if stdin else 0) | (EXEC_CLEAR_ENV if clear_env else 0) | (EXEC_CWD if cwd else 0)
    parts = [struct.pack("<III", flags, len(argv), len(env))]
    parts += [_string(a, "argument") for a in argv]
    parts += [_string(f"{k}={v}", "environment entry") for k, v in env.items()]
    if cwd:
        parts.append(_string(cwd, "working directory"))
    return encode_frame(EXEC, b"".join(parts))


def encode_refresh(*, wall_ns: int | None = None, entropy: bytes | None = None, hostname: str | None = None) -> bytes:
    """The REFRESH frame: set the clock to ``wall_ns`` (ns since the epoch), add ``entropy``, set ``hostname``
    (each only if given). :raises ValueError: for a negative or > u64 time, or a hostname over HOST_NAME_MAX."""
    flags = (REFRESH_CLOCK if wall_ns is not None else 0) | (REFRESH_ENTROPY if entropy else 0) \
        | (REFRESH_HOSTNAME if hostname is not None else 0)
    if wall_ns is not None and not 0 <= wall_ns < 1 << 64:
        raise ValueError(f"wall clock {wall_ns} ns is outside 0..2**64-1")
    host = (hostname or "").encode()
    if len(host) > HOST_NAME_MAX:
        raise ValueError(f"hostname {hostname!r} is longer than {HOST_NAME_MAX} bytes")
    entropy = entropy or b""
    payload = struct.pack("<IQI", flags, wall_ns or 0, len(entropy)) + entropy + _string(host, "hostname")
    return encode_frame(REFRESH, payload)


class FrameDecoder:
    """Splits a byte stream into ``(type, payload)`` frames: ``feed(data)`` returns the frames completed so far.

    :param allowed: frame types accepted (default: the agent's responses).
    :raises AgentProtocolError: (from ``feed``) for a length over MAX_PAYLOAD or a type not in ``allowed``, as
        soon as the header is in; the decoder is unusable afterwards.
    """

    def __init__(self, allowed: frozenset[int] = RESPONSES):
        self.allowed = allowed
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes held of an incomplete frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buf += data
        frames = []
        while len(self._buf) >= HEADER.size:
            type_, length = HEADER.unpack_from(self._buf)
            if type_ not in self.allowed:
                raise AgentProtocolError(f"unexpected frame type {type_:#04x}")
            if length > MAX_PAYLOAD:
                raise AgentProtocolError(f"frame of {length} bytes is longer than the {MAX_PAYLOAD} allowed")
            if len(self._buf) < HEADER.size + length:
                break
            frames.append((type_, bytes(self._buf[HEADER.size:HEADER.size + length])))
            del self._buf[:HEADER.size + length]
        return frames


def decode_u32(type_: int, payload: bytes) -> int:
    """The u32 of an EXIT frame. :raises AgentProtocolError: unless the payload is exactly 4 bytes."""
    if len(payload) != 4:
        raise AgentProtocolError(f"frame {type_:#04x} carries {len(payload)} bytes, not a u32")
    return _U32.unpack(payload)[0]


# ---- the client ---------------------------------------------------------------------------------------------------

@dataclass
class ExecResult:
    """What a command run through the agent gave: its stdout and stderr bytes, its exit status (exit code, or
    128 + signal), and the agent's error message if it could not start it (exit status 127 then)."""

    stdout: bytes
    stderr: bytes
    exit_status: int
    error: str | None = None


class AgentClient:
    """Talks to the guest agent through a VM's vsock Unix socket.

    :param uds_path: the virtio-vsock device's Unix socket (``popek.vm.VsockConfig.uds_path``), or with
        ``hybrid=False`` a socket an agent listens on directly (``popek-agent --unix PATH``).
    :param port: the agent's vsock port.
    """

    def __init__(self, uds_path: str | os.PathLike, *, port: int = AGENT_PORT, hybrid: bool = True):
        self.uds_path, self.port, self.hybrid = os.fspath(uds_path), port, hybrid

    def connect(self, timeout: float = 5.0) -> tuple[socket.socket, bytes]:
        """A stream to the agent (and bytes already read past the ``OK`` line).

        :raises AgentNotReady: if the socket is missing or refuses, or the device closes the connection (nothing
            listens on the port yet); AgentProtocolError for a handshake answer other than ``OK <port>``.
        """
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.settimeout(timeout)
            try:
                s.connect(self.uds_path)
                if not self.hybrid:
                    return s, b""
                s.sendall(b"CONNECT %d\n" % self.port)
                line = b""
                while b"\n" not in line and len(line) < 64:
                    chunk = s.recv(64)
                    if not chunk:
                        raise AgentNotReady(f"nothing listens on vsock port {self.port} of the guest behind "
                                            f"{self.uds_path} yet")
                    line += chunk
            except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError, BrokenPipeError,
                    socket.timeout) as e:
                raise AgentNotReady(f"cannot reach the guest agent through {self.uds_path}: {e}") from None
            head, _, rest = line.partition(b"\n")
            if not (head.startswith(b"OK ") and head[3:].isdigit()):
                raise AgentProtocolError(f"vsock handshake on {self.uds_path} answered {head!r}, not 'OK <port>'")
            return s, rest
        except BaseException:
            s.close()
            raise

    def _request(self, frame: bytes, timeout: float) -> tuple[int, bytes]:
        """Send a one-frame request and return the one answer frame."""
        s, rest = self.connect(timeout)
        with s:
            s.settimeout(timeout)
            s.sendall(frame)
            dec = FrameDecoder()
            frames = dec.feed(rest)
            try:
                while not frames:
                    data = s.recv(65536)
                    if not data:
                        raise AgentError("the guest agent closed the connection without answering")
                    frames = dec.feed(data)
            except socket.timeout:
                raise AgentTimeout(f"the guest agent did not answer within {timeout:g} s") from None
            return frames[0]

    def ping(self, timeout: float = 5.0) -> str:
        """The agent's version string. :raises AgentNotReady, AgentError: as ``connect`` / on a bad answer."""
        type_, payload = self._request(encode_frame(PING), timeout)
        if type_ != OK:
            raise AgentError(f"PING answered with frame {type_:#04x}: {payload.decode(errors='replace')}")
        return payload.decode(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> str:
        """Retry ``ping`` every RETRY_S until the agent answers (the guest may still be booting); its version.

        :raises AgentNotReady: if it did not answer within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.ping(timeout=max(0.5, min(5.0, deadline - time.monotonic())))
            except (AgentNotReady, AgentTimeout) as e:
                if time.monotonic() + RETRY_S >= deadline:
                    raise AgentNotReady(f"the guest agent did not answer within {timeout:g} s ({e})") from None
            time.sleep(RETRY_S)

    def refresh(self, *, clock: bool | int = True, entropy: bytes | None = None, hostname: str | None = None,
                timeout: float = 10.0) -> None:
        """Set the guest's wall clock (``clock``: True = the host's CLOCK_REALTIME now, an int = that many ns since
        the epoch, False = leave it), add ``entropy`` (default: REFRESH_ENTROPY_BYTES from os.urandom; b"": none)
        and, if given, set its hostname.

        :raises AgentError: with the agent's message if a step failed; AgentNotReady as ``connect``.
        """
        wall_ns = None if clock is False else time.time_ns() if clock is True else int(clock)
        frame = encode_refresh(wall_ns=wall_ns,
                               entropy=os.urandom(REFRESH_ENTROPY_BYTES) if entropy is None else entropy,
                               hostname=hostname)
        type_, payload = self._request(frame, timeout)
        if type_ != OK:
            raise AgentError(f"guest agent: {payload.decode(errors='replace')}")

    def exec(self, argv: list[str], *, stdin: bytes | BinaryIO | int | None = None,
             on_stdout: Callable[[bytes], None] | None = None, on_stderr: Callable[[bytes], None] | None = None,
             on_error: Callable[[str], None] | None = None, env: dict[str, str] | None = None,
             clear_env: bool = False, cwd: str | None = None, timeout: float | None = None) -> int:
        """Run ``argv`` in the guest; return its exit status (exit code, or 128 + the signal that ended it).

        Output is passed to ``on_stdout`` / ``on_stderr`` as it arrives; the agent's error message (a command
        that cannot start: status 127) to ``on_error``. ``stdin``: None (the command reads /dev/null), bytes, or a
        file object / descriptor read until EOF while the command runs. A KeyboardInterrupt while waiting is
        forwarded as SIGINT to the command's process group; a second one closes the connection (the agent then
        kills the command) and propagates.

        :param timeout: seconds for the whole command (None: no limit).
        :raises AgentTimeout: when ``timeout`` passes (the command is killed); AgentNotReady as ``connect``;
            AgentProtocolError for a bad frame; AgentError if the connection ends without EXIT.
        """
        frame = encode_exec(argv, env=env, clear_env=clear_env, cwd=cwd, stdin=stdin is not None)
        deadline = None if timeout is None else time.monotonic() + timeout
        s, rest = self.connect(5.0 if timeout is None else min(timeout, 5.0))
        source = _StdinSource(stdin) if stdin is not None else None
        sel = selectors.DefaultSelector()
        try:
            s.setblocking(False)
            out = bytearray(frame)
            dec = FrameDecoder()
            frames = dec.feed(rest)
            sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
            stdin_registered = False
            interrupted = 0
            while True:
                for type_, payload in frames:
                    if type_ == STDOUT:
                        on_stdout and on_stdout(payload)
                    elif type_ == STDERR:
                        on_stderr and on_stderr(payload)
                    elif type_ == ERROR:
                        on_error and on_error(payload.decode(errors="replace"))
                    elif type_ == EXIT:
                        return decode_u32(type_, payload)
                    else:
                        raise AgentProtocolError(f"unexpected frame {type_:#04x} during EXEC")
                frames = []
                # stdin is read only while nothing is waiting to go out: the socket's buffer is the backpressure
                want_stdin = source is not None and not source.done and not out
                if source is not None and source.selectable and want_stdin != stdin_registered:
                    if want_stdin:
                        sel.register(source.fd, selectors.EVENT_READ)
                    else:
                        sel.unregister(source.fd)
                    stdin_registered = want_stdin
                if want_stdin and not source.selectable:
                    out += source.frame()
                sel.modify(s, selectors.EVENT_READ | (selectors.EVENT_WRITE if out else 0))
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise AgentTimeout(f"the command {argv[0]!r} did not finish within {timeout:g} s; killed it")
                try:
                    events = sel.select(left)
                except KeyboardInterrupt:
                    interrupted += 1
                    if interrupted > 1:
                        raise
                    out += encode_frame(SIGNAL, _U32.pack(signal_module.SIGINT))
                    continue
                for key, mask in events:
                    if key.fileobj is s:
                        if mask & selectors.EVENT_WRITE and out:
                            try:
                                del out[:s.send(out)]
                            except (BlockingIOError, InterruptedError):
                                pass
                            except OSError as e:
                                raise AgentError(f"the connection to the guest agent failed: {e}") from None
                        if mask & selectors.EVENT_READ:
                            try:
                                data = s.recv(1 << 20)
                            except (BlockingIOError, InterruptedError):
                                continue
                            except OSError as e:
                                raise AgentError(f"the connection to the guest agent failed: {e}") from None
                            if not data:
                                raise AgentError("the guest agent closed the connection before the command's exit "
                                                 "status")
                            frames += dec.feed(data)
                    else:
                        out += source.frame()
        finally:
            sel.close()
            s.close()

    def run(self, argv: list[str], **kwargs) -> ExecResult:
        """``exec`` collecting stdout, stderr and the error message into an ``ExecResult``."""
        stdout, stderr, errors = bytearray(), bytearray(), []
        status = self.exec(argv, on_stdout=stdout.extend, on_stderr=stderr.extend, on_error=errors.append, **kwargs)
        return ExecResult(bytes(stdout), bytes(stderr), status, "; ".join(errors) or None)


class _StdinSource:
    """Host stdin for EXEC as STDIN frames: bytes, or a file object/descriptor (pipes and terminals are polled;
    regular files, which poll(2) calls always readable and epoll refuses, are read a chunk at a time)."""

    def __init__(self, stdin: bytes | BinaryIO | int):
        self.done = False
        if isinstance(stdin, (bytes, bytearray, memoryview)):
            self._chunks: Iterator[bytes] | None = iter([bytes(stdin[i:i + STDIN_CHUNK])
                                                         for i in range(0, len(stdin), STDIN_CHUNK)])
            self.fd, self.selectable = -1, False
            return
        self._chunks = None
        self.fd = stdin if isinstance(stdin, int) else stdin.fileno()
        self.selectable = not stat.S_ISREG(os.fstat(self.fd).st_mode)

    def frame(self) -> bytes:
        """The next STDIN frame, or STDIN_EOF (then ``done``)."""
        if self._chunks is not None:
            chunk = next(self._chunks, b"")
        else:
            try:
                chunk = os.read(self.fd, STDIN_CHUNK)
            except BlockingIOError:
                return b""
            except OSError as e:
                if e.errno != errno.EIO:  # a terminal that went away reads as EOF
                    raise
                chunk = b""
        if not chunk:
            self.done = True
            return encode_frame(STDIN_EOF)
        return encode_frame(STDIN, chunk)


#: The guest CID Popek gives a VM's vsock unless told otherwise (the first one guests may use).
DEFAULT_GUEST_CID = 3
#: File name of the vsock socket inside a private directory (``vsock_config``).
VSOCK_SOCKET = "vsock.sock"


#: Private vsock directories are <tmp>/popek-vsock-<pid of their VMM>-<random>.
VSOCK_DIR_PREFIX = "popek-vsock-"


def remove_stale_vsock_dirs(tmp: str | os.PathLike | None = None) -> list[Path]:
    """Remove private vsock directories (``vsock_config``) in ``tmp`` (default: the temporary directory) whose
    process is gone: a VM whose process was killed (SIGKILL) before it could remove its own. Only this user's; a
    directory whose pid is alive (or reused) is left. Returns what was removed."""
    removed = []
    for d in Path(tmp or tempfile.gettempdir()).glob(f"{VSOCK_DIR_PREFIX}*-*"):
        pid = d.name[len(VSOCK_DIR_PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or os.path.exists(f"/proc/{pid}") or d.lstat().st_uid != os.geteuid():
                continue
        except OSError:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def vsock_config(vsock) -> tuple[VsockConfig | None, Path | None]:
    """(``popek.vm.VsockConfig`` or None, the private directory made for it or None) for ``popek.VM``'s ``vsock``
    argument: True -> a socket in a new private temporary directory (mode 0700; the caller removes it), a path ->
    that socket with guest CID DEFAULT_GUEST_CID, a VsockConfig -> itself, None or False -> no vsock.

    :raises TypeError: for anything else.
    """
    if vsock is None or vsock is False:
        return None, None
    if isinstance(vsock, VsockConfig):
        return vsock, None
    if vsock is True:
        remove_stale_vsock_dirs()
        d = Path(tempfile.mkdtemp(prefix=f"{VSOCK_DIR_PREFIX}{os.getpid()}-"))
        return VsockConfig(DEFAULT_GUEST_CID, d / VSOCK_SOCKET), d
    if isinstance(vsock, (str, os.PathLike)):
        return VsockConfig(DEFAULT_GUEST_CID, Path(vsock)), None
    raise TypeError(f"vsock must be True, None, a socket path or a VsockConfig, not {vsock!r}")


def exec_in(name: str, argv: list[str], *, timeout: float = 60.0, **kwargs) -> ExecResult:
    """Run ``argv`` in the detached VM ``name`` (`popek start`; its agent is reached through
    ``<runtime dir>/vsock.sock``), waiting up to ``timeout`` seconds for the agent and again for the command.

    :raises AgentNotReady: if there is no such VM socket or its agent does not answer; as ``AgentClient.exec``.
    """
    from popek.runtime import RuntimeDir

    uds = RuntimeDir(name).vsock_socket
    if not Path(uds).exists():
        raise AgentNotReady(f"VM {name!r} has no vsock socket ({uds}): is it running?")
    client = AgentClient(uds)
    client.wait_ready(timeout)
    return client.run(argv, timeout=timeout, **kwargs)
