"""Warm start of `popek run -- CMD`: templates (snapshots of a booted guest waiting on its agent), their key and store.

A template is a Full snapshot (popek.persist) of a guest booted with ``popek.warm=1`` (popek/images/init: start
the guest agent and wait on it instead of running a command), taken once the agent answers. A warm run loads it
(guest RAM mapped MAP_PRIVATE from the template's memory file, so pages load lazily and runs share them), gives
the vsock device the run's own socket, starts it, refreshes the guest through the agent (REFRESH: the host's wall
clock, 64 bytes from the host's getrandom(2), the hostname) and runs the command through the agent (EXEC), whose
stdout and stderr stream to ours. The first run for a key boots cold in template mode, publishes the template,
then runs the command in that same VM.

Store: ``$POPEK_WARM_DIR`` or ``<image cache>/warm`` (popek.images.cache.cache_root), one directory per key,
published by rename (a crash mid-write leaves only a ``.tmp-<pid>-*`` directory, removed by a later run; two runs
making the same template at once: the first rename wins, the other drops its copy). ``POPEK_NO_WARM=1`` (or
``popek run --cold``) boots cold and neither reads nor makes a template.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

#: Environment: where templates live (default: ``<image cache>/warm``), and "1" to turn warm starts off.
ENV_DIR, ENV_OFF = "POPEK_WARM_DIR", "POPEK_NO_WARM"
#: The kernel argument that puts the guest init in template mode (popek/images/init).
WARM_ARG = "popek.warm=1"
#: The hostname a refreshed guest gets (the one popek/images/init sets at boot).
HOSTNAME = "popek"
#: Bytes of host getrandom(2) output a warm guest's entropy pool gets (REFRESH_ENTROPY crediting 8 bits each).
ENTROPY_BYTES = 64
#: Seconds a template boot waits for the guest agent.
READY_TIMEOUT = 600.0
#: Bump when what a template holds changes in a way the snapshot format version does not cover.
TEMPLATE_VERSION = 1
_TMP = ".tmp-"


def warm_root() -> Path:
    """The template store: ``$POPEK_WARM_DIR``, else ``popek.images.cache.cache_root() / "warm"``."""
    d = os.environ.get(ENV_DIR)
    if d:
        return Path(d)
    from popek.images.cache import cache_root

    return cache_root() / "warm"


def cold_reason(*, command, kernel=None, initrd=None, drives=(), nets=(), rootfs=None, profile=False,
                no_extract=False, no_rng=False, vsock=None, cold=False, environ=os.environ) -> str | None:
    """Why this `popek run` must boot cold, or None if it may start warm.

    Warm needs a command (an interactive shell is the console's), a guest Popek builds (``kernel`` None or an
    image name; no ``--initrd``: an arbitrary kernel or initrd path could change under the same path), and none of
    what a template cannot hold: drives, nets, a root file system, ``--profile`` (it samples the boot),
    ``--no-extract``, ``--no-rng``, ``--vsock PATH`` (the run's socket is private). ``--cold`` or
    ``POPEK_NO_WARM=1`` force cold.
    """
    from popek.runner import IMAGE_KINDS

    checks = (
        (cold, "--cold"),
        (environ.get(ENV_OFF, "") not in ("", "0"), f"{ENV_OFF} is set"),
        (not command, "no command (interactive shell)"),
        (kernel is not None and str(kernel) not in IMAGE_KINDS, "a kernel path"),
        (initrd is not None, "--initrd"),
        (bool(drives), "--drive"),
        (bool(nets), "--net"),
        (rootfs is not None, "--rootfs"),
        (profile, "--profile"),
        (no_extract, "--no-extract"),
        (no_rng, "--no-rng"),
        (vsock is not None, "--vsock"),
    )
    return next((why for bad, why in checks if bad), None)


def template_cmdline(*, emulating: bool, append: str = "") -> str:
    """The kernel command line of a template boot: Popek's (``popek.guestcmd.build_cmdline``) with no command and
    ``WARM_ARG`` before the user's ``append``."""
    from popek.guestcmd import build_cmdline

    return build_cmdline(emulating=emulating, command=None, append=f"{WARM_ARG} {append}".strip())


def template_key(*, image: str, memory: int, cpus: int, cmdline: str, flavor: str, cpu: dict,
                 state_version: int, memory_version: int) -> str:
    """The template directory name for everything that changes the saved guest: the image cache entry name
    (which digests the kernel and initramfs inputs), guest RAM in bytes, vCPU count, the full kernel command line,
    the KVM flavour's name, the host CPU fingerprint (``popek.snapshot.cpu_fingerprint``), the snapshot state and
    memory format versions and ``TEMPLATE_VERSION``. -> ``<image>-<memory MiB>m-<cpus>c-<sha256[:16]>``."""
    blob = json.dumps({"image": image, "memory": memory, "cpus": cpus, "cmdline": cmdline, "flavor": flavor,
                       "cpu": cpu, "state": state_version, "mem": memory_version, "template": TEMPLATE_VERSION},
                      sort_keys=True, default=str)
    return f"{image}-{memory >> 20}m-{cpus}c-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def list_templates(root: Path | None = None) -> list[Path]:
    """The published templates (directories holding a state and a memory file), sorted by name."""
    root = warm_root() if root is None else root
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if not p.name.startswith(".") and (p / "state").is_file())


