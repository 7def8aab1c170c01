"""popek.consoleline.ask: types a line at a console socket until the expected answer comes, re-sending it to a shell
that was not reading yet; times out naming the socket and what the console printed."""

import socket
import threading

import pytest

from popek import consoleline


def serve(path, answer_on: int, reply: bytes):
    """A console that ignores the first ``answer_on - 1`` lines it gets, then prints ``reply``."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen()
    got = []

    def run():
        conn, _ = srv.accept()
        with conn:
            buf = b""
            while (data := conn.recv(4096)):
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    got.append(line)
                    conn.sendall(b"$ " + line + b"\r\n" + (reply if len(got) == answer_on else b""))
        srv.close()

    threading.Thread(target=run, daemon=True).start()
    return got


def test_a_line_is_sent_again_until_the_answer_comes(tmp_path, monkeypatch):
    monkeypatch.setattr(consoleline, "RESEND_S", 0.05)
    got = serve(tmp_path / "c.sock", 3, b"answer-42\r\n")
    out = consoleline.ask(tmp_path / "c.sock", "echo answer-$((6*7))", "answer-42", 5)
    assert got == [b"echo answer-$((6*7))"] * 3 and out.endswith("answer-42\r\n")


def test_no_answer_times_out_with_what_the_console_printed(tmp_path, monkeypatch):
    monkeypatch.setattr(consoleline, "RESEND_S", 0.05)
    serve(tmp_path / "c.sock", 10**6, b"")
    with pytest.raises(TimeoutError, match=r"'never' did not come back from console .*c\.sock.*\$ true"):
        consoleline.ask(tmp_path / "c.sock", "true", "never", 0.3)


def test_a_socket_nobody_listens_on_times_out(tmp_path):
    with pytest.raises(TimeoutError, match="never accepted"):
        consoleline.ask(tmp_path / "none.sock", "true", "x", 0.1)
