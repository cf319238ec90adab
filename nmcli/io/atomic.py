"""Outputs appear whole or not at all: write beside the target, then move into place.

- Exclusive: without `force`, "does it exist?" is decided at the moment the output appears (a hard link for a
  file, an exclusive mkdir for a folder), so two runs writing the same path cannot both succeed.
- Recoverable: replacing a folder takes two renames (old away, new in). A kill between them leaves the complete
  previous version under a side name; the next run that touches the path puts it back first.
- Clean: temporary names carry the writer's process id; a later run of the same output removes the temporaries
  of writers that no longer run (a killed run's half-written file). Names are shortened, so any output name the
  file system takes also has a legal temporary name.
- Permissions follow the umask, as any other program's outputs do.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from nmcli.errors import NMSparseError

_NAME_CHARS = 64  # of the output's name kept in temporary names (a name may be up to 255 bytes)
_TAG = ".nmsparse-"


def _side_name(path: Path, kind: str) -> str:
    return f".{path.name[:_NAME_CHARS]}{_TAG}{kind}"


def _old(path: Path) -> Path:
    return path.with_name(_side_name(path, "old"))


def check_writable(path: Path, force: bool) -> None:
    """Fail early, before any work, when `path` exists and may not be replaced."""
    recover(path)
    if path.exists() and not force:
        raise NMSparseError(f"{path} already exists; pass --force to replace it or choose another --out")
    if not path.parent.is_dir():
        raise NMSparseError(f"output folder {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise NMSparseError(f"output folder {path.parent} is not writable (permission denied)")


def recover(path: Path) -> None:
    """A replacement killed between its two renames left the previous complete version aside: restore it."""
    old = _old(path)
    if old.exists() and not path.exists():
        os.replace(old, path)


def alive(pid: int) -> bool:
    """Does process `pid` still run (ours or another user's)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(path: Path) -> None:
    """Remove temporaries of `path` left by writers that no longer run."""
    prefix = _side_name(path, "tmp")
    for item in path.parent.iterdir():
        pid = item.name[len(prefix):].split(".", 1)[0] if item.name.startswith(prefix) else ""
        if pid.isdigit() and int(pid) != os.getpid() and not alive(int(pid)):
            _remove(item)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # no /proc: read it the classic way (and put it back)
    os.umask(mask)
    return mask


def _follow_umask(tmp: Path, directory: bool) -> None:
    """mkstemp/mkdtemp create 0600/0700; give the output the mode a plain open()/mkdir() would have."""
    mask = _umask()
    os.chmod(tmp, (0o777 if directory else 0o666) & ~mask)


def _exists_error(path: Path) -> NMSparseError:
    return NMSparseError(f"{path} already exists (created while this run was writing); pass --force to replace it")


def _publish_exclusive(tmp: Path, path: Path, directory: bool) -> None:
    if directory:
        try:
            os.mkdir(path)  # claims the name; the rename below replaces this empty folder
        except FileExistsError:
            raise _exists_error(path) from None
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if the name exists, whoever created it
    except FileExistsError:
        raise _exists_error(path) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if path.exists():  # a file system without hard links: the best check left
            raise _exists_error(path) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _publish_replacing(tmp: Path, path: Path, directory: bool) -> None:
    if directory and path.exists():
        old = _old(path)
        _remove(old)
        os.replace(path, old)  # a kill from here until the next line: recover() restores `old`
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def scratch_dir(path: Path) -> Iterator[Path]:
    """A private working folder beside `path`, removed afterwards (and by `clean_stale` if this run is killed)."""
    with tempfile.TemporaryDirectory(prefix=f"{_side_name(path, 'tmp')}{os.getpid()}.", dir=path.parent) as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def atomic_output(path: Path, *, force: bool, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it becomes `path`, on failure it is removed."""
    path = Path(path)
    check_writable(path, force)
    clean_stale(path)
    prefix = f"{_side_name(path, 'tmp')}{os.getpid()}."
    try:
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=path.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmp = Path(name)
    except OSError as exc:
        raise NMSparseError(f"cannot create the output beside {path} ({exc.strerror})") from None
    try:
        yield tmp
        _follow_umask(tmp, directory)
        (_publish_replacing if force else _publish_exclusive)(tmp, path, directory)
    except BaseException:
        _remove(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """`text` as the whole of `path` (replacing it), by way of a temporary file beside it: a reader or a kill never
    leaves half a file."""
    with atomic_output(path, force=True) as tmp:
        tmp.write_text(text)