def discard(path: Path) -> None:
    """Remove a template: renamed away first (atomically gone for other runs), then deleted."""
    gone = path.with_name(f"{_TMP}{os.getpid()}-gone-{path.name}")
    try:
        os.rename(path, gone)
    except FileNotFoundError:
        return
    shutil.rmtree(gone, ignore_errors=True)


def forget_all(root: Path | None = None) -> int:
    """Remove every template (and leftovers of interrupted writes); how many templates there were."""
    root = warm_root() if root is None else root
    templates = list_templates(root)
    for p in templates:
        discard(p)
    _remove_stale(root, every=True)
    return len(templates)


def _remove_stale(root: Path, every: bool = False) -> None:
    """Remove ``.tmp-<pid>-*`` directories whose writer process is gone (all of them with ``every``)."""
    if not root.is_dir():
        return
    for p in root.glob(f"{_TMP}*"):
        pid = p.name[len(_TMP):].split("-", 1)[0]
        if every or not (pid.isdigit() and Path(f"/proc/{pid}").exists()):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def publish(vm, path: Path) -> bool:
    """Snapshot ``vm`` (running or paused; ``popek.persist.save``) as the template ``path``: written into a
    ``.tmp-<pid>-*`` sibling, then renamed. False if another run published ``path`` first (ours is dropped).

    :raises VmError, SnapshotError, OSError: as ``popek.persist.save`` (nothing is published then).
    """
    from popek.persist import MEMORY_FILE, STATE_FILE, save

    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP}{os.getpid()}-", dir=path.parent))
    try:
        save(vm, tmp / STATE_FILE, tmp / MEMORY_FILE)
        try:
            os.rename(tmp, path)
        except OSError:  # ENOTEMPTY / EEXIST: another run's template is there
            if not path.is_dir():
                raise
            return False
        tmp = None
        return True
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# ---- the image name, without asking apt on every run ----------------------------------------------------------

#: What apt's answers and the image inputs depend on: if none of these changed, the image entry name has not.
_STAMP_FILES = ("/var/lib/dpkg/status", "/var/lib/apt/lists", "/var/cache/apt/pkgcache.bin",
                "/etc/apt/sources.list", "/etc/apt/sources.list.d")


def _stamp(kind: str) -> list:
    from popek.images import agent, build, microvm

    files = [*_STAMP_FILES, build.INIT, agent.SOURCE, microvm.FRAGMENT, build.__file__]
    out: list = [kind, os.fspath(build.cache.cache_root())]
    for f in files:
        try:
            st = os.stat(f)
            out.append([os.fspath(f), st.st_mtime_ns, st.st_size])
        except OSError:
            out.append([os.fspath(f), None])
    return out


def resolve_image(kind: str | None, *, progress: bool = True):
    """The built Popek guest image ``kind`` (None: the default) as ``popek.images.build.GuestImage``, built on
    first use. Its cache entry name comes from ``popek.images.build.image_key``, which asks apt (~0.6 s here); the
    answer is remembered in ``<store>/.images.json`` against the modification times of dpkg's and apt's state and
    of the image inputs, so a warm run does not ask again.

    :raises ImageError: as ``popek.images.build.build_image``.
    """
    from popek.images import build, cache
    from popek.runner import DEFAULT_KERNEL

    kind = str(kind or DEFAULT_KERNEL)
    memo_path = warm_root() / ".images.json"
    stamp = _stamp(kind)
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    hit = memo.get(kind)
    if isinstance(hit, dict) and hit.get("stamp") == stamp and isinstance(hit.get("name"), str):
        entry = cache.lookup(hit["name"])
        if entry is not None and (entry / "image.json").is_file():
            return build._from_entry(entry)
    image = build.build_image(kind, progress=progress)
    memo[kind] = {"stamp": stamp, "name": image.name}
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_name(f"{_TMP}{os.getpid()}-images.json")
        tmp.write_text(json.dumps(memo))
        os.rename(tmp, memo_path)
    except OSError:
        pass  # only a cache of apt's answer
    return image


# ---- a warm (or template-making) run ----------------------------------------------------------------------------

