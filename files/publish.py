"""Publishing a folder: build it beside its destination, verify it, then put it in place in one step.

Every command that writes a folder (convert, upcycle, export-onnx, release, finetune) does

    with publishing(out_dir, force) as tmp:   # a fresh temporary sibling of out_dir
        ...write and verify into tmp...       # any exception: tmp is deleted, out_dir untouched

and at the end of the block tmp becomes out_dir:

  without force  one rename that never replaces (Linux renameat2 RENAME_NOREPLACE). If out_dir
                 appeared while we worked (another run, another user), we lose the race: our
                 result is deleted and a UserError says so. Checking "exists?" first and renaming
                 after would let the second of two runs replace the first one's folder.
  with force     one atomic exchange (RENAME_EXCHANGE): readers see the old folder or the new one,
                 never neither; the old one is deleted only once the new one is in place.

Where the kernel or the file system has no renameat2 (not Linux, old kernels, some network file
systems), no-replace falls back to claiming the name with mkdir (atomic everywhere) and renaming
onto the empty claimed folder; exchange falls back to two renames.
"""

import ctypes
import errno
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import UserError

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()


def _rename_flags(src: Path, dst: Path, flags: int) -> bool:
    """renameat2 with flags; False when this system cannot do it (the caller falls back)."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def lost_race(out_dir: Path) -> UserError:
    return UserError(
        f"{out_dir} appeared while this run was writing it (another run with the same output?); "
        "it was left as it is and this run's result was discarded",
        "check what is in it; rerun with --force to replace it, or choose another output folder",
    )


def place(tmp: Path, out_dir: Path, force: bool) -> None:
    """Moves the finished folder tmp to out_dir, as the module docstring says."""
    if force and out_dir.exists():
        try:
            swapped = _rename_flags(tmp, out_dir, _RENAME_EXCHANGE)
        except FileNotFoundError:  # out_dir vanished meanwhile: a plain placement will do
            swapped = None
        if swapped:
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
            return
        if swapped is False:
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
            return
    try:
        done = _rename_flags(tmp, out_dir, _RENAME_NOREPLACE)
    except FileExistsError:
        if force:  # appeared between our look and the rename: swap it out after all
            return place(tmp, out_dir, force)
        raise lost_race(out_dir) from None
    if done:
        return
    try:
        out_dir.mkdir()  # claims the name atomically, on every POSIX file system
    except FileExistsError:
        if force:
            return place(tmp, out_dir, force)
        raise lost_race(out_dir) from None
    os.replace(tmp, out_dir)  # rename onto the empty folder we own


def make_readable(folder: Path) -> None:
    """mkdtemp makes 0700 folders and safetensors 0600 files; a model folder is meant to be shared."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [folder, *folder.rglob("*")]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def check_out_dir(out, force: bool) -> Path:
    """The output folder, refused early if it exists without --force (publishing() checks again at the end)."""
    out_dir = Path(out).expanduser().resolve()
    if out_dir.exists() and not force:
        raise UserError(f"{out_dir} already exists", "choose a new output folder or pass --force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file, not a folder", "choose another output folder")
    return out_dir


@contextmanager
def publishing(out_dir: Path, force: bool) -> Iterator[Path]:
    """Yields an empty temporary sibling of out_dir; puts it in place when the block succeeds."""
    out_dir = Path(out_dir).expanduser().resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield tmp
        make_readable(tmp)
        place(tmp, out_dir, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
