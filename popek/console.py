"""Host side of the serial console: terminal raw mode, a stdin reader thread, Ctrl-A escape keys, unbuffered output."""

from __future__ import annotations

import errno
import os
import select
import termios
import threading
from typing import BinaryIO, Callable


def _key_name(code: int) -> str:
    return f"Ctrl-{chr(code + 0x40)}" if code < 0x20 else repr(chr(code))


class Console:
    """Connects a host terminal (or pipe) to the guest's serial port.

    ``start()`` (or ``with Console(...)``) puts a TTY ``stdin_fd`` in raw mode (termios: no echo, no canonical
    input, no signals, no CR/LF translation or flow control on input, 8 bits; output post-processing is kept so
    "\\n" still starts a new line) and starts a thread that reads stdin and calls ``on_input(bytes)``. On a TTY
    the escape byte (default Ctrl-A) followed by ``x`` calls ``on_quit()``, by the escape byte sends one escape
    byte, by ``h`` prints help; followed by anything else, both bytes are sent. When stdin is not a TTY the bytes
    are forwarded unchanged and the thread ends at EOF. ``close()`` (or leaving the ``with``) stops the thread and
    restores the terminal settings, also when an exception is propagating. ``write`` sends guest output to
    ``stdout`` at once (no buffering); it may be called from any thread.

    :param stdin_fd: file descriptor to read input from.
    :param stdout: a file descriptor or a binary file object for guest output.
    :param escape: the one-byte escape key.
    :param on_input: called on the reader thread with each chunk of input for the guest.
    :param on_quit: called on the reader thread when the user types escape, ``x``.
    :raises ValueError: if ``escape`` is not one byte.
    """

    def __init__(self, stdin_fd: int, stdout: int | BinaryIO, escape: bytes = b"\x01", *,
                 on_input: Callable[[bytes], None] | None = None, on_quit: Callable[[], None] | None = None):
        if len(escape) != 1:
            raise ValueError(f"console escape must be one byte, got {escape!r}")
        self.stdin_fd = stdin_fd
        self.stdout = stdout
        self.escape = escape[0]
        self.on_input = on_input or (lambda data: None)
        self.on_quit = on_quit or (lambda: None)
        self.is_tty = os.isatty(stdin_fd)
        #: An exception raised while reading input or in a callback; the reader thread ended with it.
        self.error: BaseException | None = None
        self._saved: list | None = None
        self._thread: threading.Thread | None = None
        self._wake: tuple[int, int] | None = None
        self._got_escape = False
        self._closing_from_callback = False
        self._wake_lock = threading.Lock()
        self._write_lock = threading.Lock()

    def __enter__(self) -> "Console":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Enter raw mode (TTY only) and start the reader thread. :raises RuntimeError: if already started."""
        if self._thread is not None:
            raise RuntimeError("console already started")
        if self.is_tty:
            self._saved = termios.tcgetattr(self.stdin_fd)
            termios.tcsetattr(self.stdin_fd, termios.TCSANOW, _raw(self._saved))
        try:
            self._wake = os.pipe()
            self._thread = threading.Thread(target=self._run, name="popek-console", daemon=True)
            self._thread.start()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the reader thread and restore the terminal; safe to call more than once."""
        try:
            with self._wake_lock:
                if self._wake is None:
                    return
                os.write(self._wake[1], b"x")
                if self._thread is threading.current_thread():
                    self._closing_from_callback = True
                    return  # called from a callback: the thread sees the wake byte and closes the pipe itself
            if self._thread is not None:
                self._thread.join()
            self._close_wake()
        finally:
            if self._saved is not None:
                termios.tcsetattr(self.stdin_fd, termios.TCSADRAIN, self._saved)
                self._saved = None

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the reader thread to end (EOF or ``close``); True if it has ended."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def write(self, data: bytes) -> None:
        """Write guest output to stdout now. :raises OSError: if stdout cannot be written."""
        with self._write_lock:
            if isinstance(self.stdout, int):
                view = memoryview(data)
                while view:
                    view = view[os.write(self.stdout, view):]
            else:
                self.stdout.write(data)
                self.stdout.flush()

    def help_text(self) -> bytes:
        e = _key_name(self.escape)
        return (f"\r\n{e} x    quit\r\n{e} {e}  send {e}\r\n{e} h    this help\r\n").encode()

    # ---- reader thread -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                ready, _, _ = select.select([self.stdin_fd, self._wake[0]], [], [])
                if self._wake[0] in ready:
                    return
                try:
                    data = os.read(self.stdin_fd, 4096)
                except OSError as e:
                    if e.errno == errno.EIO:  # the terminal hung up (pty master closed)
                        return
                    raise
                if not data:
                    return
                self._feed(data)
        except BaseException as e:
            self.error = e
        finally:
            if self._closing_from_callback:
                self._close_wake()

    def _close_wake(self) -> None:
        with self._wake_lock:
            if self._wake is not None:
                for fd in self._wake:
                    os.close(fd)
                self._wake = None

    def _feed(self, data: bytes) -> None:
        if not self.is_tty:
            self.on_input(data)
            return
        out = bytearray()
        for b in data:
            if not self._got_escape:
                if b == self.escape:
                    self._got_escape = True
                else:
                    out.append(b)
                continue
            self._got_escape = False
            if b == ord("x"):
                if out:
                    self.on_input(bytes(out))
                    out.clear()
                self.on_quit()
            elif b == self.escape:
                out.append(b)
            elif b == ord("h"):
                self.write(self.help_text())
            else:
                out += bytes((self.escape, b))
        if out:
            self.on_input(bytes(out))


def _raw(attrs: list) -> list:
    """cfmakeraw(3) without clearing OPOST."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = attrs
    iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP | termios.INLCR | termios.IGNCR
               | termios.ICRNL | termios.IXON)
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    cc = list(cc)
    cc[termios.VMIN], cc[termios.VTIME] = 1, 0
    return [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]
