"""The HTTP/1.1 server of the API on a Unix socket: routing, body limits, error bodies, and the OpenAPI document."""

from __future__ import annotations

import http
import importlib.resources
import json
import logging
import os
import re
import selectors
import socket
import socketserver
import stat
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Callable

from popek.api.controller import Controller, vmm_version
from popek.api.model import (ID_PATTERN, MODELS, SCHEMA_REF, ApiError, Balloon, BalloonStatsUpdate, BalloonUpdate,
                             BootSource, Drive, InstanceActionInfo, MachineConfiguration, Model, NetworkInterface,
                             SnapshotCreateParams, SnapshotLoadParams, Vm, VmSpec, Vsock)

log = logging.getLogger(__name__)

#: Largest request body accepted; larger ones get 413.
MAX_BODY = 64 * 1024
#: A too-large body up to this size is read and dropped, so the client (still sending it) gets the 413 and the
#: connection stays usable; beyond it the connection is closed.
_DRAIN_LIMIT = 16 << 20
OPENAPI_FILE = Path(__file__).with_name("openapi.json")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class ApiServerError(RuntimeError):
    """The server cannot start: the socket path is taken (a live server, or not a socket) or cannot be bound."""


@dataclass(frozen=True)
class Route:
    """One endpoint: ``method`` and ``path`` (``{name}`` segments are path parameters), the request body model
    (None: no body), the 200 response schema (None: 204 No Content) and ``call(server, params, body)``."""

    method: str
    path: str
    operation_id: str
    summary: str
    body: type[Model] | None
    response: dict | None
    call: Callable[["ApiServer", dict[str, str], Any], Any]
    regex: re.Pattern = field(init=False, compare=False)

    def __post_init__(self):
        parts = re.split(r"\{(\w+)\}", self.path)  # literal, name, literal, name, ...
        pattern = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^/]+)" for i, p in enumerate(parts))
        object.__setattr__(self, "regex", re.compile(pattern))

    @property
    def params(self) -> list[str]:
        return re.findall(r"\{(\w+)\}", self.path)


def _ref(name: str) -> dict:
    return {"$ref": SCHEMA_REF + name}


