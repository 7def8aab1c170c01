"""Linux tap devices for virtio-net: creation with a virtio_net_hdr, offloads, link and address setup, removal."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import ipaddress
import os
import struct
import threading

# <linux/if_tun.h> ioctls and flags.
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
TUNSETPERSIST = 0x400454CB  # _IOW('T', 203, int)
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
TUNSETVNETHDRSZ = 0x400454D8  # _IOW('T', 216, int)
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000  # fail with EBUSY if the name exists instead of attaching to it
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04

#: sizeof(struct virtio_net_hdr_v1) (VIRTIO 1.2 §5.1.6): the header before every frame on the tap fd.
VNET_HDR_SIZE = 12
#: IFNAMSIZ - 1: the longest interface name.
IFNAME_MAX = 15
#: Where ``ip netns add`` puts named network namespaces.
NETNS_RUN_DIR = "/var/run/netns"
CLONE_NEWNET = 0x40000000
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: ifr_name, ifr_flags, rest of the union

_libc = ctypes.CDLL(None, use_errno=True)


class TapError(Exception):
    """A tap device could not be created, configured or removed; the message says what and why."""


def random_mac() -> bytes:
    """A random 6-byte MAC address, locally administered (bit 1 of the first octet set) and unicast (bit 0
    clear), per IEEE 802 (EUI-48 U/L and I/G bits)."""
    mac = bytearray(os.urandom(6))
    mac[0] = (mac[0] & 0xFC) | 0x02
    return bytes(mac)


def parse_mac(text: str | bytes) -> bytes:
    """The 6 bytes of a MAC given as ``"52:54:00:12:34:56"`` (``:`` or ``-`` separated hex) or as 6 bytes.

    :raises ValueError: if it is not six hex octets (or six bytes).
    """
    if isinstance(text, (bytes, bytearray)):
        if len(text) != 6:
            raise ValueError(f"a MAC address is 6 bytes, got {len(text)}")
        return bytes(text)
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(1 <= len(p) <= 2 for p in parts):
        raise ValueError(f"MAC address {text!r} is not six hex octets like 52:54:00:12:34:56")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"MAC address {text!r} has a non-hex octet") from None


def format_mac(mac: bytes) -> str:
    """``mac`` (6 bytes) as lower-case ``aa:bb:cc:dd:ee:ff``."""
    return ":".join(f"{b:02x}" for b in mac)


def check_ifname(name: str) -> str:
    """``name`` if Linux takes it as an interface name (``dev_valid_name``: 1..15 bytes, not ``.``/``..``, no
    ``/``, ``:`` or white space; ``%d`` lets the kernel pick the number).

    :raises ValueError: saying why not.
    """
    if not name or len(name.encode()) > IFNAME_MAX or name in (".", "..") or "/" in name or ":" in name \
            or any(c.isspace() for c in name):
        raise ValueError(f"tap name {name!r} is not a valid interface name (1..{IFNAME_MAX} bytes, no '/', ':' "
                         f"or spaces)")
    return name


def _netns_path(netns: str) -> str:
    path = os.path.join(NETNS_RUN_DIR, netns)
    if "/" in netns or not os.path.exists(path):
        raise TapError(f"network namespace {netns!r} does not exist ({path}; create it with `ip netns add`)")
    return path


def _open_tap(name: str, netns: str | None) -> tuple[int, str]:
    """Open /dev/net/tun and TUNSETIFF a new tap ``name`` (may hold ``%d``), in ``netns`` if given."""
    result: list = []

    def create() -> None:
        try:
            if netns is not None:  # only this short-lived thread enters the namespace (setns(2) is per thread)
                nsfd = os.open(_netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if _libc.setns(nsfd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise TapError(f"cannot enter network namespace {netns!r}: {os.strerror(err)}")
                finally:
                    os.close(nsfd)
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                ifr = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
                                                              | IFF_TUN_EXCL))
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
                fcntl.ioctl(fd, TUNSETPERSIST, 0)  # removed by the kernel when the last fd closes
            except BaseException:
                os.close(fd)
                raise
            result.append((fd, _IFREQ.unpack(ifr)[0].rstrip(b"\0").decode()))
        except BaseException as e:
            result.append(e)

    if netns is None:
        create()
    else:
        t = threading.Thread(target=create, name="tap-netns")
        t.start()
        t.join()
    out = result[0]
    if isinstance(out, TapError):
        raise out
    if isinstance(out, FileNotFoundError):
        raise TapError("no /dev/net/tun: the tun driver is missing (modprobe tun, or give the VMM the device)")
    if isinstance(out, OSError):
        if out.errno in (errno.EPERM, errno.EACCES):
            raise TapError(f"creating tap {name!r} needs CAP_NET_ADMIN ({out.strerror})") from out
        if out.errno == errno.EBUSY:
            raise TapError(f"interface name {name!r} is already in use") from out
        raise TapError(f"cannot create tap {name!r}: {out.strerror}") from out
    if isinstance(out, BaseException):
        raise out
    return out


class Tap:
    """A non-persistent Linux tap device (<linux/if_tun.h>: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) open for I/O.

    Every read returns one Ethernet frame and every write sends one, each preceded by a 12-byte
    ``virtio_net_hdr_v1`` (TUNSETVNETHDRSZ 12, VIRTIO 1.2 §5.1.6). ``fd`` is non-blocking. The kernel removes the
    interface when ``fd`` closes. ``name``, ``index`` (ifindex), ``netns`` (namespace name or None) and
    ``host_addr`` (an ``ipaddress.IPv4Interface``/``IPv6Interface`` or None) describe it. Use ``Tap.create``.
    """

    def __init__(self, fd: int, name: str, index: int, netns: str | None, host_addr=None):
        self.fd, self.name, self.index, self.netns, self.host_addr = fd, name, index, netns, host_addr

    @classmethod
    def create(cls, name: str | None = None, host_addr: str | None = None, netns: str | None = None) -> "Tap":
        """Create a tap, bring its link up and give it ``host_addr``.

        :param name: interface name (at most 15 bytes); default ``popek<N>`` with the kernel's lowest free N.
        :param host_addr: the host side's address with prefix length, e.g. ``"172.16.0.1/30"``; none if None.
        :param netns: name of a network namespace (``ip netns add``) to create the tap in; default the current.
        :raises TapError: no /dev/net/tun, no CAP_NET_ADMIN (EPERM), the name is in use, the namespace does not
            exist, or netlink refused the link/address change.
        :raises ValueError: for a name that is too long or an unparseable address.
        """
        name = check_ifname("popek%d" if name is None else name)
        addr = ipaddress.ip_interface(host_addr) if host_addr is not None else None
        if netns is not None:
            _netns_path(netns)
        from pyroute2.netlink.exceptions import NetlinkError  # imported on use: pyroute2 takes ~0.2 s to import

        fd, name = _open_tap(name, netns)
        tap = cls(fd, name, 0, netns, addr)
        try:
            with tap._ipr() as ipr:
                tap.index = ipr.link_lookup(ifname=name)[0]
                ipr.link("set", index=tap.index, state="up")
                if addr is not None:
                    ipr.addr("add", index=tap.index, address=str(addr.ip), prefixlen=addr.network.prefixlen)
        except NetlinkError as e:
            tap.close()
            raise TapError(f"cannot configure tap {name!r} (address {host_addr}): netlink error {e.code}: "
                           f"{os.strerror(e.code)}") from e
        except BaseException:
            tap.close()
            raise
        return tap

    def _ipr(self):
        from pyroute2 import IPRoute, NetNS

        return IPRoute() if self.netns is None else NetNS(self.netns, flags=0)  # flags=0: never create it

    def fileno(self) -> int:
        """The tap's file descriptor (for select/poll and ``os.readv``/``os.writev``)."""
        return self.fd

    def offloads(self, csum: bool = False, tso4: bool = False, tso6: bool = False) -> None:
        """TUNSETOFFLOAD: which offloads frames *read* from the tap may carry (partial checksums, TSO).

        They must match what the guest accepted (VIRTIO_NET_F_GUEST_CSUM/GUEST_TSO4/GUEST_TSO6, §5.1.3).
        :raises ValueError: TSO without checksum offload (the kernel needs TUN_F_CSUM for TSO).
        :raises TapError: if the tap refuses the offloads.
        """
        if (tso4 or tso6) and not csum:
            raise ValueError("TSO offload needs checksum offload (TUN_F_CSUM)")
        flags = (TUN_F_CSUM if csum else 0) | (TUN_F_TSO4 if tso4 else 0) | (TUN_F_TSO6 if tso6 else 0)
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        except OSError as e:
            raise TapError(f"tap {self.name}: TUNSETOFFLOAD {flags:#x} refused: {e.strerror}") from e

    def close(self) -> None:
        """Delete the link and close the fd (idempotent). A link already gone is not an error."""
        if self.fd < 0:
            return
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            if self.index:
                with self._ipr() as ipr:
                    ipr.link("del", index=self.index)
        except NetlinkError as e:
            if e.code != errno.ENODEV:
                raise TapError(f"cannot delete tap {self.name}: {os.strerror(e.code)}") from e
        except OSError:  # the namespace itself is gone; closing the fd is all that is left
            pass
        finally:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Tap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Tap({self.name!r}, index={self.index}, netns={self.netns!r}, host_addr={self.host_addr})"
