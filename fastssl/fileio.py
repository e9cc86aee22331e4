"""Where outputs go: checked before the work that makes them, written whole or not at all, and the leftovers
of a killed writer found again."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from fastssl.errors import UserError


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write next to `path` and rename into place: a reader, or the next run after a crash, never sees half a
    file, and a failed write leaves the previous one. A write the system refuses (full disk, a folder made
    read-only or immutable since it was checked) is a UserError naming the file."""
    path = Path(path)
    try:
        _write_atomic(path, data)
    except OSError as e:
        raise UserError(f"cannot write {str(path)!r}: {e.strerror or e}; the previous file, if any, is kept") from None


def _write_atomic(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file owner-only (0600); an ordinary open() would honour the umask, so that a
        # team's shared run folder stays readable. The umask can only be read by setting it.
        umask = os.umask(0o077)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            fsync(f.fileno())  # on disk before the rename: after a power cut, the old file or the whole new one
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    fsync_folder(path.parent)


def fsync(fd: int) -> None:
    """os.fsync, where the file system can sync: some (FUSE mounts of object stores) refuse it with EINVAL or
    ENOTSUP, and durability there is theirs to give. A failed write (EIO, ENOSPC) still raises."""
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make the renames and removals in `folder` durable (a power cut after a rename could otherwise undo it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def check_creatable(path: str | os.PathLike, option: str, *, contents_only: bool = False) -> Path:
    """`path` (a file or folder to be written, with any missing parent folders) can be created by this
    process: its nearest existing ancestor is a folder in which a file can be created. Probed by creating one,
    since as root os.access says yes to folders such as /proc that refuse new files. With `contents_only`, an
    existing folder `path` is written into, never renamed or removed: only it must take new files."""
    path = Path(path)
    folder = path if contents_only and path.is_dir() else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{option} {str(path)!r}: {str(folder)!r} is a file, not a folder; expected a path in a "
                        f"folder")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".fastssl-probe-")
    except OSError as e:
        raise UserError(f"{option} {str(path)!r}: cannot create files in folder {str(folder)!r} "
                        f"({e.strerror or e}); expected a writable folder") from None
    os.close(fd)
    os.unlink(probe)
    return path


def check_output_file(path: str | os.PathLike, option: str, suffix: str = "") -> Path:
    """Before the work whose result goes to `path`: a file path (not a folder, with `suffix` if given) that
    check_creatable accepts."""
    out = Path(path)
    if out.is_dir():
        raise UserError(f"{option} {str(out)!r} is a folder; expected a file path")
    if suffix and out.suffix.lower() != suffix:
        raise UserError(f"{option} {str(out)!r}: expected a {suffix} file")
    return check_creatable(out, option)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or not a pid we can judge: keep it
        return True
    return True


def stale_temporaries(folder: Path, pattern: str) -> list[tuple[Path, re.Match]]:
    """Entries of `folder` whose name fully matches `pattern` (which has a `pid` group) and whose writer
    process is gone: what a SIGKILL left. Our own pid counts as gone, as that leftover can only come from
    an earlier process the pid was reused from (the caller is about to write those names itself)."""
    found = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        m = re.fullmatch(pattern, entry.name)
        if m and (int(m["pid"]) == os.getpid() or not _pid_alive(int(m["pid"]))):
            found.append((Path(entry.path), m))
    return found


def _swap_names(out: Path) -> str:
    return rf"\.{re.escape(out.name)}\.(?P<kind>partial|old)-(?P<pid>\d{{1,9}})"


def clean_up_killed_builds(out: Path, complete: Callable[[Path], bool] = lambda p: True) -> None:
    """What a SIGKILL left of build_in_place beside `out` (its own clean-up never ran): partial folders are
    removed, and a previous `out` caught between the two renames (and `complete`) comes back to `out`."""
    for leftover, m in stale_temporaries(out.parent, _swap_names(out)):
        if m["kind"] == "old" and not out.exists() and complete(leftover):
            os.replace(leftover, out)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def build_in_place(out: Path, what: str) -> Iterator[Path]:
    """A folder that replaces `out` whole or not at all. Yields an empty hidden sibling (.OUT.partial-<pid>) to
    fill; when the block ends it becomes `out`, a previous `out` moved aside (.OUT.old-<pid>) only at that
    instant and removed after. When the block raises (Ctrl-C included) the partial folder goes and the previous
    `out` stays; an OSError (disk full, permissions: the user's to fix) becomes one line naming `what`."""
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)  # rename(2) may replace an empty directory
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)
        if isinstance(e, OSError):
            where = f" ({e.filename})" if e.filename else ""
            raise UserError(f"cannot write {what} to {out}: {e.strerror or e}{where}; expected a writable folder "
                            f"with free space") from None
        raise
    shutil.rmtree(old, ignore_errors=True)

