"""The API's JSON models (Firecracker's resource and field names), their strict validation, and the ``VmSpec``."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import MISSING, dataclass, field
from typing import Any

#: Where the OpenAPI 3.0 document keeps the schemas :meth:`Model.schema` produces.
SCHEMA_REF = "#/components/schemas/"
#: Firecracker's resource ids (drive_id, iface_id): ASCII letters, digits and '_', 1-64 characters.
ID_PATTERN = r"^[A-Za-z0-9_]{1,64}$"
#: A MAC address as six colon-separated hex octets (IEEE 802 canonical form, as Firecracker's ``guest_mac``).
MAC_PATTERN = r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$"
#: A host network device name: 1-15 printable ASCII bytes without '/' or ':' (IFNAMSIZ 16 with the NUL;
#: Linux ``dev_valid_name``).
IFNAME_PATTERN = r"^[!-.0-9;-~]{1,15}$"
#: An IPv4 address (dotted quad), and one with a prefix length (``ADDR/PREFIX``).
IPV4_PATTERN = r"^[0-9]{1,3}(\.[0-9]{1,3}){3}$"
IPV4_CIDR_PATTERN = r"^[0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}$"
#: A partition UUID for ``root=PARTUUID=``: a GPT UUID or an MBR ``SSSSSSSS-PP`` id (hex digits and '-').
PARTUUID_PATTERN = r"^[0-9A-Fa-f-]{1,36}$"
#: Upper bound of ``mem_size_mib`` (1 TiB): Popek's sanity limit, Firecracker states none.
MAX_MEM_SIZE_MIB = 1 << 20
#: ``sun_path`` holds 108 bytes including the NUL (unix(7)).
MAX_UDS_PATH_BYTES = 107

_JSON_TYPE = {str: "string", int: "integer", bool: "boolean"}


class ApiError(Exception):
    """A request the API refuses.

    :param status: the HTTP status: 400 (bad body, unknown field, wrong type, out of range, wrong state), 404 (no such
        resource), 405 (method not allowed), 413 (body too large).
    :param message: the one-line ``fault_message`` of the response body (Firecracker's ``Error`` definition).
    """

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _field(kind, doc: str, *, default=MISSING, minimum=None, maximum=None, enum=None, pattern=None,
           max_length=None, path=False, note=None):
    """A model field: ``kind`` is str, int, bool or a Model subclass; no ``default`` makes it required.

    ``path``: a host path (non-empty, no NUL, encodable by the file system encoding). ``note``: why values outside
    ``enum`` are refused, appended to the error message.
    """
    md = dict(kind=kind, doc=doc, minimum=minimum, maximum=maximum, enum=enum, pattern=pattern,
              max_length=max_length, path=path, note=note)
    return field(default=default, metadata=md)


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


def _is_model(kind) -> bool:
    return isinstance(kind, type) and issubclass(kind, Model)


def _check(md, value: Any, where: str) -> Any:
    kind = md["kind"]
    if _is_model(kind):
        return kind.from_json(value, where)
    if type(value) is not kind:  # exact: JSON true is not an integer, 1.0 is not an integer
        raise ApiError(400, f"{where}: expected {_JSON_TYPE[kind]}, got {_json_kind(value)}")
    if md["enum"] is not None and value not in md["enum"]:
        allowed = ", ".join(_show(e) for e in md["enum"])
        note = f" ({md['note']})" if md["note"] else ""
        raise ApiError(400, f"{where}: {_show(value)} is not one of {allowed}{note}")
    if kind is int:
        lo, hi = md["minimum"], md["maximum"]
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ApiError(400, f"{where}: {_show(value)} is out of range [{lo}, {hi}]")
    if kind is str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"{where}: the string is not valid Unicode (lone surrogate)") from None
        if md["max_length"] is not None and len(value) > md["max_length"]:
            raise ApiError(400, f"{where}: longer than {md['max_length']} characters")
        if md["pattern"] is not None and not re.fullmatch(md["pattern"], value):
            raise ApiError(400, f"{where}: {_show(value)} does not match {md['pattern']}")
        if md["path"]:
            if not value or "\0" in value:
                raise ApiError(400, f"{where}: a host path must be non-empty and contain no NUL byte")
            try:
                os.fsencode(value)
            except UnicodeEncodeError:
                raise ApiError(400, f"{where}: {_show(value)} is not encodable as a host path") from None
    return value


class Model:
    """Base of the API models (frozen keyword-only dataclasses whose fields are declared with ``_field``).

    ``from_json`` validates, ``to_json`` serializes, ``schema`` gives the OpenAPI 3.0 schema object stating the same
    rules; so the served document and the validation cannot disagree.
    """

    @classmethod
    def from_json(cls, obj: Any, where: str | None = None):
        """Build the model from a decoded JSON value, strictly (Firecracker's serde models deny unknown fields).

        A JSON object with no unknown field, every required field present and not null, exact JSON types (``true`` is
        not an integer, ``1.0`` is not an integer), enums, ranges and patterns as in :meth:`schema`, then the model's
        cross-field rules (:meth:`validate`). ``null`` for an optional field means absent.

        :raises ApiError: 400, naming the field and what is wrong with it.
        """
        where = where or cls.__name__
        if not isinstance(obj, dict):
            raise ApiError(400, f"{where}: expected a JSON object, got {_json_kind(obj)}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in obj:
            if key not in fields:
                raise ApiError(400, f"{where}: unknown field {_show(key)} (known: {', '.join(fields)})")
        values = {}
        for name, f in fields.items():
            value = obj.get(name)
            if value is None:
                if f.default is MISSING:
                    what = "must not be null" if name in obj else "is required"
                    raise ApiError(400, f"{where}: field '{name}' {what}")
                continue
            values[name] = _check(f.metadata, value, f"{where}.{name}")
        model = cls(**values)
        model.validate(where)
        return model

    def validate(self, where: str) -> None:
        """Cross-field rules the schema cannot state. :raises ApiError: 400. The base class has none."""

    def to_json(self) -> dict:
        """The model as a JSON object; optional fields that are unset (None) are left out."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value.to_json() if isinstance(value, Model) else value
        return out

    @classmethod
    def schema(cls) -> dict:
        """The OpenAPI 3.0 schema object of this model (``additionalProperties: false``; optional fields nullable)."""
        props, required = {}, []
        for f in dataclasses.fields(cls):
            md = f.metadata
            if _is_model(md["kind"]):
                prop = {"allOf": [{"$ref": SCHEMA_REF + md["kind"].__name__}]}
            else:
                prop = {"type": _JSON_TYPE[md["kind"]]}
                for key, name in (("enum", "enum"), ("minimum", "minimum"), ("maximum", "maximum"),
                                  ("pattern", "pattern"), ("max_length", "maxLength")):
                    if md[key] is not None:
                        prop[name] = md[key]
                if md["path"]:
                    prop["minLength"] = 1
            prop["description"] = md["doc"] + (f" ({md['note']}.)" if md["note"] else "")
            if f.default is MISSING:
                required.append(f.name)
            else:
                prop["nullable"] = True
                if "enum" in prop:  # OpenAPI 3.0.3: a nullable enum must list null itself
                    prop["enum"] = [*prop["enum"], None]
                if f.default is not None:
                    prop["default"] = f.default
            props[f.name] = prop
        schema = {"type": "object", "description": cls.__doc__.strip().splitlines()[0], "properties": props,
                  "additionalProperties": False}
        if required:
            schema["required"] = required
        return schema


@dataclass(frozen=True, kw_only=True)
class BootSource(Model):
    """The guest kernel, initrd and command line (Firecracker's BootSource; PUT /boot-source)."""

    kernel_image_path: str = _field(str, "Host path of the guest kernel: a bzImage or an uncompressed vmlinux ELF.",
                                    path=True)
    initrd_path: str | None = _field(str, "Host path of the initrd (initramfs) image.", default=None, path=True)
    boot_args: str | None = _field(str, "The kernel command line.", default=None)


@dataclass(frozen=True, kw_only=True)
class MachineConfiguration(Model):
    """vCPUs, memory and dirty-page tracking (Firecracker's MachineConfiguration; PUT/GET /machine-config)."""

    vcpu_count: int = _field(int, "Number of vCPUs.", minimum=1, maximum=32)
    mem_size_mib: int = _field(int, "Guest RAM in MiB.", minimum=1, maximum=MAX_MEM_SIZE_MIB)
    smt: bool = _field(bool, "Simultaneous multithreading in the guest's CPU topology.", default=False,
                       enum=[False], note="Popek does not support SMT; only false is accepted")
    track_dirty_pages: bool = _field(bool, "Log the pages the guest writes (KVM_MEM_LOG_DIRTY_PAGES); Diff "
                                     "snapshots need it.", default=False)


@dataclass(frozen=True, kw_only=True)
class Drive(Model):
    """A virtio-blk disk (Firecracker's Drive; PUT /drives/{drive_id})."""

    drive_id: str = _field(str, "The drive's id; must equal the drive_id of the path.", pattern=ID_PATTERN)
    path_on_host: str = _field(str, "Host path of the disk image file or block device.", path=True)
    is_root_device: bool = _field(bool, "The guest's root file system is on this drive (at most one drive).")
    is_read_only: bool = _field(bool, "The guest gets a read-only disk (VIRTIO_BLK_F_RO).")
    partuuid: str | None = _field(str, "Unique id of the root partition (root=PARTUUID=); used only with "
                                  "is_root_device.", default=None, pattern=PARTUUID_PATTERN)
    cache_type: str = _field(str, "Unsafe: guest flushes are not offered; Writeback: VIRTIO_BLK_F_FLUSH is offered "
                             "and a flush syncs the backing file.", default="Unsafe", enum=["Unsafe", "Writeback"])


@dataclass(frozen=True, kw_only=True)
class NetworkInterface(Model):
    """A virtio-net interface on a host tap device (Firecracker's NetworkInterface; PUT /network-interfaces/{id})."""

    iface_id: str = _field(str, "The interface's id; must equal the iface_id of the path.", pattern=ID_PATTERN)
    host_dev_name: str = _field(str, "Name of the host tap device the VMM creates (it must not exist; a '%d' in "
                                "it lets the kernel number it). The tap is not persistent: it goes away with the "
                                "VMM.", pattern=IFNAME_PATTERN)
    guest_mac: str | None = _field(str, "The guest's MAC address; when absent the VMM picks a random locally "
                                   "administered one.", default=None, pattern=MAC_PATTERN)
    host_address: str | None = _field(str, "Popek extension: the tap's IPv4 address and prefix length (e.g. "
                                      "172.30.0.1/30); when absent a free /30 of 172.30.0.0/16 (host .1).",
                                      default=None, pattern=IPV4_CIDR_PATTERN)
    guest_address: str | None = _field(str, "Popek extension: the guest's IPv4 address in the host address's "
                                       "network, configured by the guest's init (popek.net=); when absent the "
                                       "network's first other address.", default=None, pattern=IPV4_PATTERN)

    def validate(self, where: str) -> None:
        """The addresses must make a network (``popek.net.iface.resolve``'s rules); guest_address needs
        host_address. :raises ApiError: 400."""
        if self.host_address is None:
            if self.guest_address is not None:
                raise ApiError(400, f"{where}: guest_address needs host_address")
            return
        from popek.net.iface import NetConfig, resolve

        try:
            resolve([NetConfig(None, self.host_address, self.guest_address, self.guest_mac)])
        except ValueError as e:
            raise ApiError(400, f"{where}: {e}") from None


@dataclass(frozen=True, kw_only=True)
class Vsock(Model):
    """A virtio-vsock device proxied to host Unix sockets (Firecracker's Vsock; PUT /vsock)."""

    guest_cid: int = _field(int, "The guest's context id (0-2 are reserved, 0xFFFFFFFF is VMADDR_CID_ANY).",
                            minimum=3, maximum=0xFFFFFFFE)
    uds_path: str = _field(str, "Host Unix socket the VMM listens on for host-initiated connections "
                           "('CONNECT <port>'); guest-initiated ones go to <uds_path>_<port>.", path=True)
    vsock_id: str | None = _field(str, "Deprecated by Firecracker and ignored; accepted for older clients.",
                                  default=None)

    def validate(self, where: str) -> None:
        if len(os.fsencode(self.uds_path)) > MAX_UDS_PATH_BYTES:
            raise ApiError(400, f"{where}.uds_path: longer than the {MAX_UDS_PATH_BYTES} bytes a Unix socket "
                                "address holds (sun_path)")


#: Upper bound of ``stats_polling_interval_s`` (Firecracker keeps it in a u16).
MAX_STATS_INTERVAL_S = 0xFFFF


@dataclass(frozen=True, kw_only=True)
class Balloon(Model):
    """A virtio-balloon device (Firecracker's Balloon; PUT /balloon, GET /balloon)."""

    amount_mib: int = _field(int, "Target balloon size in MiB: guest memory the guest hands back to the host (at "
                             "most mem_size_mib).", minimum=0, maximum=MAX_MEM_SIZE_MIB)
    deflate_on_oom: bool = _field(bool, "The guest may take pages back from the balloon when it runs out of memory "
                                  "(VIRTIO_BALLOON_F_DEFLATE_ON_OOM).")
    stats_polling_interval_s: int = _field(int, "Seconds between refreshes of the guest's memory statistics; 0 "
                                           "disables statistics.", default=0, minimum=0,
                                           maximum=MAX_STATS_INTERVAL_S)
    free_page_reporting: bool = _field(bool, "The guest reports its free pages and the host reclaims them "
                                       "(VIRTIO_BALLOON_F_PAGE_REPORTING).", default=False)


@dataclass(frozen=True, kw_only=True)
class BalloonUpdate(Model):
    """A new balloon target (Firecracker's BalloonUpdate; PATCH /balloon)."""

    amount_mib: int = _field(int, "Target balloon size in MiB (at most mem_size_mib).", minimum=0,
                             maximum=MAX_MEM_SIZE_MIB)


@dataclass(frozen=True, kw_only=True)
class BalloonStatsUpdate(Model):
    """A new statistics polling interval (Firecracker's BalloonStatsUpdate; PATCH /balloon/statistics)."""

    stats_polling_interval_s: int = _field(int, "Seconds between refreshes of the guest's memory statistics; 0 "
                                           "stops them.", minimum=0, maximum=MAX_STATS_INTERVAL_S)


@dataclass(frozen=True, kw_only=True)
class BalloonStats(Model):
    """The balloon's size and the guest's memory statistics (Firecracker's BalloonStats; GET /balloon/statistics);
    the statistics are VIRTIO 1.2 §5.5.6.3's tags, present once the guest has sent them."""

    target_pages: int = _field(int, "Target balloon size in 4 KiB pages.", minimum=0)
    actual_pages: int = _field(int, "Pages the guest says the balloon holds.", minimum=0)
    target_mib: int = _field(int, "Target balloon size in MiB.", minimum=0)
    actual_mib: int = _field(int, "Balloon size the guest reports, in MiB.", minimum=0)
    swap_in: int | None = _field(int, "Memory swapped in, bytes (VIRTIO_BALLOON_S_SWAP_IN).", default=None)
    swap_out: int | None = _field(int, "Memory swapped out, bytes (VIRTIO_BALLOON_S_SWAP_OUT).", default=None)
    major_faults: int | None = _field(int, "Major page faults (VIRTIO_BALLOON_S_MAJFLT).", default=None)
    minor_faults: int | None = _field(int, "Minor page faults (VIRTIO_BALLOON_S_MINFLT).", default=None)
    free_memory: int | None = _field(int, "Unused memory, bytes (VIRTIO_BALLOON_S_MEMFREE).", default=None)
    total_memory: int | None = _field(int, "Memory the guest can use, bytes (VIRTIO_BALLOON_S_MEMTOT).",
                                      default=None)
    available_memory: int | None = _field(int, "Memory available for new work, bytes (VIRTIO_BALLOON_S_AVAIL).",
                                          default=None)
    disk_caches: int | None = _field(int, "Memory in the page cache, bytes (VIRTIO_BALLOON_S_CACHES).",
                                     default=None)
    hugetlb_allocations: int | None = _field(int, "Huge page allocations (VIRTIO_BALLOON_S_HTLB_PGALLOC).",
                                             default=None)
    hugetlb_failures: int | None = _field(int, "Failed huge page allocations (VIRTIO_BALLOON_S_HTLB_PGFAIL).",
                                          default=None)


@dataclass(frozen=True, kw_only=True)
class InstanceActionInfo(Model):
    """A synchronous action (Firecracker's InstanceActionInfo; PUT /actions)."""

    action_type: str = _field(str, "InstanceStart boots the configured VM; SendCtrlAltDel presses Ctrl+Alt+Del on "
                              "the i8042 keyboard; FlushMetrics flushes the VMM's metrics sink (nothing to do "
                              "when none is configured, as in Firecracker without PUT /metrics).",
                              enum=["InstanceStart", "SendCtrlAltDel", "FlushMetrics"])


@dataclass(frozen=True, kw_only=True)
class Vm(Model):
    """The wanted run state of a started VM (Firecracker's Vm; PATCH /vm)."""

    state: str = _field(str, "Paused stops the vCPUs; Resumed runs them again.", enum=["Paused", "Resumed"])


@dataclass(frozen=True, kw_only=True)
class SnapshotCreateParams(Model):
    """Where to write a snapshot of a paused VM (Firecracker's SnapshotCreateParams; PUT /snapshot/create)."""

    snapshot_path: str = _field(str, "Host path of the file that gets the VM state (vCPUs, devices).", path=True)
    mem_file_path: str = _field(str, "Host path of the file that gets the guest memory.", path=True)
    snapshot_type: str = _field(str, "Full: all guest memory; Diff: only pages dirtied since the last snapshot "
                                "(needs track_dirty_pages).", default="Full", enum=["Full", "Diff"])


@dataclass(frozen=True, kw_only=True)
class MemoryBackend(Model):
    """Where a snapshot's guest memory comes from (Firecracker's MemoryBackend)."""

    backend_type: str = _field(str, "File: the memory file written by PUT /snapshot/create.", enum=["File"],
                               note="Firecracker's Uffd backend is not supported")
    backend_path: str = _field(str, "Host path of the guest memory file.", path=True)


@dataclass(frozen=True, kw_only=True)
class SnapshotLoadParams(Model):
    """A snapshot to restore into a fresh VMM (Firecracker's SnapshotLoadParams; PUT /snapshot/load)."""

    snapshot_path: str = _field(str, "Host path of the VM state file.", path=True)
    mem_file_path: str | None = _field(str, "Host path of the guest memory file (deprecated by Firecracker; use "
                                       "mem_backend). Exactly one of the two.", default=None, path=True)
    mem_backend: MemoryBackend | None = _field(MemoryBackend, "The guest memory's backend. Exactly one of "
                                               "mem_backend and mem_file_path.", default=None)
    resume_vm: bool = _field(bool, "Resume the VM once it is loaded (else it stays Paused).", default=False)
    track_dirty_pages: bool = _field(bool, "Log the pages written after the load (KVM_MEM_LOG_DIRTY_PAGES), so the "
                                     "next PUT /snapshot/create can be a Diff on this snapshot.", default=False)
    base_mem_file_path: str | None = _field(str, "Popek extension: for a Diff memory file, host path of its base "
                                            "(Full) memory file; absent: the path the Diff recorded when it was "
                                            "taken.", default=None, path=True)

    def validate(self, where: str) -> None:
        if (self.mem_file_path is None) == (self.mem_backend is None):
            raise ApiError(400, f"{where}: give exactly one of 'mem_backend' and 'mem_file_path'")

    @property
    def memory_path(self) -> str:
        """Host path of the guest memory file, from whichever of the two fields was given."""
        return self.mem_backend.backend_path if self.mem_backend else self.mem_file_path


@dataclass(frozen=True, kw_only=True)
class InstanceInfo(Model):
    """The instance's id, state and version (Firecracker's InstanceInfo; GET /)."""

    id: str = _field(str, "The instance id given to the VMM.")
    state: str = _field(str, "Not started until InstanceStart (or a snapshot load); Stopped once the guest has "
                        "ended (Popek keeps serving the API then).",
                        enum=["Not started", "Running", "Paused", "Stopped"])
    vmm_version: str = _field(str, "Popek's version.")
    app_name: str = _field(str, "Always \"Popek\".")


def _default_machine() -> MachineConfiguration:
    return MachineConfiguration(vcpu_count=1, mem_size_mib=128)  # Firecracker's defaults


@dataclass
class VmSpec:
    """The pre-boot configuration accumulated from the PUT requests; what ``vm_factory`` builds the VM from.

    ``drives`` and ``network_interfaces`` map ids to models in device order: the root drive first (it becomes the
    first virtio-blk disk, as in Firecracker), the rest in the order their ids were first PUT. Not thread-safe: the
    controller serializes access.
    """

    boot_source: BootSource | None = None
    machine_config: MachineConfiguration = field(default_factory=_default_machine)
    drives: dict[str, Drive] = field(default_factory=dict)
    network_interfaces: dict[str, NetworkInterface] = field(default_factory=dict)
    vsock: Vsock | None = None
    balloon: Balloon | None = None

    @property
    def root_drive(self) -> Drive | None:
        """The drive with ``is_root_device``, if any."""
        return next((d for d in self.drives.values() if d.is_root_device), None)

    def set_drive(self, drive: Drive) -> None:
        """Add or replace a drive by ``drive_id``. :raises ApiError: 400 if another drive is already the root."""
        root = self.root_drive
        if drive.is_root_device and root is not None and root.drive_id != drive.drive_id:
            raise ApiError(400, f"drive '{drive.drive_id}': drive '{root.drive_id}' is already the root device; "
                                "only one drive can have is_root_device")
        self.drives[drive.drive_id] = drive
        if drive.is_root_device:
            self.drives = {drive.drive_id: drive, **{k: v for k, v in self.drives.items() if k != drive.drive_id}}

    def set_network_interface(self, iface: NetworkInterface) -> None:
        """Add or replace an interface by ``iface_id``.

        :raises ApiError: 400 if another interface already uses the tap device or the guest MAC (Firecracker refuses
            a MAC in use).
        """
        for other in self.network_interfaces.values():
            if other.iface_id == iface.iface_id:
                continue
            if other.host_dev_name == iface.host_dev_name and "%" not in iface.host_dev_name:
                raise ApiError(400, f"network interface '{iface.iface_id}': tap device '{iface.host_dev_name}' is "
                                    f"already used by '{other.iface_id}'")
            if iface.guest_mac and other.guest_mac and other.guest_mac.lower() == iface.guest_mac.lower():
                raise ApiError(400, f"network interface '{iface.iface_id}': guest MAC {iface.guest_mac} is already "
                                    f"used by '{other.iface_id}'")
        self.network_interfaces[iface.iface_id] = iface

    def to_json(self) -> dict:
        """The configuration as Firecracker's GET /vm/config returns it (its FullVmConfiguration, these keys only)."""
        return {
            "boot-source": self.boot_source.to_json() if self.boot_source else None,
            "machine-config": self.machine_config.to_json(),
            "drives": [d.to_json() for d in self.drives.values()],
            "network-interfaces": [n.to_json() for n in self.network_interfaces.values()],
            "vsock": self.vsock.to_json() if self.vsock else None,
            "balloon": self.balloon.to_json() if self.balloon else None,
        }

    @staticmethod
    def schema() -> dict:
        """The OpenAPI 3.0 schema of :meth:`to_json` (Firecracker's FullVmConfiguration, these keys only)."""

        def ref(name: str, nullable: bool = False) -> dict:
            return {"allOf": [{"$ref": SCHEMA_REF + name}], **({"nullable": True} if nullable else {})}

        return {
            "type": "object",
            "description": "The full VM configuration (Firecracker's FullVmConfiguration, the keys Popek implements).",
            "properties": {
                "boot-source": ref("BootSource", nullable=True),
                "machine-config": ref("MachineConfiguration"),
                "drives": {"type": "array", "items": {"$ref": SCHEMA_REF + "Drive"}},
                "network-interfaces": {"type": "array", "items": {"$ref": SCHEMA_REF + "NetworkInterface"}},
                "vsock": ref("Vsock", nullable=True),
                "balloon": ref("Balloon", nullable=True),
            },
            "required": ["boot-source", "machine-config", "drives", "network-interfaces", "vsock", "balloon"],
            "additionalProperties": False,
        }


#: Every model whose schema the OpenAPI document carries, by schema name.
MODELS: dict[str, type[Model]] = {m.__name__: m for m in (
    BootSource, MachineConfiguration, Drive, NetworkInterface, Vsock, InstanceActionInfo, Vm, SnapshotCreateParams,
    MemoryBackend, SnapshotLoadParams, InstanceInfo, Balloon, BalloonUpdate, BalloonStatsUpdate, BalloonStats)}