class GuestEnded(Exception):
    """A template boot ended before its guest agent answered: ``result`` is how (``popek.vm.VmResult``)."""

    def __init__(self, result):
        super().__init__(f"the guest ended ({result.reason}: {result.detail}) before its agent answered")
        self.result = result


@dataclass
class WarmRun:
    """What ``run`` did: the command's exit status, whether it started ``warm`` from a
    template, whether this run ``made`` the template, the template ``key``, and the seconds each step took."""

    exit_status: int | None
    warm: bool
    made: bool
    key: str
    timings: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


def run(command: list[str], *, kernel: str | None = None, memory: str | int = "256M", cpus: int = 1,
        append: str = "", on_stdout: Callable[[bytes], None], on_stderr: Callable[[bytes], None],
        note: Callable[[str], None], on_console: Callable[[bytes], None] | None = None,
        progress: bool = True) -> WarmRun:
    """Run ``command`` (argv) in a guest started from the warm template for these options, making the template
    first if there is none (or the one there cannot be loaded: it is discarded with a ``note``). A template boot
    shows its guest console on ``on_console`` until the agent answers (what a cold `popek run` would show).

    :raises VmError, BootError, KvmError, ImageError, ValueError: for bad options (as ``popek.runner.VM``);
        GuestEnded if a template boot ended before its agent answered (a panic, a bad ``append``);
        popek.agent.AgentError if the guest agent fails; KeyboardInterrupt if interrupted.
    """
    from popek.kvm.system import Kvm, detect_flavor
    from popek.runner import check_inputs, parse_size
    from popek.snapshot import FORMAT_VERSION, MEM_FORMAT_VERSION, cpu_fingerprint

    t = {"begin": time.monotonic()}
    memory = parse_size(memory)
    flavor = detect_flavor()
    cmdline = template_cmdline(emulating=flavor.emulating_cpl0, append=append)
    check_inputs(kernel, None, memory, cpus, cmdline)
    image = resolve_image(kernel, progress=progress)
    kvm = Kvm()
    try:
        cpu = cpu_fingerprint(kvm.supported_cpuid())
    finally:
        kvm.close()
    key = template_key(image=image.name, memory=memory, cpus=cpus, cmdline=cmdline, flavor=flavor.name, cpu=cpu,
                       state_version=FORMAT_VERSION, memory_version=MEM_FORMAT_VERSION)
    path = warm_root() / key
    t["key"] = time.monotonic()
    if path.is_dir():
        from popek.agent import vsock_config
        from popek.persist import MEMORY_FILE, STATE_FILE, load
        from popek.snapshot import SnapshotError
        from popek.vm import VmError

        vsock, vsock_dir = vsock_config(True)
        try:
            vm = load(path / STATE_FILE, path / MEMORY_FILE, vsock_uds=vsock.uds_path)
        except (SnapshotError, VmError, OSError) as e:
            shutil.rmtree(vsock_dir, ignore_errors=True)
            note(f"warm template {key} cannot be used ({e}); discarded it, booting cold")
            discard(path)
        else:
            t["load"] = time.monotonic()
            try:
                return _run_in(vm, vsock.uds_path, command, key, t, on_stdout, on_stderr, note,
                               warm=True, made=False)
            finally:
                shutil.rmtree(vsock_dir, ignore_errors=True)
    from popek.runner import VM
    from popek.vm import VmError

    showing = threading.Event()
    showing.set()
    vm = VM(None, kernel=kernel, memory=memory, cpus=cpus, append=f"{WARM_ARG} {append}".strip(),
            progress=progress, vsock=True,
            on_output=None if on_console is None else lambda data: showing.is_set() and on_console(data))
    if vm.config.cmdline != cmdline:  # the key would not describe this guest
        vm.close()
        raise VmError(f"internal: template command line {vm.config.cmdline!r} is not the key's {cmdline!r}")
    t["load"] = time.monotonic()
    return _run_in(vm, vm.config.vsock.uds_path, command, key, t, on_stdout, on_stderr, note,
                   warm=False, made=False, template=path, console_until_ready=showing)