#: The endpoints, with Firecracker's paths and operationIds (swagger/firecracker.yaml).
ROUTES = (
    Route("GET", "/", "describeInstance", "Returns general information about the instance.", None,
          _ref("InstanceInfo"), lambda s, p, b: s.controller.instance_info()),
    Route("GET", "/openapi.json", "getOpenApiDocument", "Returns this OpenAPI document.", None,
          {"type": "object"}, lambda s, p, b: s.openapi_bytes),
    Route("PUT", "/actions", "createSyncAction", "Creates a synchronous action.", InstanceActionInfo, None,
          lambda s, p, b: s.controller.action(b)),
    Route("PUT", "/boot-source", "putGuestBootSource", "Creates or updates the boot source. Pre-boot only.",
          BootSource, None, lambda s, p, b: s.controller.put_boot_source(b)),
    Route("GET", "/machine-config", "getMachineConfiguration", "Gets the machine configuration of the VM.", None,
          _ref("MachineConfiguration"), lambda s, p, b: s.controller.machine_config()),
    Route("PUT", "/machine-config", "putMachineConfiguration", "Updates the machine configuration. Pre-boot only.",
          MachineConfiguration, None, lambda s, p, b: s.controller.put_machine_config(b)),
    Route("PUT", "/drives/{drive_id}", "putGuestDriveByID", "Creates or updates a drive. Pre-boot only.", Drive,
          None, lambda s, p, b: s.controller.put_drive(p["drive_id"], b)),
    Route("PUT", "/network-interfaces/{iface_id}", "putGuestNetworkInterfaceByID",
          "Creates or updates a network interface. Pre-boot only.", NetworkInterface, None,
          lambda s, p, b: s.controller.put_network_interface(p["iface_id"], b)),
    Route("PUT", "/vsock", "putGuestVsock", "Creates or updates the vsock device. Pre-boot only.", Vsock, None,
          lambda s, p, b: s.controller.put_vsock(b)),
    Route("PUT", "/balloon", "putBalloon", "Creates or updates the balloon device. Pre-boot only.", Balloon, None,
          lambda s, p, b: s.controller.put_balloon(b)),
    Route("GET", "/balloon", "describeBalloonConfig", "Returns the balloon device's configuration.", None,
          _ref("Balloon"), lambda s, p, b: s.controller.balloon()),
    Route("PATCH", "/balloon", "patchBalloon", "Sets the balloon's target size, before or after start.",
          BalloonUpdate, None, lambda s, p, b: s.controller.patch_balloon(b)),
    Route("GET", "/balloon/statistics", "describeBalloonStats", "Returns the balloon's latest statistics. "
          "Post-boot only, with a polling interval set.", None, _ref("BalloonStats"),
          lambda s, p, b: s.controller.balloon_stats()),
    Route("PATCH", "/balloon/statistics", "patchBalloonStatsInterval", "Sets the statistics polling interval, "
          "before or after start.", BalloonStatsUpdate, None, lambda s, p, b: s.controller.patch_balloon_stats(b)),
    Route("PATCH", "/vm", "patchVm", "Pauses or resumes the microVM.", Vm, None,
          lambda s, p, b: s.controller.patch_vm(b)),
    Route("GET", "/vm/config", "getExportVmConfig", "Gets the full VM configuration.", None,
          _ref("FullVmConfiguration"), lambda s, p, b: s.controller.vm_config()),
    Route("PUT", "/snapshot/create", "createSnapshot", "Creates a full or diff snapshot. Post-boot only; the "
          "microVM must be Paused.", SnapshotCreateParams, None, lambda s, p, b: s.controller.snapshot_create(b)),
    Route("PUT", "/snapshot/load", "loadSnapshot", "Loads a snapshot. Pre-boot only, on a fresh VMM.",
          SnapshotLoadParams, None, lambda s, p, b: s.controller.snapshot_load(b)),
)


def openapi_document() -> dict:
    """The OpenAPI 3.0 document of :data:`ROUTES` and the models' schemas (what ``openapi.json`` must hold)."""
    error = {"description": "Error", "content": {"application/json": {"schema": _ref("Error")}}}
    paths: dict[str, dict] = {}
    for r in ROUTES:
        op: dict[str, Any] = {"summary": r.summary, "operationId": r.operation_id}
        if r.params:
            op["parameters"] = [{"name": n, "in": "path", "required": True, "description": f"The resource's {n}.",
                                 "schema": {"type": "string", "pattern": ID_PATTERN}} for n in r.params]
        if r.body is not None:
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": _ref(r.body.__name__)}}}
        if r.response is not None:
            ok = {"200": {"description": "OK", "content": {"application/json": {"schema": r.response}}}}
        else:
            ok = {"204": {"description": "Done"}}
        op["responses"] = {**ok, "400": {**error, "description": "Bad input or wrong state"}, "default": error}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    schemas = {name: model.schema() for name, model in MODELS.items()}
    schemas["FullVmConfiguration"] = VmSpec.schema()
    schemas["Error"] = {"type": "object", "required": ["fault_message"],
                        "properties": {"fault_message": {"type": "string",
                                                         "description": "What is wrong, on one line."}}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "Popek API", "version": vmm_version(),
                 "description": "The Popek VMM's control API: HTTP/1.1 with JSON bodies on a Unix socket, with "
                                "Firecracker's resource names. Errors are {\"fault_message\": ...}."},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def write_openapi_file(path: str | Path = OPENAPI_FILE) -> None:
    """Regenerate ``openapi.json`` from :func:`openapi_document` (run after changing routes or models)."""
    Path(path).write_text(json.dumps(openapi_document(), indent=2) + "\n")


class _MethodNotAllowed(ApiError):
    def __init__(self, method: str, path: str, allow: list[str]):
        super().__init__(405, f"{method} is not allowed on {path} (allowed: {', '.join(allow)})")
        self.allow = allow


