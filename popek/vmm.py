"""The VMM process of one VM: its API socket, console log and console socket, lifecycle, and vm.json state."""

from __future__ import annotations

import argparse
import json
import logging
import os
import selectors
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from popek.api.controller import Controller
from popek.api.handle import VmHandle
from popek.api.model import (ApiError, Balloon, BootSource, Drive, MachineConfiguration, NetworkInterface, VmSpec,
                             Vsock)
from popek.api.server import ApiServer
from popek.runtime import RuntimeDir
from popek.vcpu import install_kick_signal

log = logging.getLogger("popek.vmm")

#: Files the VMM keeps in its runtime directory besides runtime.py's vm.json, api.sock and console.log.
CONSOLE_SOCKET = "console.sock"
RESULT_JSON = "result.json"
VMM_LOG = "vmm.log"
#: A console client that falls this far behind the guest's output is disconnected (bytes).
MAX_CLIENT_BACKLOG = 1 << 20
#: The console log is rotated at this size: console.log becomes console.log.1 (the older .1 goes), so a chatty
#: guest costs at most twice this on the host's disk (bytes).
MAX_CONSOLE_LOG = 8 << 20
#: How often the main loop looks whether the VM has ended or a signal asked it to stop (seconds).
POLL_S = 0.2


def spec_from_json(doc: dict) -> VmSpec:
    """A ``VmSpec`` from a FullVmConfiguration JSON object (the shape of ``VmSpec.to_json``; absent keys = defaults).

    Every part is validated by its model (``Model.from_json``); host files are checked later, when the controller
    applies them. :raises ApiError: 400 for an unknown key or a part its model refuses.
    """
    if not isinstance(doc, dict):
        raise ApiError(400, "the VM spec must be a JSON object (FullVmConfiguration)")
    known = {"boot-source", "machine-config", "drives", "network-interfaces", "vsock", "balloon"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ApiError(400, f"the VM spec has unknown keys {unknown} (known: {sorted(known)})")
    spec = VmSpec()
    if doc.get("boot-source") is not None:
        spec.boot_source = BootSource.from_json(doc["boot-source"], "boot-source")
    if doc.get("machine-config") is not None:
        spec.machine_config = MachineConfiguration.from_json(doc["machine-config"], "machine-config")
    for d in doc.get("drives") or []:
        spec.set_drive(Drive.from_json(d, "drives[]"))
    for n in doc.get("network-interfaces") or []:
        spec.set_network_interface(NetworkInterface.from_json(n, "network-interfaces[]"))
    if doc.get("vsock") is not None:
        spec.vsock = Vsock.from_json(doc["vsock"], "vsock")
    if doc.get("balloon") is not None:
        spec.balloon = Balloon.from_json(doc["balloon"], "balloon")
    return spec


def spec_summary(spec: VmSpec) -> dict:
    """What vm.json's ``config`` records of a spec (for a VMM started without `popek start`): ``vcpus``,
    ``memory`` (bytes), ``kernel``, ``initrd``, ``boot_args``."""
    boot = spec.boot_source
    return {"vcpus": spec.machine_config.vcpu_count, "memory": spec.machine_config.mem_size_mib << 20,
            "kernel": boot.kernel_image_path if boot else None, "initrd": boot.initrd_path if boot else None,
            "boot_args": boot.boot_args if boot else None}


def apply_spec(controller: Controller, spec: VmSpec) -> None:
    """Put every part of ``spec`` through the controller (the checks of the PUT requests), then InstanceStart if it
    has a boot source. An empty spec (``VmSpec()``) is not applied at all, so the VMM stays fresh and can still
    take PUT /snapshot/load (`popek snapshot restore`). :raises ApiError: 400 from whichever request is refused."""
    if spec == VmSpec():
        return
    controller.put_machine_config(spec.machine_config)
    for d in spec.drives.values():
        controller.put_drive(d.drive_id, d)
    for n in spec.network_interfaces.values():
        controller.put_network_interface(n.iface_id, n)
    if spec.vsock is not None:
        controller.put_vsock(spec.vsock)
    if spec.balloon is not None:
        controller.put_balloon(spec.balloon)
    if spec.boot_source is not None:
        controller.put_boot_source(spec.boot_source)
        controller.start()


def rotated_log(path: Path) -> Path:
    """Where ``ConsoleHub`` moves a full console log: ``<path>.1``."""
    return path.with_name(path.name + ".1")


def write_result(path: Path, record: dict) -> None:
    """Write ``record`` as JSON to ``path`` atomically (temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ConsoleHub:
    """Tees guest console output to a log file and to every client of a Unix stream socket; client bytes go to the
    guest (``on_input``). The socket carries raw console bytes both ways, no framing; a client that falls more than
    ``MAX_CLIENT_BACKLOG`` bytes behind is disconnected. New clients get output from the moment they connect (the
    log has the rest). One thread serves the socket; ``output`` may be called from any thread.

    :param log_path: the console log, opened for appending (it survives the VMM: ``popek logs``); rotated to
        ``<log_path>.1`` when it reaches ``max_log`` bytes.
    :param socket_path: where to listen (mode 0600); an old file there is replaced.
    :param on_input: called on the hub's thread with each chunk a client sends.
    """

    def __init__(self, log_path: Path, socket_path: Path, on_input: Callable[[bytes], None], *,
                 max_log: int = MAX_CONSOLE_LOG):
        self.socket_path = Path(socket_path)
        self.on_input = on_input
        self.log_path, self.max_log = Path(log_path), max_log
        self._log = self._open_log()
        self._log_lock = threading.Lock()
        self._clients: dict[socket.socket, bytearray] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self.socket_path.unlink(missing_ok=True)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.socket_path))
        os.chmod(self.socket_path, 0o600)
        self._listener.listen()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="popek-console-hub", daemon=True)
        self._thread.start()

    def output(self, data: bytes) -> None:
        """Guest output: append to the log, queue for every client."""
        with self._log_lock:
            if self._log.tell() + len(data) > self.max_log and self._log.tell() > 0:
                self._log.close()
                os.replace(self.log_path, rotated_log(self.log_path))
                self._log = self._open_log()
            self._log.write(data)
        with self._lock:
            if not self._clients:
                return
            for buf in self._clients.values():
                buf += data
        self._wake()

    def _open_log(self):
        return open(os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab", buffering=0)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:  # the pipe is full: the thread is awake anyway
            pass

    def _drop(self, sel: selectors.BaseSelector, conn: socket.socket, why: str) -> None:
        log.info("console client dropped: %s", why)
        sel.unregister(conn)
        with self._lock:
            del self._clients[conn]
        conn.close()

    def _run(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._closing:
                with self._lock:
                    behind = [conn for conn, buf in self._clients.items() if len(buf) > MAX_CLIENT_BACKLOG]
                    for conn, buf in self._clients.items():
                        sel.modify(conn, selectors.EVENT_READ | (selectors.EVENT_WRITE if buf else 0))
                for conn in behind:
                    self._drop(sel, conn, f"more than {MAX_CLIENT_BACKLOG} bytes behind the guest's output")
                for key, events in sel.select():
                    if key.fileobj == self._wake_r:
                        os.read(self._wake_r, 4096)
                    elif key.fileobj is self._listener:
                        conn, _ = self._listener.accept()
                        conn.setblocking(False)
                        with self._lock:
                            self._clients[conn] = bytearray()
                        sel.register(conn, selectors.EVENT_READ)
                    else:
                        self._serve_client(sel, key.fileobj, events)
            for conn in list(self._clients):
                self._flush_and_close(conn)

    def _serve_client(self, sel: selectors.BaseSelector, conn: socket.socket, events: int) -> None:
        if events & selectors.EVENT_READ:
            try:
                data = conn.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError as e:
                return self._drop(sel, conn, str(e))
            if data == b"":
                return self._drop(sel, conn, "it disconnected")
            if data:
                self.on_input(data)
        if events & selectors.EVENT_WRITE:
            failed = None
            with self._lock:
                buf = self._clients[conn]
                try:
                    del buf[:conn.send(buf)]
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError as e:
                    failed = str(e)
            if failed:
                self._drop(sel, conn, failed)

    def _flush_and_close(self, conn: socket.socket) -> None:
        """Best effort: send what is queued (up to 1 s), then close, so a client sees the guest's last words."""
        with self._lock:
            buf = bytes(self._clients.pop(conn))
        try:
            conn.settimeout(1.0)
            conn.sendall(buf)
            conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.close()

    def close(self) -> None:
        """Stop serving: flush and disconnect the clients, remove the socket file, close the log. Idempotent."""
        if self._closing:
            return
        self._closing = True
        self._wake()
        self._thread.join()
        self._listener.close()
        self.socket_path.unlink(missing_ok=True)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._log.close()


def serve(name: str, spec: VmSpec | None, runtime_dir: RuntimeDir, *,
          vm_factory: Callable[..., VmHandle] = VmHandle, owned: bool = False) -> int:
    """Run the VMM of VM ``name`` until its VM ends or SIGTERM/SIGINT; return the process exit status.

    - vm.json: if ``runtime_dir`` is not already owned by this process (``popek start`` creates it for the VMM's
      pid), it is created (``RuntimeDir.create``). Its ``state`` follows the VM: "starting", "created" (API up,
      waiting for PUT /actions InstanceStart), "running", "paused", "stopped".
    - The API (``popek.api.server``) on ``api.sock``; the console tee (:class:`ConsoleHub`) to ``console.log`` and
      to clients of ``console.sock``.
    - ``spec`` is applied through the controller's PUT checks; with a boot source the VM starts at once.
    - SIGTERM or SIGINT stops the VM cleanly: the vCPUs are stopped and joined and guest memory and KVM file
      descriptors are released (the VM has no disks whose caches need flushing: the handle refuses drives).
      SIGHUP is ignored (the VMM has no terminal).
    - When the VM has ended (its command exited, reset, panic, stop) the VMM writes ``result.json`` (``reason``,
      ``exit_status``, ``detail``, ``ended`` Unix time), sets state "stopped", removes both sockets and exits.
      vm.json, result.json, console.log and vmm.log stay for ``popek ps``/``popek logs`` until ``popek rm``; the
      VM's cgroup (which this process is in and so cannot remove) is removed then too.
    - A VM loaded from a snapshot (PUT /snapshot/load) with a vsock device gets its socket at ``vsock.sock`` in
      this runtime directory, not the saved VM's path, so clones of one snapshot do not collide.

    :param vm_factory: builds the handle from the spec (tests pass a fake); called with ``on_output``/``on_state``.
    :param owned: ``runtime_dir`` was made for this process by its spawner even though vm.json's pid is not
        ``os.getpid()`` (a jailed VMM: vm.json has its host pid, it is pid 1 of its own PID namespace).
    :returns: 0 once the VM was started and has ended or was stopped (also when stopped before any start), 1 if
        the spec could not be applied or the VM not started (the reason is logged and in result.json).
    """
    install_kick_signal()  # the VM may be built on the API thread; signal handlers can only be set from this one
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    entry = runtime_dir.read()
    rd = runtime_dir
    if not owned and (entry.pid != os.getpid() or not entry.alive):
        rd = RuntimeDir.create(name, spec_summary(spec or VmSpec()), base=runtime_dir.base)
    controller: Controller | None = None
    hub = ConsoleHub(rd.console_log, rd.path / CONSOLE_SOCKET,
                     on_input=lambda data: controller.vm is not None and controller.vm.vm.send_input(data))
    controller = Controller(lambda s: vm_factory(s, on_output=hub.output, on_state=rd.set_state,
                                                 vsock_uds=rd.vsock_socket), instance_id=name)
    server = ApiServer(rd.api_socket, controller)
    status, result = 0, None
    try:
        server.start()
        try:
            apply_spec(controller, spec or VmSpec())
        except ApiError as e:
            log.error("cannot start VM %s: %s", name, e.message)
            status, result = 1, {"reason": "error", "exit_status": None, "detail": e.message}
        if controller.vm is None and status == 0:
            rd.set_state("created")
        log.info("VMM of %s serving on %s (pid %d)", name, rd.api_socket, os.getpid())
        while status == 0 and not stop.is_set():
            handle = controller.vm
            if handle is not None and handle.wait(0) is not None:
                break
            stop.wait(POLL_S)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        controller.shutdown()
        handle = controller.vm
        if handle is not None and handle.result is not None:
            r = handle.result
            result = {"reason": r.reason, "exit_status": r.exit_status, "detail": r.detail}
        elif result is None:
            result = {"reason": "stopped", "exit_status": None, "detail": "the VMM was stopped before the VM started"}
        log.info("VM %s ended: %s", name, result)
        server.close()
        hub.close()
        write_result(rd.path / RESULT_JSON, {**result, "ended": time.time()})
        rd.set_state("stopped")
    return status


def main(argv: list[str] | None = None, *, prepare: Callable[[VmSpec, RuntimeDir], None] | None = None) -> int:
    """``python -m popek.vmm --name NAME [--base DIR] [--spec FILE | --spec-stdin]``.

    With ``--spec-stdin`` (what ``popek start`` uses) the VMM first reads one JSON object from stdin, ``{"spec":
    FullVmConfiguration}``, until EOF: the spawner closes stdin only once the runtime directory and cgroup exist
    and this process is inside the cgroup, so no guest memory is charged elsewhere. Then stdout/stderr are
    redirected to ``vmm.log`` in the runtime directory and :func:`serve` runs.

    ``prepare(spec, runtime_dir)`` (``popek.jail``) runs after that redirection and before serving; a VMM with a
    prepare step serves the runtime directory its spawner made for it (``serve``'s ``owned``).
    """
    p = argparse.ArgumentParser(prog="python -m popek.vmm", description="Run the VMM of one Popek VM.")
    p.add_argument("--name", required=True, help="the VM name (popek.runtime.validate_name)")
    p.add_argument("--base", default=None, help="runtime base directory (default: popek.runtime.default_base)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--spec", default=None, help="FullVmConfiguration JSON file; none: wait for the API")
    group.add_argument("--spec-stdin", action="store_true", help="read {\"spec\": ...} from stdin until EOF")
    args = p.parse_args(argv)
    try:
        rd = RuntimeDir(args.name, args.base)
        if args.spec_stdin:
            raw = sys.stdin.buffer.read()
            if not raw:
                print("popek.vmm: stdin closed before a spec arrived (the spawner gave up)", file=sys.stderr)
                return 1
            doc = json.loads(raw)["spec"]
        else:
            doc = json.loads(Path(args.spec).read_text()) if args.spec else {}
        spec = spec_from_json(doc)
    except (ValueError, KeyError, TypeError, OSError) as e:
        print(f"popek.vmm: bad spec: {e}", file=sys.stderr)
        return 2
    except ApiError as e:
        print(f"popek.vmm: bad spec: {e.message}", file=sys.stderr)
        return 2
    if args.spec_stdin and rd.path.is_dir():  # popek start made it: from now on nobody reads our stderr pipe
        fd = os.open(rd.path / VMM_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        for target in (1, 2):
            os.dup2(fd, target)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if prepare is not None:
        prepare(spec, rd)
    return serve(args.name, spec, rd, owned=prepare is not None)


if __name__ == "__main__":
    sys.exit(main())