def _run_in(vm, uds, command, key, t, on_stdout, on_stderr, note, *, warm: bool, made: bool,
            template: Path | None = None, console_until_ready=None) -> WarmRun:
    """Start ``vm``; for a template boot wait for the agent (then clear the ``console_until_ready`` event: the
    guest console is no longer shown) and publish; refresh a warm guest; run ``command`` through the agent; stop
    and close the VM."""
    from popek.agent import AgentClient

    client = AgentClient(uds)
    finished = threading.Event()
    try:
        vm.start()
        t["start"] = time.monotonic()
        if template is not None:
            _wait_agent(vm, client)
            t["agent_ready"] = time.monotonic()
            if console_until_ready is not None:
                console_until_ready.clear()
            try:
                made = publish(vm, template)
            except Exception as e:  # a template is an optimisation: the run goes on without one
                note(f"could not save the warm template {key}: {e}")
            t["publish"] = time.monotonic()
        threading.Thread(target=_watch, args=(vm, finished, note), name="popek-warm-watch", daemon=True).start()
        if template is None:
            refresh(client, hostname=HOSTNAME)
            t["refresh"] = time.monotonic()
        status = client.exec(command, on_stdout=on_stdout, on_stderr=on_stderr,
                             on_error=lambda msg: note(f"guest agent: {msg}"))
        t["exec"] = time.monotonic()
    finally:
        finished.set()
        vm.stop()
        stats = vm.stats.as_dict()
        vm.close()
    t["stop"] = time.monotonic()
    steps = list(t.items())
    timings = {name: round(at - prev, 4) for (_, prev), (name, at) in zip(steps, steps[1:])}
    return WarmRun(status, warm, made, key, timings, stats)


#: Attempts of the first REFRESH after a restore (see ``refresh``).
REFRESH_ATTEMPTS = 5


def refresh(client, *, hostname: str | None, timeout: float = 10.0) -> None:
    """REFRESH a just-restored guest (``AgentClient.refresh``: the host's wall clock now, ENTROPY_BYTES from
    getrandom(2), ``hostname`` unless None), retried up to REFRESH_ATTEMPTS times 0.1 s apart when the connection
    is reset: the restored vsock device sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (VIRTIO 1.2 §5.10.6.7), and a
    guest that handles it after accepting our connection resets that connection too. (REFRESH may be repeated.)

    :raises AgentError: as ``AgentClient.refresh`` on the last attempt (or at once for an agent's ERROR answer).
    """
    from popek.agent import AgentError, AgentProtocolError, AgentTimeout

    for attempt in range(REFRESH_ATTEMPTS):
        try:
            client.refresh(clock=True, entropy=os.getrandom(ENTROPY_BYTES), hostname=hostname, timeout=timeout)
            return
        except (AgentProtocolError, AgentTimeout):
            raise
        except (AgentError, ConnectionError) as e:  # the agent's own ERROR answer says "guest agent: ..."
            if attempt + 1 == REFRESH_ATTEMPTS or str(e).startswith("guest agent:"):
                raise
        time.sleep(0.1)


def _watch(vm, finished, note) -> None:
    """If the guest ends (panic, reset) before ``finished``, say so and reset the vsock device, which closes the
    host's agent connections: the waiting ``AgentClient`` call then fails instead of waiting forever."""
    from popek.devices.virtio.vsock import Vsock

    from popek.vm import VmState

    while not finished.wait(0.2):
        result = None if vm.state is VmState.CREATED else vm.wait(0)
        if result is None:
            continue
        if not finished.is_set():
            note(f"the guest ended ({result.reason}: {result.detail}) while the command ran")
            for d in vm.board.devices if vm.board is not None else ():
                if isinstance(d.device, Vsock):
                    d.device.reset()
        return


def _wait_agent(vm, client) -> None:
    """Wait until the guest agent answers PING; raise GuestEnded if the VM ends first, VmError after
    READY_TIMEOUT."""
    from popek.agent import AgentNotReady, AgentTimeout
    from popek.vm import VmError

    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        result = vm.wait(0)
        if result is not None:
            raise GuestEnded(result)
        try:
            client.ping(timeout=5.0)
            return
        except (AgentNotReady, AgentTimeout):
            if time.monotonic() > deadline:
                raise VmError(f"the template guest's agent did not answer within {READY_TIMEOUT:g} s") from None
            time.sleep(0.1)


def refresh_restored(sockets: list[Path], timeout: float = 3.0) -> list[str]:
    """Best effort, for VMs just restored from a snapshot (`popek snapshot restore` / `clone`): REFRESH each
    guest's clock and entropy (host getrandom(2); the hostname stays) through the agent behind each vsock socket,
    all at once, so clones do not share the snapshot's clock or CRNG state. A guest without an agent (or one that
    does not answer within ``timeout`` s) is left as it is. :returns: one message per socket not refreshed."""
    from popek.agent import AgentClient, AgentError

    problems: list[str] = []

    def one(uds: Path) -> None:
        if not uds.exists():
            problems.append(f"{uds}: no vsock socket")
            return
        try:
            refresh(AgentClient(uds), hostname=None, timeout=timeout)
        except (AgentError, OSError) as e:
            problems.append(f"{uds}: {e}")

    threads = [threading.Thread(target=one, args=(Path(s),), daemon=True) for s in sockets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 1.0)
    return problems