class _Handler(BaseHTTPRequestHandler):
    """One connection: HTTP/1.1 keep-alive, Content-Length bodies; every request method goes to ``_handle``."""

    protocol_version = "HTTP/1.1"
    server_version = "Popek"
    sys_version = ""

    def __getattr__(self, name: str):
        if name.startswith("do_"):  # any method: routing answers 404/405, never the base class's HTML 501
            return self._handle
        raise AttributeError(name)

    def _handle(self) -> None:
        api: ApiServer = self.server.api
        headers: dict[str, str] = {}
        try:
            status, payload = api.dispatch(self.command, self.path, self._read_body(api.max_body))
        except ApiError as e:
            status, payload = e.status, {"fault_message": e.message}
            if isinstance(e, _MethodNotAllowed):
                headers["Allow"] = ", ".join(e.allow)
        except Exception as e:
            log.exception("API request %s %s failed", self.command, self.path)
            status, payload = 500, {"fault_message": f"internal error: {type(e).__name__}: {_one_line(e)}"}
        self._reply(status, payload, headers)

    def _read_body(self, limit: int) -> bytes:
        if "Transfer-Encoding" in self.headers:
            self.close_connection = True
            raise ApiError(400, "Transfer-Encoding bodies are not supported; send the body with a Content-Length")
        values = set(self.headers.get_all("Content-Length") or [])
        if not values:
            return b""
        text = values.pop().strip()
        if values or not (text.isascii() and text.isdigit() and len(text) <= 18):
            self.close_connection = True
            raise ApiError(400, "the Content-Length header is not one non-negative integer")
        n = int(text)
        if n > limit:
            if n <= _DRAIN_LIMIT:
                while n > 0 and (chunk := self.rfile.read(min(n, 1 << 16))):
                    n -= len(chunk)
            else:
                self.close_connection = True
            raise ApiError(413, f"the request body is {text} bytes; the limit is {limit}")
        data = self.rfile.read(n)
        if len(data) < n:
            self.close_connection = True
            raise ApiError(400, f"the request body ended after {len(data)} of {n} bytes")
        return data

    def _reply(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = payload if isinstance(payload, bytes) else b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if status != 204:
            if data:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if data and self.command != "HEAD":
            self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's protocol errors (bad request line, headers too long...) as JSON fault_message bodies."""
        if self.request_version == "HTTP/0.9":  # an unparsable request line: still answer with status and headers
            self.request_version = "HTTP/1.0"
        self._reply(code, {"fault_message": message or http.HTTPStatus(code).phrase})

    def log_message(self, format: str, *args) -> None:  # the base class would print to stderr
        log.debug("api: " + format, *args)


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False
    timeout = 0  # handle_request() is called once the socket is readable: never wait in it
    request_queue_size = socket.SOMAXCONN  # listen() backlog; socketserver's 5 refuses bursts of clients (EAGAIN)

    def __init__(self, path: str, api: "ApiServer"):
        self.api = api
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(path, _Handler)

    def finish_request(self, request, client_address) -> None:
        with self.connections_lock:
            self.connections.add(request)
        try:
            super().finish_request(request, client_address)
        finally:
            with self.connections_lock:
                self.connections.discard(request)

    def handle_error(self, request, client_address) -> None:  # a connection that broke (client went away...)
        log.debug("API connection ended with an error", exc_info=True)


def _claim_socket_path(path: str) -> None:
    """Remove a stale socket file at ``path``. :raises ApiServerError: if a server answers there or it is no socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ApiServerError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing the stale API socket %s", path)
        os.unlink(path)
        return
    except OSError as e:
        raise ApiServerError(f"cannot tell whether a server answers on {path}: {e}") from e
    finally:
        probe.close()
    raise ApiServerError(f"another server is answering on {path}; stop it or use another socket path")


class ApiServer:
    """Serves the API for ``controller`` on the Unix socket ``socket_path`` (HTTP/1.1, JSON bodies).

    Answers: 200 with JSON for GET, 204 No Content for a successful PUT/PATCH, else ``{"fault_message": "..."}``
    with 400 (bad body or wrong state), 404 (no such resource), 405 (method not allowed, with Allow), 413 (body over
    ``max_body`` bytes) or 500 (an unexpected exception, logged with its traceback; the client gets one line).
    The socket file is created with mode 0600.

    :param openapi_path: the document served at GET /openapi.json (default: the packaged ``openapi.json``).
    """

    def __init__(self, socket_path: str | Path, controller: Controller, *, max_body: int = MAX_BODY,
                 openapi_path: str | Path | None = None):
        self.socket_path = str(socket_path)
        self.controller = controller
        self.max_body = max_body
        if openapi_path is None:
            self.openapi_bytes = importlib.resources.files("popek.api").joinpath("openapi.json").read_bytes()
        else:
            self.openapi_bytes = Path(openapi_path).read_bytes()
        self._server: _UnixServer | None = None
        self._thread: threading.Thread | None = None
        self._inode: int | None = None

    def start(self) -> "ApiServer":
        """Bind the socket (replacing a stale socket file) and serve in a background thread.

        :raises ApiServerError: if already started, a server answers at the path, the path is not a socket, or it
            cannot be bound (e.g. longer than sun_path's 107 bytes).
        """
        if self._server is not None:
            raise ApiServerError(f"the API server on {self.socket_path} is already started")
        _claim_socket_path(self.socket_path)
        try:
            server = _UnixServer(self.socket_path, self)
            os.chmod(self.socket_path, 0o600)
        except OSError as e:
            raise ApiServerError(f"cannot serve the API on {self.socket_path}: {e}") from e
        self._inode = os.stat(self.socket_path).st_ino
        self._server = server
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, args=(server,), name="popek-api", daemon=True)
        self._thread.start()
        return self

    def _serve(self, server: _UnixServer) -> None:
        """Accept connections until ``close`` writes to the wake pipe (no polling interval to wait out)."""
        with selectors.DefaultSelector() as sel:
            sel.register(server.socket, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select():
                    if key.fileobj == self._wake_r:
                        return
                    server.handle_request()  # readable: accepts without blocking, hands off to a thread

    def close(self) -> None:
        """Stop serving, close open connections and remove the socket file (if it is still ours). Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        os.write(self._wake_w, b"x")
        self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)
        server.server_close()
        with server.connections_lock:
            for conn in list(server.connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        try:
            if os.stat(self.socket_path).st_ino == self._inode:
                os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    def dispatch(self, method: str, target: str, body: bytes) -> tuple[int, Any]:
        """Route one request: (status, JSON-able payload, raw bytes, or None for 204).

        :raises ApiError: 404 no route matches the path, 405 none for this method, 400 bad body (empty where one is
            needed, a body on GET, not JSON, or refused by the model or the controller).
        """
        path = urllib.parse.urlsplit(target).path or "/"
        matches = [(r, m) for r in ROUTES if (m := r.regex.fullmatch(path))]
        if not matches:
            raise ApiError(404, f"there is no resource at {path}")
        found = next(((r, m) for r, m in matches if r.method == method), None)
        if found is None:
            raise _MethodNotAllowed(method, path, sorted({r.method for r, _ in matches}))
        route, match = found
        params = {k: urllib.parse.unquote(v) for k, v in match.groupdict().items()}
        model = None
        if route.body is None:
            if body:
                raise ApiError(400, f"{method} {route.path} takes no request body")
        else:
            if not body:
                raise ApiError(400, f"{method} {route.path} needs a JSON body ({route.body.__name__})")
            try:
                obj = json.loads(body)
            except (ValueError, RecursionError) as e:
                raise ApiError(400, f"the request body is not valid JSON: {_one_line(e)}") from None
            model = route.body.from_json(obj)
        result = route.call(self, params, model)
        return (200, result) if route.response is not None else (204, None)

    def __enter__(self) -> "ApiServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
