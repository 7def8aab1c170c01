"""A small client of the API on its Unix socket (what the CLI uses to drive a running Popek VMM)."""

from __future__ import annotations

import http.client
import json
import socket
import time
from pathlib import Path
from typing import Any


class ApiClientError(OSError):
    """The API could not be reached, or answered something that is not HTTP with a JSON (or empty) body."""


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float | None):
        super().__init__("localhost", timeout=timeout)
        self._socket_path = socket_path

    def connect(self) -> None:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self._socket_path)
                break
            except BlockingIOError:  # the server's listen backlog is full (EAGAIN): wait for it to accept
                sock.close()
                if deadline is not None and time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
            except OSError:
                sock.close()
                raise
        self.sock = sock


class ApiClient:
    """HTTP/1.1 requests to the API at ``socket_path`` over one keep-alive connection (reopened when needed).

    Each call returns ``(status, json)``: the HTTP status and the decoded JSON body, or None for an empty body (204).
    Not thread-safe: use one client per thread.

    :param timeout: seconds to wait for connecting and for each answer (None: forever).
    """

    def __init__(self, socket_path: str | Path, *, timeout: float | None = 30.0):
        self.socket_path = str(socket_path)
        self._conn = _UnixHTTPConnection(self.socket_path, timeout)

    def get(self, path: str) -> tuple[int, Any]:
        """GET ``path`` (e.g. "/", "/vm/config")."""
        return self.request("GET", path)

    def put(self, path: str, body: Any) -> tuple[int, Any]:
        """PUT ``path`` with ``body`` encoded as JSON (e.g. ``put("/actions", {"action_type": "InstanceStart"})``)."""
        return self.request("PUT", path, body)

    def patch(self, path: str, body: Any) -> tuple[int, Any]:
        """PATCH ``path`` with ``body`` encoded as JSON (e.g. ``patch("/vm", {"state": "Paused"})``)."""
        return self.request("PATCH", path, body)

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Send one request. ``body``: None for none, ``bytes`` sent as they are, anything else encoded as JSON.

        :raises ApiClientError: if the socket cannot be reached or the answer is not JSON.
        """
        data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            try:
                self._conn.request(method, path, body=data, headers=headers)
                response = self._conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._conn.close()  # the server closed the kept-alive connection: try once on a new one
                self._conn.request(method, path, body=data, headers=headers)
                response = self._conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as e:
            self._conn.close()
            raise ApiClientError(f"{method} {path} on {self.socket_path}: {e}") from e
        if not raw:
            return response.status, None
        try:
            return response.status, json.loads(raw)
        except ValueError as e:
            raise ApiClientError(f"{method} {path}: the answer ({response.status}) is not JSON: {e}") from e

    def close(self) -> None:
        """Close the connection (the next request opens a new one)."""
        self._conn.close()

    def __enter__(self) -> "ApiClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
