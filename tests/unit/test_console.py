"""Host console: raw mode on a pty and its restoration, Ctrl-A escapes, forwarding from a pipe until EOF, output."""

import io
import os
import termios
import threading
import time

import pytest

from popek.console import Console


class Sink:
    """Collects on_input chunks; wait_for() blocks until the joined input equals what is expected."""

    def __init__(self):
        self.data = bytearray()
        self.cond = threading.Condition()
        self.quit = threading.Event()

    def on_input(self, data):
        with self.cond:
            self.data += data
            self.cond.notify_all()

    def wait_for(self, expected, timeout=5.0):
        with self.cond:
            self.cond.wait_for(lambda: bytes(self.data) == expected or len(self.data) > len(expected), timeout)
            return bytes(self.data)


@pytest.fixture
def pty():
    master, slave = os.openpty()
    yield master, slave
    os.close(master)
    os.close(slave)


def test_raw_mode_is_set_while_open_and_restored_after(pty):
    master, slave = pty
    before = termios.tcgetattr(slave)
    with Console(slave, io.BytesIO()) as c:
        assert c.is_tty
        lflag = termios.tcgetattr(slave)[3]
        assert lflag & (termios.ICANON | termios.ECHO | termios.ISIG) == 0
        assert termios.tcgetattr(slave)[1] & termios.OPOST  # output post-processing kept
    assert termios.tcgetattr(slave) == before


def test_terminal_is_restored_when_an_exception_leaves_the_with_block(pty):
    master, slave = pty
    before = termios.tcgetattr(slave)
    with pytest.raises(RuntimeError, match="boom"):
        with Console(slave, io.BytesIO()):
            raise RuntimeError("boom")
    assert termios.tcgetattr(slave) == before


def test_escape_escape_sends_one_escape_unknown_keys_pass_and_escape_x_quits(pty):
    master, slave = pty
    sink = Sink()
    with Console(slave, io.BytesIO(), on_input=sink.on_input, on_quit=sink.quit.set):
        os.write(master, b"ab\x01\x01c\x01zd\x03\r")
        assert sink.wait_for(b"ab\x01c\x01zd\x03\r") == b"ab\x01c\x01zd\x03\r"  # Ctrl-C and CR untranslated
        assert not sink.quit.is_set()
        os.write(master, b"\x01x")
        assert sink.quit.wait(5)
    assert sink.data == b"ab\x01c\x01zd\x03\r"


def test_escape_split_across_reads_still_quits(pty):
    master, slave = pty
    sink = Sink()
    with Console(slave, io.BytesIO(), on_input=sink.on_input, on_quit=sink.quit.set):
        os.write(master, b"q\x01")
        assert sink.wait_for(b"q") == b"q"
        time.sleep(0.05)
        os.write(master, b"x")
        assert sink.quit.wait(5)
    assert sink.data == b"q"


def test_escape_h_prints_help_and_sends_nothing(pty):
    master, slave = pty
    sink, out = Sink(), io.BytesIO()
    with Console(slave, out, on_input=sink.on_input, on_quit=sink.quit.set):
        os.write(master, b"\x01h!")
        assert sink.wait_for(b"!") == b"!"
    assert b"Ctrl-A x" in out.getvalue() and b"quit" in out.getvalue()


def test_other_escape_byte_is_honoured(pty):
    master, slave = pty
    sink = Sink()
    with Console(slave, io.BytesIO(), escape=b"\x1d", on_input=sink.on_input, on_quit=sink.quit.set):
        os.write(master, b"\x01x\x1dx")
        assert sink.quit.wait(5)
    assert sink.data == b"\x01x"


def test_quit_callback_may_close_the_console_from_the_reader_thread(pty):
    master, slave = pty
    before = termios.tcgetattr(slave)
    c = Console(slave, io.BytesIO())
    c.on_quit = c.close
    c.start()
    os.write(master, b"\x01x")
    assert c.join(5)
    assert c.error is None
    assert termios.tcgetattr(slave) == before
    c.close()


def test_pipe_input_is_forwarded_verbatim_without_escapes_until_eof():
    r, w = os.pipe()
    sink = Sink()
    c = Console(r, io.BytesIO(), on_input=sink.on_input, on_quit=sink.quit.set)
    assert not c.is_tty
    c.start()
    os.write(w, b"echo hi\n\x01x\x01\x01")
    os.close(w)
    assert c.join(5)  # ended by itself at EOF
    c.close()
    os.close(r)
    assert sink.data == b"echo hi\n\x01x\x01\x01"
    assert not sink.quit.is_set()
    assert c.error is None


def test_write_goes_straight_to_an_fd_or_a_file_object():
    r, w = os.pipe()
    c = Console(r, w)
    c.write(b"guest says hi")
    assert os.read(r, 100) == b"guest says hi"
    buf = io.BytesIO()
    Console(r, buf).write(b"\r\nok")
    assert buf.getvalue() == b"\r\nok"
    os.close(r)
    os.close(w)


def test_escape_must_be_one_byte():
    with pytest.raises(ValueError, match="one byte"):
        Console(0, io.BytesIO(), escape=b"\x01\x02")
