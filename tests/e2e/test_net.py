"""End to end, virtio-net over taps with the microvm guest: the guest configures its interfaces from popek.net=
(explicit addresses and a default /30), fetches a file over TCP from an HTTP server on the tap's host address with
a matching sha256, and every tap is gone after the VM ends, and after its detached VMM is killed with SIGKILL (with
a drive attached through `popek start`'s API spec). Two boots, ~30-60 s each here: run with ``--run-slow``."""

from __future__ import annotations

import functools
import hashlib
import http.server
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid

import pytest

from test_many_vms import BOOT_TIMEOUT, POPEK, host, wait_dead  # noqa: F401  (the `host` fixture)
from test_virtio import TIMEOUT, sections

pytestmark = pytest.mark.slow

MiB = 1 << 20
#: RFC 2544's benchmarking range: on no real network.
HOST_ADDR = "198.18.20.1/30"
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)  # bind to an address before its tap exists (ip(7))
TAP_LINE = re.compile(r"^popek: tap (\S+) (\S+) <-> guest (\S+) \((\S+)\)$", re.MULTILINE)


def link_exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


def links_with_address(ip: str) -> list[str]:
    out = json.loads(subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True, check=True).stdout)
    return [link["ifname"] for link in out if any(a.get("local") == ip for a in link.get("addr_info", []))]


class FreebindServer(http.server.ThreadingHTTPServer):
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        super().server_bind()


@pytest.fixture
def blob_server(tmp_path):
    """An HTTP server on HOST_ADDR's address (bound before the tap exists) serving ``blob``: 4 MiB of random bytes."""
    blob = os.urandom(4 * MiB)
    (tmp_path / "blob").write_bytes(blob)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = FreebindServer((str(ipaddress.IPv4Interface(HOST_ADDR).ip), 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], hashlib.sha256(blob).hexdigest()
    server.shutdown()
    server.server_close()


def test_guest_configures_its_interfaces_fetches_a_file_from_the_tap_host_and_the_taps_go_with_the_vm(blob_server):
    port, sha = blob_server
    tap = f"pkn{uuid.uuid4().hex[:8]}"
    host_ip = str(ipaddress.IPv4Interface(HOST_ADDR).ip)
    script = (f'echo "== addr =="; ip -o -4 addr show | grep -v " lo "; echo "== route =="; ip route; '
              f'echo "== sha =="; wget -q -O - http://{host_ip}:{port}/blob | sha256sum; echo "== end =="')
    proc = subprocess.Popen([*POPEK, "run", "--net",
                             f"tap={tap},host={HOST_ADDR},mac=02:00:00:00:20:01", "--net", "--", "sh", "-c",
                             script], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while not link_exists(tap) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert link_exists(tap), "the explicit tap was not created before the guest ran"
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    taps = TAP_LINE.findall(err)
    assert [t[0] for t in taps][0] == tap and len(taps) == 2, err
    (_, _, guest0, mac0), (tap1, host1, guest1, _) = taps
    assert mac0 == "02:00:00:00:20:01" and guest0 == "198.18.20.2/30"
    assert ipaddress.IPv4Interface(host1).network.subnet_of(ipaddress.IPv4Network("172.30.0.0/16"))
    s = sections(out)
    assert f"inet {guest0}" in s["addr"] and f"inet {guest1}" in s["addr"], s["addr"]
    assert s["route"].startswith(f"default via {host_ip}"), s["route"]
    assert s["sha"].split()[0] == sha
    for name in (tap, tap1):
        assert not link_exists(name), f"tap {name} outlived the VM"
    assert not links_with_address(str(ipaddress.IPv4Interface(host1).ip))


def test_detached_vm_gets_its_net_and_drive_through_the_api_and_sigkill_of_its_vmm_removes_the_tap(host, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"popek-net-e2e".ljust(1 << 20, b"\0"))
    name = host.name("net")
    host.run("run", "-d", "--name", name, "--net", "--drive", f"path={disk},readonly=on", "--", "sh", "-c",
             'echo "serial=$(cat /sys/block/vda/serial)"; head -c 13 /dev/vda; echo; ip -o -4 addr show; '
             'echo net-ready; sleep 600', timeout=BOOT_TIMEOUT)
    info = json.loads((host.vm_dir(name) / "vm.json").read_text())
    [net] = info["config"]["nets"]
    host_ip, guest = str(ipaddress.IPv4Interface(net["host"]).ip), net["guest"]
    log = host.wait_log(name, "net-ready")
    assert "serial=drive0" in log and "popek-net-e2e" in log and f"inet {guest}" in log, log[-2000:]
    [tap] = links_with_address(host_ip)
    assert tap.startswith("popek")
    pid, start = host.vmm(name)
    os.kill(pid, signal.SIGKILL)
    wait_dead(pid, start)
    deadline = time.monotonic() + 10
    while link_exists(tap) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not link_exists(tap), "the tap outlived its VMM (SIGKILL)"
    host.run("rm", name, check=False)  # the stale entry (and its cgroup)
