"""Line dialogue with a serial console socket (a detached VM's console.sock, any Unix socket of console bytes)."""

from __future__ import annotations

import os
import socket
import time

#: Seconds between re-sending the line: a shell that was not reading yet (still booting, just restored) gets it again.
RESEND_S = 3.0


def ask(sock_path: str | os.PathLike, line: str, expect: str, timeout: float) -> str:
    """Connect to the console socket ``sock_path`` (waiting for it to exist and accept), type ``line`` and a newline
    every ``RESEND_S`` s until ``expect`` appears in what the console prints, within ``timeout`` seconds.

    :returns: everything the console printed meanwhile (UTF-8, errors replaced).
    :raises TimeoutError: naming the socket and the last console bytes, if ``expect`` does not come back (or the
        socket never accepts, or closes first).
    """
    deadline = time.monotonic() + timeout
    seen = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        while True:
            try:
                s.connect(os.fspath(sock_path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"console socket {sock_path} never accepted a connection") from None
                time.sleep(0.02)
        s.settimeout(0.05)
        next_send = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() >= next_send:
                s.sendall(line.encode() + b"\n")
                next_send = time.monotonic() + RESEND_S
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                break
            seen += chunk
            if expect.encode() in seen:
                return seen.decode(errors="replace")
    raise TimeoutError(f"{expect!r} did not come back from console {sock_path} in {timeout:g} s: {seen[-300:]!r}")
