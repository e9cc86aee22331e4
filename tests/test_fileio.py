"""fastssl/fileio.py: output paths checked before the work, whole-or-nothing writes, and the leftovers of killed
writers. Oracles: the file system itself (what exists afterwards) and a pid known to be gone."""

from __future__ import annotations

import os

import pytest

from conftest import dead_pid
from fastssl.errors import UserError
from fastssl.fileio import check_creatable, check_output_file, stale_temporaries, write_atomic


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "r.json"
    write_atomic(path, "first")
    assert path.read_text() == "first" and [p.name for p in path.parent.iterdir()] == ["r.json"]

    def crash(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(UserError) as e:  # a tool prints it as one line, not an OSError traceback
        write_atomic(path, "second")
    assert str(e.value) == f"cannot write {str(path)!r}: No space left on device; the previous file, if any, is kept"
    assert path.read_text() == "first" and [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_write_atomic_syncs_where_the_file_system_can(tmp_path, monkeypatch):
    # Some FUSE mounts refuse fsync (EINVAL): the write still lands; a sync that fails for real (EIO) is refused.
    import errno

    path = tmp_path / "r.json"
    synced = []

    def refuses(fd):
        synced.append(fd)
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "fsync", refuses)
    write_atomic(path, "first")
    assert path.read_text() == "first" and len(synced) == 2  # the file, then its folder

    def fails(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", fails)
    with pytest.raises(UserError, match="cannot write .*r.json.*Input/output error"):
        write_atomic(path, "second")
    assert path.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def _a_file(tmp):
    (tmp / "afile").write_text("x")
    return tmp / "afile" / "sub" / "x.json"


@pytest.mark.parametrize("make, fragment", [
    (lambda tmp: tmp, "is a folder"),
    (_a_file, "is a file, not a folder"),
    (lambda tmp: "/proc/x.json", "cannot create files in folder '/proc'"),  # refuses new files, even to root
    (lambda tmp: tmp / "x.txt", "expected a .json file"),
])
def test_output_file_check_names_the_option_and_the_path(make, fragment, tmp_path):
    path = make(tmp_path)
    with pytest.raises(UserError, match=fragment) as e:
        check_output_file(path, "--json", suffix=".json")
    assert str(e.value).startswith(f"--json {str(path)!r}")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_write_atomic_gives_the_permissions_open_would(tmp_path, umask, mode):
    # The oracle: what a plain open() makes under the same umask (a shared run folder stays readable).
    before = os.umask(umask)
    try:
        write_atomic(tmp_path / "config.yaml", "a: 1\n")
        with open(tmp_path / "plain", "w"):
            pass
    finally:
        os.umask(before)
    assert (tmp_path / "config.yaml").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 == mode


def test_output_file_check_leaves_nothing_behind_and_allows_new_folders(tmp_path):
    assert check_output_file(tmp_path / "x.json", "--json") == tmp_path / "x.json"
    assert check_output_file(tmp_path / "new" / "deeper" / "x.json", "--json")  # write_atomic makes them
    assert os.listdir(tmp_path) == []


def test_an_existing_run_folder_needs_only_to_take_files(tmp_path, monkeypatch):
    # A cluster's pre-made run folder inside a parent this user cannot write (simulated: as root the OS would
    # allow it): the trainer writes only inside it, so only it is probed.
    import tempfile

    run = tmp_path / "run"
    run.mkdir()
    real = tempfile.mkstemp

    def parent_refuses(*args, dir=None, **kwargs):
        if os.path.samefile(dir, tmp_path):
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", parent_refuses)
    assert check_creatable(run, "output_dir", contents_only=True) == run
    with pytest.raises(UserError, match="cannot create files in folder"):
        check_creatable(run, "output_dir")  # a converter's output is renamed into the parent: it must take files
    assert os.listdir(run) == []


def test_stale_temporaries_are_those_of_gone_writers_only(tmp_path):
    gone = dead_pid()
    names = {f".o.tmp-{gone}": True, f".o.tmp-{os.getpid()}": True,  # ours: a reused pid's leftover
             f".o.tmp-{os.getppid()}": False, ".o.tmp-1x": False, f".p.tmp-{gone}": False, "o": False}
    for name in names:
        (tmp_path / name).write_text("")
    found = stale_temporaries(tmp_path, r"\.o\.tmp-(?P<pid>\d+)")
    assert sorted(p.name for p, _ in found) == sorted(n for n, stale in names.items() if stale)
    assert stale_temporaries(tmp_path / "missing", r"(?P<pid>\d+)") == []
