"""Atomic, umask-honouring writes and folder replacement, shared by every command. Imports no torch.

The protocol for a folder FINAL (a checkpoint, an export):
- build it in a sibling temporary folder `.FINAL.tmp-PID-XXXX` (PID: the writing process);
- replace: rename FINAL -> `.FINAL.old-PID`, rename the temporary folder -> FINAL, remove the backup.
  The old version stays readable until the new one is complete; a crash between any two steps
  leaves either FINAL or its backup;
- `recover(FINAL)`, run before each read or write of FINAL: restores a backup whose writer is dead
  when FINAL is missing, and removes stale temporary folders and backups of dead writers.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

_TAG = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-.*)?$")


def umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def dir_mode() -> int:
    return 0o777 & ~umask()


def file_mode() -> int:
    return 0o666 & ~umask()


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _leftovers(final: Path):
    """(path, kind, pid) of `.FINAL.tmp-PID-*` and `.FINAL.old-PID` siblings of `final`."""
    parent = final.parent
    if not parent.is_dir():
        return []
    out = []
    for p in parent.iterdir():
        m = _TAG.match(p.name)
        if m and m["name"] == final.name:
            out.append((p, m["kind"], int(m["pid"])))
    return out


def recover(final: str | os.PathLike) -> list[str]:
    """Finish or undo what a dead writer of `final` left behind; returns what it did (for logs).

    Only leftovers of processes that are no longer running are touched: a running writer's
    temporary folder is its own."""
    final = Path(final).absolute()
    done = []
    for path, kind, pid in sorted(_leftovers(final), key=lambda t: t[1] != "old"):
        if pid_alive(pid):
            continue
        if kind == "old" and not final.exists() and not final.is_symlink():
            os.replace(path, final)  # crashed between the two renames: the old version comes back
            done.append(f"restored {final} from {path.name}")
        else:
            _remove(path)
            done.append(f"removed {path.name}")
    return done


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """The nearest existing ancestor of `path` if it is a file (so `path` cannot be made), else None."""
    for a in Path(path).absolute().parents:
        if a.exists():
            return None if a.is_dir() else a
    return None


def make_parent(path: Path) -> None:
    """mkdir -p the parent of `path`; a file on the way is an ENOTDIR error naming that file."""
    if (a := file_in_the_way(path)) is not None:
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(a))
    path.parent.mkdir(parents=True, exist_ok=True)


def make_tmp_dir(final: str | os.PathLike) -> Path:
    """A new empty sibling folder of `final`, named for this process, with the umask's mode."""
    final = Path(final).absolute()  # `.` and `x/..` have no usable name otherwise
    make_parent(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=final.parent))
    os.chmod(tmp, dir_mode())
    return tmp


def apply_umask(root: str | os.PathLike) -> None:
    """chmod a tree to what a plain mkdir/open would have made (mkdtemp/mkstemp give 0700/0600)."""
    root = Path(root)
    dm, fm = dir_mode(), file_mode()
    os.chmod(root, dm if root.is_dir() else fm)
    if root.is_dir():
        for dirpath, dirs, files in os.walk(root):
            for d in dirs:
                os.chmod(os.path.join(dirpath, d), dm)
            for f in files:
                os.chmod(os.path.join(dirpath, f), fm)


# Tests set this to a callable(step) to crash or kill the process at a step: "backup", "install",
# "cleanup" (replace_dir) and "write", "rename" (write_bytes).
FAULT_HOOK = None


def _step(name: str) -> None:
    if FAULT_HOOK is not None:
        FAULT_HOOK(name)


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike, overwrite: bool = False) -> Path:
    """Move the complete folder `tmp` to `final`. An existing `final` is replaced only with
    overwrite, through a backup (see the module docstring); an error in between puts the old
    version back, a kill in between is undone by the next `recover(final)`."""
    tmp, final = Path(tmp), Path(final).absolute()
    apply_umask(tmp)
    if not (final.exists() or final.is_symlink()):
        _step("install")
        os.replace(tmp, final)
        return final
    if not overwrite:
        raise FileExistsError(f"{final} already exists (pass --overwrite to replace it)")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    _step("backup")
    os.replace(final, old)
    try:
        _step("install")
        os.replace(tmp, final)
    except (Exception, KeyboardInterrupt):
        if not final.exists():
            os.replace(old, final)
        raise
    _step("cleanup")
    _remove(old)
    return final


class atomic_dir:
    """`with atomic_dir(final, overwrite) as tmp:` fill tmp; on success it replaces `final`
    (replace_dir); on an exception it is removed and `final` is untouched."""

    def __init__(self, final: str | os.PathLike, overwrite: bool = True):
        self.final, self.overwrite = Path(final).absolute(), overwrite

    def __enter__(self) -> Path:
        recover(self.final)
        if self.final.exists() and not self.overwrite:
            raise FileExistsError(f"{self.final} already exists (pass --overwrite to replace it)")
        self.tmp = make_tmp_dir(self.final)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            if issubclass(exc_type, (Exception, KeyboardInterrupt)):  # a kill leaves it to recover()
                shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        try:
            replace_dir(self.tmp, self.final, self.overwrite)
        except (Exception, KeyboardInterrupt):  # a kill leaves it to recover()
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        return False


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write a file atomically: a temporary sibling (mode from the umask), fsync, then a rename."""
    path = Path(path)
    make_parent(path)
    recover(path)  # temporary files of dead writers
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-")
    try:
        with os.fdopen(fd, "wb") as f:
            _step("write")
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        _step("rename")
        os.replace(tmp, path)
    except (Exception, KeyboardInterrupt):  # a kill leaves it to recover()
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj, **kw) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=float, **kw) + "\n")


def same_or_nested(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True if a and b are the same path, or one lies inside the other (symlinks resolved)."""
    ra, rb = Path(a).resolve(), Path(b).resolve()
    return ra == rb or ra.is_relative_to(rb) or rb.is_relative_to(ra)


def is_nonempty_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and any(p.iterdir())
