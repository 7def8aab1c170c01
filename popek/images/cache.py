"""The guest image cache: one directory per image under $XDG_CACHE_HOME/popek, published atomically, locked."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterator


class ImageError(RuntimeError):
    """A guest image cannot be found or built: no apt/dpkg, a package not found, or a failed build (the message
    says which, with the tail of the build log where there is one)."""


def cache_root() -> Path:
    """$XDG_CACHE_HOME/popek, or ~/.cache/popek when XDG_CACHE_HOME is unset or empty (XDG Base Directory spec)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "popek"


def entry_name(*parts: str) -> str:
    """Join key parts with "-" into a directory name, mapping characters other than [A-Za-z0-9.+_-] (such as the
    ":" of a Debian epoch) to "_"."""
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", "-".join(parts))


def lookup(name: str) -> Path | None:
    """The complete cache entry `name`, or None. Entries appear only by rename once complete, so any directory
    with this name is whole."""
    path = cache_root() / name
    return path if path.is_dir() else None


@contextmanager
def _locked(name: str) -> Iterator[Path]:
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield root


def get_or_build(name: str, build: Callable[[Path], None], *, force: bool = False) -> Path:
    """Return cache entry `name`, building it first if absent (or if `force`). `build(tmp)` fills a fresh
    temporary sibling directory, which is renamed to `name` only when `build` returns; if it raises (or the process
    dies) no entry appears. An exclusive flock on `.<name>.lock` serializes builders of the same entry: a second
    caller waits, then finds the first one's result. Leftover temporary directories of dead builds are removed.
    Exceptions from `build` propagate unchanged."""
    with _locked(name) as root:
        final = root / name
        if final.is_dir() and not force:
            return final
        for stale in root.glob(f".{name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            build(tmp)
            tmp.chmod(0o755)
            if final.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-old-", dir=root))
                os.rename(final, old / name)
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final
