"""A VM's network interfaces: address plans (free /30s), the guest's ``popek.net=`` arguments, taps with virtio-net."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import random
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

from popek.devices.virtio.device import VirtioError
from popek.devices.virtio.net import Net

#: Where default interface addresses come from: one /30 per interface (host .1, guest .2), RFC 1918 space.
DEFAULT_POOL = ipaddress.IPv4Network("172.30.0.0/16")
DEFAULT_PREFIX = 30
#: Name of the kernel command-line parameter the guest /init configures an interface from (popek/images/init):
#: ``popek.net=MAC,ADDRESS/PREFIX[,GATEWAY]``, one per interface.
NET_PARAM = "popek.net"
#: Lock on /dev/net/tun (flock(2), shared by every process that may create taps): the check that a subnet is free
#: and the tap taking it happen under it, so two VMMs never give their taps the same subnet.
TUN_DEVICE = "/dev/net/tun"


@dataclass(frozen=True)
class NetConfig:
    """A virtio-net interface on a tap this VM creates (``popek run --net``; Firecracker's NetworkInterface with
    Popek's address fields).

    :param tap: the tap's name (at most 15 bytes; ``%d`` lets the kernel number it); None = ``popek<N>``.
    :param host: the host side's address and prefix (``"172.30.0.1/30"``), given to the tap; None = a free /30
        (``free_subnet``), host .1.
    :param guest: the guest's address (``"172.30.0.2"``, the host's prefix) which the guest init configures, with
        the first interface's host address as default gateway; None = the network's first other address.
    :param mac: the guest's MAC (``"52:54:00:12:34:56"``); None = random, locally administered.
    ``resolve`` fills in every None but ``tap``.
    """

    tap: str | None = None
    host: str | None = None
    guest: str | None = None
    mac: str | None = None


@dataclass(frozen=True)
class _Plan:
    tap: str | None
    host: ipaddress.IPv4Interface
    guest: ipaddress.IPv4Interface
    mac: bytes

    def config(self) -> NetConfig:
        return NetConfig(self.tap, str(self.host), str(self.guest), self.mac.hex(":"))


def _host_networks() -> list[ipaddress.IPv4Network]:
    """The IPv4 networks this host's (current namespace's) addresses and routes cover (rtnetlink, RTM_GETADDR and
    RTM_GETROUTE of the main table)."""
    from pyroute2 import IPRoute

    nets = []
    with IPRoute() as ipr:
        for a in ipr.get_addr(family=socket.AF_INET):
            addr = a.get_attr("IFA_ADDRESS") or a.get_attr("IFA_LOCAL")
            if addr:
                nets.append(ipaddress.IPv4Interface(f"{addr}/{a['prefixlen']}").network)
        for r in ipr.get_routes(family=socket.AF_INET, table=254):
            dst = r.get_attr("RTA_DST")
            if dst and r["dst_len"]:
                nets.append(ipaddress.IPv4Network(f"{dst}/{r['dst_len']}", strict=False))
    return nets


def _in_use(net: ipaddress.IPv4Network, used: Iterable[ipaddress.IPv4Network]) -> ipaddress.IPv4Network | None:
    return next((u for u in used if u.overlaps(net)), None)


def free_subnet(taken: Iterable[ipaddress.IPv4Network] = (), *, pool: ipaddress.IPv4Network = DEFAULT_POOL,
                prefix: int = DEFAULT_PREFIX, used: list[ipaddress.IPv4Network] | None = None,
                rng: random.Random | None = None) -> ipaddress.IPv4Network:
    """A /``prefix`` of ``pool`` that overlaps none of ``used`` (default: the host's addresses and routes,
    ``_host_networks``) nor ``taken``. Tried at random first (VMMs starting at once rarely pick the same one; the
    lock in ``open_net`` settles the rest), then in order.

    :raises VirtioError: if every subnet of the pool is in use.
    """
    used = (_host_networks() if used is None else list(used)) + list(taken)
    count = 1 << (prefix - pool.prefixlen)
    rng = rng or random.SystemRandom()
    size = 1 << (32 - prefix)

    def nth(i: int) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network((int(pool.network_address) + i * size, prefix))

    for _ in range(64):
        net = nth(rng.randrange(count))
        if _in_use(net, used) is None:
            return net
    for i in range(count):
        if _in_use(nth(i), used) is None:
            return nth(i)
    raise VirtioError(f"virtio-net: every /{prefix} of {pool} is in use on this host; give host=ADDR/PREFIX")


def _plan(cfg: NetConfig, taken: Iterable[ipaddress.IPv4Network] = (),
          used: list[ipaddress.IPv4Network] | None = None) -> _Plan:
    from popek.net.tap import check_ifname, parse_mac, random_mac

    tap, host, guest, mac = cfg.tap, cfg.host, cfg.guest, cfg.mac
    if tap is not None:
        check_ifname(tap)
    m = random_mac() if mac is None else parse_mac(mac)
    if m[0] & 1 or m == bytes(6):
        raise ValueError(f"MAC {mac!r} is not a unicast address (the first octet's bit 0 must be clear, "
                         f"not all zero)")
    if host is None:
        if guest is not None:
            raise ValueError(f"guest={guest} needs host=ADDR/PREFIX (the guest's network is the host side's)")
        net = free_subnet(taken, used=used)
        return _Plan(tap, ipaddress.IPv4Interface((net[1], net.prefixlen)),
                     ipaddress.IPv4Interface((net[2], net.prefixlen)), m)
    h = _ipv4_interface(host, "host")
    if h.network.prefixlen > 30:
        raise ValueError(f"host={host}: a /{h.network.prefixlen} has no room for a guest address (at most /30)")
    hosts = (h.network.network_address, h.network.broadcast_address)
    if h.ip in hosts:
        raise ValueError(f"host={host} is the network's {'network' if h.ip == hosts[0] else 'broadcast'} address")
    if guest is None:
        g_ip = next(ip for ip in h.network.hosts() if ip != h.ip)
    else:
        g = _ipv4_interface(guest if "/" in guest else f"{guest}/{h.network.prefixlen}", "guest")
        if g.network != h.network:
            raise ValueError(f"guest={guest} is not in the host side's network {h.network}")
        if g.ip == h.ip or g.ip in hosts:
            raise ValueError(f"guest={guest} is the host's address or the network's network/broadcast address")
        g_ip = g.ip
    return _Plan(tap, h, ipaddress.IPv4Interface((g_ip, h.network.prefixlen)), m)


def _ipv4_interface(text: str, what: str) -> ipaddress.IPv4Interface:
    try:
        value = ipaddress.ip_interface(text)
    except ValueError:
        raise ValueError(f"{what}={text} is not an address like 172.30.0.1/30") from None
    if not isinstance(value, ipaddress.IPv4Interface):
        raise ValueError(f"{what}={text}: only IPv4 addresses are supported")
    return value


def resolve(nets: Iterable[NetConfig]) -> list[NetConfig]:
    """Decide every interface's addresses and MAC (all but ``tap``): ``host`` given, ``guest`` defaults to its
    network's first other address; neither given, a free /30 of DEFAULT_POOL (``free_subnet``, also avoiding the
    interfaces before it), host .1, guest .2; ``mac`` defaults to ``popek.net.tap.random_mac()``.

    :raises ValueError: a bad tap name, MAC (malformed, multicast or all zero), or address (not IPv4, a network
        with fewer than 2 host addresses, host or guest being the network or broadcast address, guest outside the
        host's network or equal to it, ``guest`` without ``host``); two interfaces on one tap name, MAC or network.
    :raises VirtioError: if no default subnet is free.
    """
    plans: list[_Plan] = []
    used: list[ipaddress.IPv4Network] | None = None
    for cfg in nets:
        if cfg.host is None and used is None:
            used = _host_networks()
        p = _plan(cfg, [q.host.network for q in plans], used)
        for q in plans:
            if p.tap is not None and p.tap == q.tap and "%" not in p.tap:
                raise ValueError(f"two network interfaces use tap {p.tap!r}")
            if p.mac == q.mac:
                raise ValueError(f"two network interfaces use MAC {p.mac.hex(':')}")
            if p.host.network.overlaps(q.host.network):
                raise ValueError(f"two network interfaces are on overlapping networks {q.host.network} and "
                                 f"{p.host.network}")
        plans.append(p)
    return [p.config() for p in plans]


def guest_args(nets: Iterable[NetConfig]) -> str:
    """The guest's kernel command-line arguments for resolved ``nets`` (see ``resolve``):
    ``popek.net=MAC,ADDR/PREFIX[,GATEWAY]`` each; the first interface's host address is the guest's default gateway
    (popek/images/init finds each interface by its MAC and configures it with busybox ``ip``)."""
    out = []
    for i, cfg in enumerate(nets):
        p = _plan(cfg, used=[])
        out.append(f"{NET_PARAM}={p.mac.hex(':')},{p.guest}" + (f",{p.host.ip}" if i == 0 else ""))
    return " ".join(out)


@contextlib.contextmanager
def _tun_lock() -> Iterator[None]:
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError:  # Tap.create reports the missing device or permission
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class TapNet(Net):
    """A virtio-net device (``popek.devices.virtio.net.Net``) that owns its tap: ``close`` removes it. The tap is
    not persistent, so the kernel also removes it when the VMM process dies (its fd closes). ``tap`` is the
    ``popek.net.tap.Tap``, ``net`` the resolved ``NetConfig`` with the tap's real name."""

    def __init__(self, tap, net: NetConfig):
        self.tap, self.net = tap, net
        super().__init__(tap, mac=net.mac)

    def close(self) -> None:
        """Delete the tap (idempotent)."""
        self.tap.close()


def open_net(cfg: NetConfig) -> TapNet:
    """Create ``cfg``'s tap (``popek.net.tap.Tap.create``: up, with the host address) and its virtio-net device.

    Under a lock on /dev/net/tun, refuses a host network that an address or route of this host already overlaps
    (another VM's tap, or a LAN), so the guest's traffic cannot be routed elsewhere.

    :param cfg: a ``NetConfig`` (its None fields are resolved as ``resolve`` does).
    :raises VirtioError: naming the interface and why (the tap could not be created: no /dev/net/tun, no
        CAP_NET_ADMIN, name in use, ...; or the network is in use). Nothing is left behind.
    :raises ValueError: as ``resolve``.
    """
    from popek.net.tap import Tap, TapError

    p = _plan(cfg)
    what = f"virtio-net (tap {p.tap or 'popek<N>'}, {p.host})"
    with _tun_lock():
        try:
            clash = _in_use(p.host.network, _host_networks())
        except OSError as e:
            raise VirtioError(f"{what}: cannot read the host's addresses: {e}") from None
        if clash is not None:
            raise VirtioError(f"{what}: network {p.host.network} overlaps {clash}, already on this host (another "
                              f"VM's tap?); choose another host=ADDR/PREFIX")
        try:
            tap = Tap.create(p.tap, str(p.host))
        except (TapError, ValueError) as e:
            raise VirtioError(f"{what}: {e}") from None
    try:
        return TapNet(tap, replace(p, tap=tap.name).config())
    except BaseException:
        tap.close()
        raise
